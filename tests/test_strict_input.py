"""Odd numbers, deep bodies, NUL bytes, absolute paths and tokens in the log, against a real agent (issue 19).

Each case here failed on the agent before ``agent/http/strict.py`` (a 500, a wrong status, or a live token in
the journal); every number and name now goes through that one strict parser.
"""

from __future__ import annotations

import json
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest

from tests.client_helpers import TUS, download_token, sign, upload_token, vfolder_path
from tests.support import AgentProcess, eventually, make_agent, new_vfolder, served_agent


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    with served_agent(Path(tmp_path_factory.mktemp("strict")) / "agent") as proc:
        yield proc


@pytest.fixture
def api(served: AgentProcess) -> Iterator[httpx.Client]:
    with served.client() as c:
        yield c


@pytest.fixture(scope="module")
def vfid(served: AgentProcess) -> str:
    with served.client() as api:
        value = new_vfolder(api, "strict")
    (vfolder_path(served, value) / "ten").write_bytes(b"0123456789")
    return value


def raw_post(api: httpx.Client, path: str, body: str) -> httpx.Response:
    return api.post(path, content=body.encode(), headers={"Content-Type": "application/json"})


def problem(r: httpx.Response, status: int = 400) -> str:
    assert r.status_code == status, r.text
    return r.json()["msg"]


# -- item 5: numbers and bodies ------------------------------------------------------------------


@pytest.mark.parametrize("offset", ["²", "⁰", "٣", "１", "9" * 5000, "1" * 20, "+1", "-0", "1_0", "0x1", "1.0", ""])
def test_an_odd_upload_offset_is_a_400_naming_the_header(
    served: AgentProcess, api: httpx.Client, vfid: str, offset: str
) -> None:
    token = upload_token(api, vfid, f"up-{uuid.uuid4().hex[:6]}", 4)
    r = httpx.patch(
        f"{served.client_url}/upload",
        params={"token": token},
        content=b"abcd",
        headers={**TUS, "Upload-Offset": offset.encode()},
    )
    assert "Upload-Offset" in problem(r)


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ("[" * 20_000 + "]" * 20_000, "nested deeper than 32"),
        ('{"volume": "local", "options": ' + "[" * 40 + "]" * 40 + "}", "nested deeper than 32"),
        ('{"volume": "local", "size": 1' + "0" * 4300 + "}", "integer of 4301 digits"),
        ('{"volume": "local", "size": -' + "9" * 5000 + "}", "integer of 5000 digits"),
        ('{"volume": "local", "size": NaN}', "NaN is not a JSON value"),
        ('{"volume": "local", "size": 1e999}', "number out of range"),
    ],
)
def test_a_hostile_json_body_is_a_400_naming_the_problem(api: httpx.Client, body: str, words: str) -> None:
    for path in ("/folder/create", "/folder/file/upload", "/quota-scope"):
        assert words in problem(raw_post(api, path, body))


def test_a_body_nested_to_the_limit_is_still_accepted(api: httpx.Client) -> None:
    qsid = f"deep{uuid.uuid4().hex[:6]}"
    options = "[" * 30 + "]" * 30  # the body object is level 1, options level 2: 31 levels in all
    r = raw_post(api, "/quota-scope", json.dumps({"volume": "local", "qsid": qsid})[:-1] + f', "x": {options}}}')
    assert r.status_code == 204, r.text


@pytest.mark.parametrize("limit", [2**63, 10**30, -(2**63)])
def test_a_byte_count_past_64_bits_is_a_400_naming_the_field(api: httpx.Client, limit: int) -> None:
    """A limit SQLite cannot hold was an OverflowError (500) when the catalogue stored it."""
    qsid = f"big{uuid.uuid4().hex[:6]}"
    msg = problem(api.post("/quota-scope", json={"volume": "local", "qsid": qsid, "options": {"limit_bytes": limit}}))
    assert "options.limit_bytes" in msg
    assert api.post("/quota-scope", json={"volume": "local", "qsid": qsid}).status_code == 204
    msg = problem(api.patch("/quota-scope", json={"volume": "local", "qsid": qsid, "options": {"limit_bytes": limit}}))
    assert "options.limit_bytes" in msg
    r = api.patch("/quota-scope", json={"volume": "local", "qsid": qsid, "options": {"limit_bytes": 2**63 - 1}})
    assert r.status_code == 204, r.text


@pytest.mark.parametrize("value", ["²", "maybe", "truee", "１"])
def test_an_odd_query_flag_is_a_400_naming_it(served: AgentProcess, api: httpx.Client, vfid: str, value: str) -> None:
    token = download_token(api, vfid, "ten")
    r = httpx.get(f"{served.client_url}/download", params={"token": token, "archive": value})
    assert "archive" in problem(r)


# -- item 6: NUL in unmanaged_path ---------------------------------------------------------------


@pytest.mark.parametrize(("path", "words"), [("/tmp/\u0000x", "NUL"), ("tmp/x", "absolute"), ("/tmp/\ud800", "U+D800")])
def test_a_bad_unmanaged_path_is_refused_when_the_token_is_asked_for(
    api: httpx.Client, vfid: str, path: str, words: str
) -> None:
    body = json.dumps({"volume": "local", "vfid": vfid, "relpath": "x", "unmanaged_path": path})
    msg = problem(raw_post(api, "/folder/file/download", body))
    assert "unmanaged_path" in msg and words in msg


def test_a_token_with_a_nul_in_unmanaged_path_is_refused_when_used(served: AgentProcess, vfid: str) -> None:
    claims = {"op": "download", "volume": "local", "vfid": vfid, "relpath": "x", "unmanaged_path": "/tmp/\u0000x"}
    r = httpx.get(f"{served.client_url}/download", params={"token": sign(served, claims)})
    assert "unmanaged_path" in problem(r, 403)


# -- item 9: one relpath check for every route ---------------------------------------------------


ROUTES: list[tuple[str, dict[str, Any]]] = [
    ("/folder/file/mkdir", {"relpath": "{p}"}),
    ("/folder/file/list", {"relpath": "{p}"}),
    ("/folder/file/fetch", {"relpath": "{p}"}),
    ("/folder/file/rename", {"relpath": "{p}", "new_name": "y"}),
    ("/folder/file/move", {"src_relpath": "{p}", "dst_relpath": "y"}),
    ("/folder/file/move", {"src_relpath": "ten", "dst_relpath": "{p}"}),
    ("/folder/file/delete", {"relpaths": ["{p}"]}),
    ("/folder/file/download", {"relpath": "{p}"}),
    ("/folder/file/upload", {"relpath": "{p}", "size": 1}),
]


@pytest.mark.parametrize(("relpath", "words"), [("/abs/dir", "must be relative"), ("a\u0000b", "NUL")])
def test_every_file_route_refuses_an_absolute_or_nul_relpath_the_same_way(
    served: AgentProcess, api: httpx.Client, vfid: str, relpath: str, words: str
) -> None:
    for path, template in ROUTES:
        body = json.loads(json.dumps(template).replace("{p}", json.dumps(relpath)[1:-1]))
        r = api.post(path, json={"volume": "local", "vfid": vfid, **body})
        msg = problem(r)
        assert words in msg, (path, msg)
    assert not (vfolder_path(served, vfid) / "abs").exists()


# -- item 10: no token in the log ------------------------------------------------------------------


def test_a_refused_client_request_logs_the_tokens_claims_never_the_token(served: AgentProcess, vfid: str) -> None:
    token = sign(served, {"op": "upload", "volume": "local", "vfid": vfid, "relpath": "x"})  # wrong op: refused
    expired = sign(served, {"op": "download", "volume": "local", "vfid": vfid, "relpath": "x"}, lifetime=-60)
    forged = sign(served, {"op": "download", "vfid": vfid}, secret="not-the-secret-" + "x" * 32)
    for t in (token, expired, forged):
        assert httpx.get(f"{served.client_url}/download", params={"token": t}).status_code == 403
    assert httpx.get(f"{served.client_url}/download", params={"token": "garbage.x.y"}).status_code == 403

    def logged() -> str:
        text = served.log()
        assert text.count("GET /download?token=<token") >= 4
        return text

    text = eventually(logged)
    for t in (token, expired, forged):
        assert t.split(".")[1] not in text and t.split(".")[2] not in text  # no part of the token
    exp = jwt.decode(token, options={"verify_signature": False})["exp"]
    assert f"GET /download?token=<token, unverified claims: op='upload' vfid='{vfid}' exp={exp}>" in text
    assert "token=<token: unreadable>" in text


def test_a_malformed_request_head_does_not_log_its_token(served: AgentProcess, vfid: str) -> None:
    token = sign(served, {"op": "download", "volume": "local", "vfid": vfid, "relpath": "ten"})
    port = int(served.client_url.rpartition(":")[2])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"GET /download?token={token} HTTP/1.1\r\nHost: x\r\nBad\x01Header: y\r\n\r\n".encode())
        assert s.recv(4096).split(b" ")[1] == b"400"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"GET /download?token={token}\x7f HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert s.recv(4096).split(b" ")[1] == b"400"
    eventually(lambda: _malformed_logged(served, 2))
    assert token.split(".")[1][:40] not in served.log()  # aiohttp quotes the request line


def _malformed_logged(served: AgentProcess, count: int) -> None:
    assert served.log().count("malformed request") >= count


# -- item 11: Range --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "status", "content"),
    [
        ("bytes=0-" + "9" * 5000, 206, b"0123456789"),  # last-byte-pos past the end: to the end
        ("bytes=7-" + "9" * 30, 206, b"789"),
        ("bytes=-" + "9" * 5000, 206, b"0123456789"),  # a suffix longer than the file: all of it
        ("bytes=" + "9" * 5000 + "-", 416, b"cannot be satisfied"),  # starts past the end
        ("bytes=²-3", 200, b"0123456789"),  # unparsable: ignored
        ("bytes=0-³", 200, b"0123456789"),
        ("bytes=-", 200, b"0123456789"),
        ("bytes=٠-3", 200, b"0123456789"),
        ("bytes=2-4", 206, b"234"),
    ],
)
def test_range_positions_follow_rfc_9110(
    served: AgentProcess, api: httpx.Client, vfid: str, value: str, status: int, content: bytes
) -> None:
    token = download_token(api, vfid, "ten")
    r = httpx.get(f"{served.client_url}/download", params={"token": token}, headers={"Range": value.encode()})
    if status == 416:  # a problem like every 4xx, with the size to ask within
        assert content.decode() in problem(r, 416) and r.headers["Content-Range"] == "bytes */10"
    else:
        assert (r.status_code, r.content) == (status, content), r.text


@pytest.mark.parametrize(
    "value",
    [
        "Mon, 01 Jan 99999999999999999999 00:00:00 GMT",  # OverflowError in the stdlib's date parser: was a 500
        "Mon, 99999999999999999999 Jan 2020 00:00:00 GMT",
        "Mon, 01 Jan 2020 99999999999999999999:00:00 GMT",
        "Mon, 01 Jan " + "9" * 5000 + " 00:00:00 GMT",
        '"0-0-0"',
        "",
    ],
)
def test_an_odd_if_range_is_a_validator_that_does_not_match(
    served: AgentProcess, api: httpx.Client, vfid: str, value: str
) -> None:
    """Found by test_input_fuzz: a date the stdlib cannot hold. A validator that does not match means the
    whole file (RFC 9110 §13.1.5), never a 500."""
    token = download_token(api, vfid, "ten")
    headers = {"Range": "bytes=2-4", "If-Range": value}
    r = httpx.get(f"{served.client_url}/download", params={"token": token}, headers=headers)
    assert (r.status_code, r.content) == (200, b"0123456789"), r.text


def test_json_log_lines_carry_no_token_either(tmp_path: Path) -> None:
    proc = make_agent(tmp_path / "agent", logging={"format": "json"}).start()
    try:
        token = sign(proc, {"op": "upload", "volume": "local", "vfid": "qs/" + uuid.uuid4().hex, "relpath": "x"})
        assert httpx.get(f"{proc.client_url}/download", params={"token": token}).status_code == 403
        port = int(proc.client_url.rpartition(":")[2])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(f"GET /download?token={token}\x7f HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            assert s.recv(4096).split(b" ")[1] == b"400"
        lines = eventually(lambda: _json_lines(proc, 2))
    finally:
        proc.stop()
    assert token.split(".")[1][:40] not in proc.log()
    assert any("token=<token, unverified claims: op='upload'" in line["msg"] for line in lines)


def _json_lines(proc: AgentProcess, refused: int) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in proc.log().splitlines() if line.startswith("{")]
    assert sum("/download?token=" in line["msg"] for line in lines) >= refused
    return lines
