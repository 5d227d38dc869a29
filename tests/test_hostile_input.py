"""Hostile input against a real agent: schema-driven fuzzing of both listeners, oversized bodies, slow clients.

The fuzz run is driven by the agent's own OpenAPI documents (schemathesis strategies under hypothesis)
with a fixed seed and example budget, so it is repeatable and bounded. Every answer must be a clean
4xx/2xx — never a 500 or a traceback — and the agent log must stay free of unexpected errors.
"""

from __future__ import annotations

import socket
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, seed, settings
from schemathesis import GenerationMode

from tests.support import AUTH_HEADER, AgentProcess, assert_clean_log, make_agent

EXAMPLES = {"manager": 250, "client": 120}  # per generation mode; the whole run stays well under a minute
TUS_BODY = "application/offset+octet-stream"
schemathesis.serializer.alias(TUS_BODY, "application/octet-stream")  # tus PATCH bodies are raw bytes


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    proc = make_agent(Path(tmp_path_factory.mktemp("hostile")) / "agent")
    for listener in ("manager", "client"):
        proc.config["api"][listener]["idle-timeout"] = 2  # short, for the slow-client tests
    proc.start()
    yield proc
    proc.stop()
    assert_clean_log(proc)


def _steer(doc: dict[str, Any], vfid: str, tokens: list[str]) -> dict[str, Any]:
    """Make generated requests name the real volume, scope, vfolder and tokens often enough to get past
    the first lookups (into the resolver and the file operations), and invalid ones otherwise."""
    schemas = doc.get("components", {}).get("schemas", {})
    for schema in schemas.values():
        for name, prop in schema.get("properties", {}).items():
            # valid examples name the real volume and vfolder (so they reach the resolver and the file
            # operations); the negative mode still mutates these into unknown or malformed ones
            if name in ("vfid", "src_vfid"):
                prop.clear()
                prop.update({"type": "string", "enum": [vfid]})
            elif name == "dst_vfid":
                prop.clear()
                prop.update({"type": "string", "enum": [vfid, f"fz/{uuid.uuid4().hex}"]})
            elif name in ("volume", "src_volume", "dst_volume"):
                prop.clear()
                prop.update({"type": "string", "enum": ["local"]})
            elif name == "qsid":
                prop.clear()
                prop.update({"type": "string", "enum": ["fz", "fz-new"]})
    if "/folder/delete" in doc["paths"]:  # deleting the one real vfolder would starve every later example
        doc["paths"]["/folder/delete"]["post"]["requestBody"]["content"]["application/json"]["schema"] = {
            "type": "object",
            "properties": {
                "volume": {"type": "string", "enum": ["local"]},
                "vfid": {"type": "string", "enum": [f"fz/{uuid.uuid4().hex}"]},
            },
            "required": ["volume", "vfid"],
        }
    for ops in doc["paths"].values():
        for op in ops.values():
            for param in op.get("parameters", []):
                if param["name"] == "token":
                    param["schema"] = {"type": "string", "enum": tokens}
    return doc


def _fuzz(served: AgentProcess, listener: str, doc: dict[str, Any]) -> tuple[list[str], Counter[str]]:
    base = served.manager_url if listener == "manager" else served.client_url
    headers = {AUTH_HEADER: served.secret} if listener == "manager" else {}
    schema = schemathesis.openapi.from_dict(doc)
    problems: list[str] = []
    seen: Counter[str] = Counter()  # "METHOD path status"
    session = requests.Session()
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

        @seed(11)
        @settings(
            max_examples=EXAMPLES[listener],
            deadline=None,
            database=None,
            derandomize=True,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(case=schema.as_strategy(mode))
        def run(case: Any) -> None:
            try:
                r = case.call(base_url=base, headers=headers, session=session, timeout=30)
            except Exception as e:  # an unparsable request the HTTP client refuses to send is not our answer
                if "Invalid" in type(e).__name__ or isinstance(e, ValueError | UnicodeError):
                    return
                raise
            text = r.content.decode("utf-8", "replace")
            seen[f"{case.method} {case.path} {r.status_code}"] += 1
            if r.status_code >= 500 or "Traceback" in text:
                problems.append(f"{case.method} {case.path} -> {r.status_code}: {text[:300]}")

        run()
    return problems, seen


def test_fuzzing_both_listeners_gives_no_server_error(served: AgentProcess) -> None:
    with served.client() as api:
        assert api.post("/quota-scope", json={"volume": "local", "qsid": "fz"}).status_code == 204
        vfid = f"fz/{uuid.uuid4().hex}"
        assert api.post("/folder/create", json={"volume": "local", "vfid": vfid}).status_code == 204
        vf = {"volume": "local", "vfid": vfid}
        assert api.post("/folder/file/mkdir", json={**vf, "relpath": "d/e"}).status_code == 204
        tokens = [
            api.post(f"/folder/file/{op}", json={**vf, "relpath": rel, **extra}).json()["token"]
            for op, rel, extra in (("download", "d", {"archive": True}), ("upload", "d/up.bin", {"size": 64}))
        ]
        manager_doc = api.get("/openapi.json").json()
    client_doc = httpx.get(served.client_url + "/openapi.json").json()
    problems, manager_seen = _fuzz(served, "manager", _steer(manager_doc, vfid, tokens + ["x"]))
    more, client_seen = _fuzz(served, "client", _steer(client_doc, vfid, tokens + ["not-a-token"]))
    assert not problems + more, "\n".join((problems + more)[:20])
    for seen in (manager_seen, client_seen):  # the run reached past validation, and was refused cleanly too
        statuses = Counter(key.rsplit(" ", 1)[1][0] for key in seen.elements())
        assert statuses["2"] and statuses["4"], seen
    assert any(k.startswith("POST /folder/file/") and k[-3] == "2" for k in manager_seen), manager_seen
    assert_clean_log(served)


def test_oversized_json_body_is_413(served: AgentProcess) -> None:
    body = b'{"volume": "local", "vfid": "fz/' + b"0" * 32 + b'", "payload": "' + b"x" * (12 * 2**20) + b'"}'
    with served.client() as api:
        r = api.post("/folder/metadata", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    assert "too large" in r.json()["msg"]


def _slow_clients(port: int, count: int) -> list[socket.socket]:
    socks = []
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(b"GET /status HTTP/1.1\r\nHost: x\r\n")  # a request head that never ends
        socks.append(s)
    return socks


def _dripping_until_closed(socks: list[socket.socket], seconds: float) -> int:
    """Send one more header line per second on each socket; how many did the server close meanwhile."""
    closed: set[int] = set()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and len(closed) < len(socks):
        for i, s in enumerate(socks):
            if i in closed:
                continue
            try:
                s.sendall(b"X-Slow: 1\r\n")
                s.settimeout(0.001)
                if s.recv(1) == b"":
                    closed.add(i)
            except (TimeoutError, BlockingIOError):
                pass
            except OSError:
                closed.add(i)
        time.sleep(1.0)
    return len(closed)


def test_slow_loris_clients_do_not_block_others_and_are_cut_off(served: AgentProcess) -> None:
    port = int(served.manager_url.rsplit(":", 1)[1])
    socks = _slow_clients(port, 200)
    try:
        started = time.monotonic()
        r = httpx.get(served.manager_url + "/status", timeout=5)
        assert r.status_code == 200 and time.monotonic() - started < 5
        with served.client() as api:
            assert api.get("/volumes").status_code == 200
        assert _dripping_until_closed(socks, 8.0) == len(socks)  # idle-timeout is 2 s in this agent
    finally:
        for s in socks:
            s.close()


def test_a_slow_upload_body_is_not_cut_by_the_idle_timeout(served: AgentProcess) -> None:
    with served.client() as api:
        vfid = f"fz/{uuid.uuid4().hex}"
        assert api.post("/folder/create", json={"volume": "local", "vfid": vfid}).status_code == 204
        token = api.post(
            "/folder/file/upload", json={"volume": "local", "vfid": vfid, "relpath": "slow.bin", "size": 4}
        ).json()["token"]

    def body() -> Iterator[bytes]:
        for chunk in (b"a", b"b", b"c", b"d"):
            yield chunk
            time.sleep(1.0)  # 4 s in all, twice the idle timeout

    r = httpx.patch(
        served.client_url + "/upload",
        params={"token": token},
        headers={
            "Tus-Resumable": "1.0.0",
            "Upload-Offset": "0",
            "Content-Type": "application/offset+octet-stream",
            "Content-Length": "4",
        },
        content=body(),
        timeout=30,
    )
    assert r.status_code == 204, r.text
    assert r.headers["Upload-Offset"] == "4"
    found = list(served.volume_root().glob("fz/*/*/*/slow.bin"))
    assert [p.read_bytes() for p in found] == [b"abcd"]

