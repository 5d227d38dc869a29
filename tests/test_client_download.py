"""GET /download beyond the conformance suite: zips never follow links, ranges, escapes, special files."""

from __future__ import annotations

import io
import os
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.client_helpers import download_token, sign, vfolder_path
from tests.support import AgentProcess


@pytest.fixture
def cli(agent: AgentProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=agent.client_url, timeout=60) as c:
        yield c


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory outside the volume holding a canary file."""
    d = tmp_path / "outside"
    d.mkdir()
    (d / "secret.txt").write_bytes(b"CANARY-" + uuid.uuid4().hex.encode())
    return d


def _canary(outside: Path) -> bytes:
    return (outside / "secret.txt").read_bytes()


def test_zip_leaves_out_symlinks_and_never_their_targets(agent, api, cli, vfid, outside):
    base = vfolder_path(agent, vfid) / "tree"
    (base / "sub" / "empty").mkdir(parents=True)
    (base / "a.txt").write_bytes(b"alpha")
    (base / "sub" / "b.bin").write_bytes(os.urandom(70_000))
    os.symlink(outside / "secret.txt", base / "link-to-outside-file")
    os.symlink(outside, base / "sub" / "link-to-outside-dir")
    os.symlink("a.txt", base / "inner-link")
    os.mkfifo(base / "fifo")  # a special file is left out, and must not hang the walk

    token = download_token(api, vfid, "tree", archive=True)
    r = cli.get("/download", params={"token": token, "archive": "true"})
    assert r.status_code == 200, r.text
    assert _canary(outside) not in r.content
    zf = zipfile.ZipFile(io.BytesIO(r.content))
    assert zf.testzip() is None
    names = set(zf.namelist())
    assert names == {"a.txt", "sub/", "sub/b.bin", "sub/empty/"}
    assert zf.read("sub/b.bin") == (base / "sub" / "b.bin").read_bytes()
    for info in zf.infolist():
        assert info.external_attr >> 28 != 0o12, f"{info.filename} stored as a symlink pointing anywhere"


def test_zip_of_whole_vfolder_uses_folder_id_as_name(agent, api, cli, vfid):
    (vfolder_path(agent, vfid) / "x.txt").write_bytes(b"x")
    r = cli.get("/download", params={"token": download_token(api, vfid, ".", archive=True)})
    assert r.status_code == 200
    assert f'filename="{vfid.split("/")[1]}.zip"' in r.headers["content-disposition"]
    assert zipfile.ZipFile(io.BytesIO(r.content)).read("x.txt") == b"x"


def test_range_edge_cases(agent, api, cli, vfid):
    data = os.urandom(10_000)
    (vfolder_path(agent, vfid) / "r.bin").write_bytes(data)
    token = download_token(api, vfid, "r.bin")
    r = cli.get("/download", params={"token": token}, headers={"Range": "bytes=-100"})
    assert r.status_code == 206 and r.content == data[-100:]
    assert r.headers["content-range"] == "bytes 9900-9999/10000"
    r = cli.get("/download", params={"token": token}, headers={"Range": "bytes=10000-"})
    assert r.status_code == 416
    assert r.headers["content-range"] == "bytes */10000"
    r = cli.get("/download", params={"token": token}, headers={"Range": "bytes=9000-20000"})
    assert r.status_code == 206 and r.content == data[9000:]
    # If-Range with a validator the file no longer matches: the whole file, 200
    r = cli.get(
        "/download", params={"token": token}, headers={"Range": "bytes=5-", "If-Range": "Mon, 01 Jan 2001 00:00:00 GMT"}
    )
    assert r.status_code == 200 and r.content == data
    etag = r.headers["etag"]
    r = cli.get("/download", params={"token": token}, headers={"Range": "bytes=5-9", "If-Range": etag})
    assert r.status_code == 206 and r.content == data[5:10]
    r = cli.get("/download", params={"token": token}, headers={"Range": "bytes=5-9", "If-Range": '"other"'})
    assert r.status_code == 200 and r.content == data
    # a multi-range request is answered with the whole file
    r = cli.get("/download", params={"token": token}, headers={"Range": "bytes=0-1,5-6"})
    assert r.status_code == 200 and r.content == data


def test_head_download_sends_headers_only(agent, api, cli, vfid):
    (vfolder_path(agent, vfid) / "h.bin").write_bytes(b"12345")
    r = cli.head("/download", params={"token": download_token(api, vfid, "h.bin")})
    assert r.status_code == 200
    assert r.headers["content-length"] == "5"
    assert r.content == b""


def test_fifo_is_refused_not_hung(agent, api, cli, vfid):
    os.mkfifo(vfolder_path(agent, vfid) / "pipe")
    r = cli.get("/download", params={"token": download_token(api, vfid, "pipe")})
    assert r.status_code == 400


@pytest.mark.parametrize(
    "dst_dir",
    ["..", "../..", "/etc", "link-out", "link-out/dir"],
)
def test_dst_dir_escape_is_refused(agent, api, cli, vfid, outside, dst_dir):
    root = vfolder_path(agent, vfid)
    os.symlink(outside, root / "link-out")
    (outside / "dir").mkdir()
    (outside / "dir" / "secret.txt").write_bytes(_canary(outside))
    token = download_token(api, vfid, "secret.txt")
    r = cli.get("/download", params={"token": token, "dst_dir": dst_dir})
    assert 400 <= r.status_code < 500, r.status_code
    assert _canary(outside) not in r.content


def test_signed_token_with_escaping_relpath_is_refused(agent, api, cli, vfid, outside):
    root = vfolder_path(agent, vfid)
    os.symlink(outside / "secret.txt", root / "inner-link")
    rel = os.path.relpath(outside / "secret.txt", root)
    for relpath in (rel, str(outside / "secret.txt"), "inner-link", "../../../../../../../../etc/passwd"):
        claims = {
            "op": "download",
            "volume": "local",
            "vfid": vfid,
            "relpath": relpath,
            "archive": False,
            "unmanaged_path": None,
        }
        r = cli.get("/download", params={"token": sign(agent, claims)})
        assert 400 <= r.status_code < 500, (relpath, r.status_code)
        assert _canary(outside) not in r.content
        assert b"root:" not in r.content


def test_zip_of_directory_reached_through_outside_link_is_refused(agent, api, cli, vfid, outside):
    os.symlink(outside, vfolder_path(agent, vfid) / "out")
    r = cli.get("/download", params={"token": download_token(api, vfid, "out", archive=True), "archive": "true"})
    assert 400 <= r.status_code < 500
    assert _canary(outside) not in r.content


def test_bad_flag_value_is_400(agent, api, cli, vfid):
    (vfolder_path(agent, vfid) / "f").write_bytes(b"f")
    r = cli.get("/download", params={"token": download_token(api, vfid, "f"), "no_cache": "maybe"})
    assert r.status_code == 400
    assert "no_cache" in r.json()["msg"]


def test_cors_headers_on_download(agent, api, cli, vfid):
    (vfolder_path(agent, vfid) / "c").write_bytes(b"c")
    r = cli.get("/download", params={"token": download_token(api, vfid, "c")})
    assert r.headers["access-control-allow-origin"] == "*"
    assert "content-disposition" in r.headers["access-control-expose-headers"].lower()


def test_cors_preflight_for_download(cli):
    r = cli.options("/download", headers={"Origin": "https://example.org", "Access-Control-Request-Method": "GET"})
    assert r.status_code == 204
    assert r.headers["access-control-allow-origin"] == "*"
    assert "range" in r.headers["access-control-allow-headers"].lower()
