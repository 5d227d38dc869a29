"""Names that are not UTF-8, end to end: what the listing returns can be fetched, downloaded, uploaded to,
renamed, moved and deleted, and the same bytes reach the disk (README: "Names that are not UTF-8").

On the wire such a name is ``os.fsdecode`` of its bytes: byte 0xff is U+DCFF, ``\\udcff`` in JSON and ``%FF``
in a query string.
"""

from __future__ import annotations

import json
import os
import urllib.parse
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.client_helpers import TUS, vfolder_path
from tests.support import AgentProcess, new_vfolder, served_agent


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    # the usage engine runs too: it must count such names without a traceback (assert_clean_log)
    with served_agent(Path(tmp_path_factory.mktemp("names")) / "agent") as proc:
        yield proc


@pytest.fixture
def api(served: AgentProcess) -> Iterator[httpx.Client]:
    with served.client() as c:
        yield c


@pytest.fixture
def vfid(api: httpx.Client) -> str:
    return new_vfolder(api, f"nu{uuid.uuid4().hex[:6]}")


def post(api: httpx.Client, path: str, body: dict[str, Any]) -> httpx.Response:
    """A manager call with the body encoded as json.dumps does (lone surrogates as \\uXXXX escapes)."""
    return api.post(path, content=json.dumps(body), headers={"Content-Type": "application/json"})


def disk(served: AgentProcess, vfid: str) -> bytes:
    return os.fsencode(vfolder_path(served, vfid))


def listing(api: httpx.Client, vfid: str, relpath: str = ".") -> dict[str, str]:
    r = post(api, "/folder/file/list", {"volume": "local", "vfid": vfid, "relpath": relpath})
    assert r.status_code == 200, r.text
    return {e["name"]: e["type"] for e in r.json()["items"]}


def test_a_listed_name_that_is_not_utf8_can_be_fetched_renamed_moved_and_deleted(
    served: AgentProcess, api: httpx.Client, vfid: str
) -> None:
    root = disk(served, vfid)
    with open(root + b"/a\xffb", "wb") as f:
        f.write(b"payload")
    os.mkdir(root + b"/d\xfe")
    r = post(api, "/folder/file/list", {"volume": "local", "vfid": vfid, "relpath": "."})
    assert '"a\\udcffb"' in r.text  # the wire form: the byte 0xff as the escape of U+DCFF
    assert listing(api, vfid) == {"a\udcffb": "FILE", "d\udcfe": "DIRECTORY"}
    base = {"volume": "local", "vfid": vfid}

    r = post(api, "/folder/file/fetch", {**base, "relpath": "a\udcffb"})
    assert (r.status_code, r.content) == (200, b"payload"), r.text
    assert post(api, "/folder/file/rename", {**base, "relpath": "a\udcffb", "new_name": "r\udc80"}).status_code == 204
    assert os.path.exists(root + b"/r\x80") and not os.path.exists(root + b"/a\xffb")
    r = post(api, "/folder/file/move", {**base, "src_relpath": "r\udc80", "dst_relpath": "d\udcfe/m\udcff"})
    assert r.status_code == 204, r.text
    assert os.listdir(root + b"/d\xfe") == [b"m\xff"]
    assert listing(api, vfid, "d\udcfe") == {"m\udcff": "FILE"}
    r = post(api, "/folder/file/mkdir", {**base, "relpath": "d\udcfe/n\udcc3"})
    assert r.status_code == 204, r.text
    assert os.path.isdir(root + b"/d\xfe/n\xc3")
    r = post(api, "/folder/file/delete", {**base, "relpaths": ["d\udcfe/m\udcff", "d\udcfe/n\udcc3"]})
    assert r.status_code == 200, r.text
    assert os.listdir(root + b"/d\xfe") == []
    assert post(api, "/folder/file/delete", {**base, "relpaths": ["d\udcfe"], "recursive": True}).status_code == 200
    assert os.listdir(root) == []


def test_a_name_that_is_not_utf8_downloads_with_a_valid_content_disposition(
    served: AgentProcess, api: httpx.Client, vfid: str
) -> None:
    root = disk(served, vfid)
    os.mkdir(root + b"/d\xff")
    with open(root + b"/d\xff/f\xfe.bin", "wb") as f:
        f.write(b"0123456789")
    r = post(api, "/folder/file/download", {"volume": "local", "vfid": vfid, "relpath": "d\udcff/f\udcfe.bin"})
    assert r.status_code == 200, r.text
    r = httpx.get(served.client_url + "/download", params={"token": r.json()["token"]})
    assert (r.status_code, r.content) == (200, b"0123456789"), r.text
    disposition = r.headers["Content-Disposition"]
    assert disposition.isascii()
    assert "filename*=UTF-8''f%FE.bin" in disposition  # the raw bytes, percent-encoded
    assert urllib.parse.unquote_to_bytes(disposition.rpartition("''")[2]) == b"f\xfe.bin"

    # the token names the file, the query's dst_dir the directory: %FF is the byte 0xff there too
    r = post(api, "/folder/file/download", {"volume": "local", "vfid": vfid, "relpath": "f\udcfe.bin"})
    url = f"{served.client_url}/download?token={r.json()['token']}&dst_dir=d%FF"
    r = httpx.get(url)
    assert (r.status_code, r.content) == (200, b"0123456789"), r.text


def test_an_upload_to_a_name_that_is_not_utf8_lands_on_those_bytes(
    served: AgentProcess, api: httpx.Client, vfid: str
) -> None:
    root = disk(served, vfid)
    os.mkdir(root + b"/in\xff")
    r = post(api, "/folder/file/upload", {"volume": "local", "vfid": vfid, "relpath": "up\udcfe", "size": 3})
    assert r.status_code == 200, r.text
    url = f"{served.client_url}/upload?token={r.json()['token']}&dst_dir=in%FF"
    r = httpx.patch(url, content=b"abc", headers={**TUS, "Upload-Offset": "0"})
    assert r.status_code == 204, r.text
    with open(root + b"/in\xff/up\xfe", "rb") as f:
        assert f.read() == b"abc"


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("x\ud800", "U+D800"),  # a high surrogate: no byte maps to it
        ("x\udc41", "U+DC41"),  # the escape of an ASCII byte: never produced by os.fsdecode
        ("\udcc3\udca9", "valid UTF-8"),  # é spelled as two escaped bytes: the name is "é"
    ],
)
def test_other_lone_surrogates_are_refused_naming_the_field(
    api: httpx.Client, vfid: str, name: str, problem: str
) -> None:
    base = {"volume": "local", "vfid": vfid}
    for path, body, field in [
        ("/folder/file/mkdir", {"relpath": name}, "relpath"),
        ("/folder/file/fetch", {"relpath": name}, "relpath"),
        ("/folder/file/rename", {"relpath": "x", "new_name": name}, "new_name"),
        ("/folder/file/move", {"src_relpath": "x", "dst_relpath": name}, "dst_relpath"),
        ("/folder/file/delete", {"relpaths": [name]}, "relpaths.0"),
        ("/folder/file/download", {"relpath": name}, "relpath"),
        ("/folder/file/upload", {"relpath": name, "size": 1}, "relpath"),
    ]:
        r = post(api, path, {**base, **body})
        assert r.status_code == 400, (path, r.text)
        msg = r.json()["msg"]
        assert f"{field}:" in msg and problem in msg, (path, msg)
