"""tus uploads beyond the conformance suite: limits, conflicts, confinement, concurrency, expiry."""

from __future__ import annotations

import hashlib
import io
import os
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from tusclient.uploader import Uploader

from tests.client_helpers import (
    TUS,
    MiB,
    create_vfolder,
    head,
    patch,
    paused_body,
    staged_file,
    upload_token,
    vfolder_path,
)
from tests.support import AgentProcess, assert_clean_log, eventually, make_agent


@pytest.fixture
def cli(agent: AgentProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=agent.client_url, timeout=60) as c:
        yield c


def _url(agent: AgentProcess, token: str, **params: str) -> str:
    return str(httpx.URL(agent.client_url + "/upload", params={"token": token, **params}))


def test_body_past_declared_size_is_413_and_nothing_written(agent, api, cli, vfid):
    token = upload_token(api, vfid, "big.bin", 10)
    assert patch(cli, token, 0, b"0123").status_code == 204
    # with a Content-Length: refused before reading
    r = patch(cli, token, 4, b"x" * 7)
    assert r.status_code == 413
    # chunked (no Content-Length): refused when the excess arrives; this PATCH's bytes are dropped
    r = patch(cli, token, 4, iter([b"45", b"6789", b"EXTRA"]))
    assert r.status_code == 413
    assert head(cli, token).headers["Upload-Offset"] == "4"
    assert staged_file(agent, token).stat().st_size == 4
    assert patch(cli, token, 4, b"456789").status_code == 204
    assert (vfolder_path(agent, vfid) / "big.bin").read_bytes() == b"0123456789"
    assert (vfolder_path(agent, vfid) / "big.bin").stat().st_mode & 0o777 == 0o644
    assert not staged_file(agent, token).exists()


def test_wrong_offset_writes_nothing(agent, api, cli, vfid):
    token = upload_token(api, vfid, "o.bin", 6)
    assert patch(cli, token, 0, b"abc").status_code == 204
    for offset in (0, 1, 4, 100):
        r = patch(cli, token, offset, b"ZZZ")
        assert r.status_code == 409
        assert r.json()["offset"] == 3
    assert staged_file(agent, token).read_bytes() == b"abc"


def test_partial_upload_lives_outside_the_vfolder(agent, api, cli, vfid):
    token = upload_token(api, vfid, "p.bin", 100)
    assert patch(cli, token, 0, b"x" * 40).status_code == 204
    staged = staged_file(agent, token)
    assert staged.stat().st_size == 40
    root = vfolder_path(agent, vfid)
    assert not staged.resolve().is_relative_to(root.resolve())
    assert list(root.iterdir()) == []
    usage = api.request("GET", "/folder/usage", json={"volume": "local", "vfid": vfid})
    assert usage.status_code == 200
    assert usage.json()["used_bytes"] in (0, -1)


def test_headers_are_checked(agent, api, cli, vfid):
    token = upload_token(api, vfid, "h.bin", 3)
    r = cli.patch(
        "/upload",
        params={"token": token},
        content=b"abc",
        headers={"Tus-Resumable": "1.0.0", "Upload-Offset": "0", "Content-Type": "text/plain"},
    )
    assert r.status_code == 415
    r = cli.patch("/upload", params={"token": token}, content=b"abc", headers=dict(TUS, **{"Upload-Offset": "-1"}))
    assert r.status_code == 400
    r = cli.patch(
        "/upload",
        params={"token": token},
        content=b"abc",
        headers=dict(TUS, **{"Upload-Offset": "0", "Tus-Resumable": "0.2.2"}),
    )
    assert r.status_code == 412
    assert not (vfolder_path(agent, vfid) / "h.bin").exists()
    assert not staged_file(agent, token).exists()


def test_options_and_cors_on_every_answer(agent, api, cli, vfid):
    r = cli.options("/upload")
    assert r.status_code == 204
    assert r.headers["Tus-Max-Size"] == str(100 * 2**30)
    methods = r.headers["Access-Control-Allow-Methods"]
    assert "PATCH" in methods and "HEAD" in methods
    exposed = r.headers["Access-Control-Expose-Headers"].lower()
    for h in ("upload-offset", "upload-length", "tus-resumable"):
        assert h in exposed
    token = upload_token(api, vfid, "c.bin", 1)
    assert head(cli, token).headers["Access-Control-Allow-Origin"] == "*"
    assert patch(cli, token, 5, b"x").headers["Access-Control-Allow-Origin"] == "*"  # errors too


@pytest.mark.parametrize("dst_dir", ["..", "../..", "/tmp", "link-out", "link-out/sub", "sub/../../.."])
def test_dst_dir_escape_is_refused_before_writing(agent, api, cli, vfid, tmp_path, dst_dir):
    outside = tmp_path / "outside"
    outside.mkdir()
    root = vfolder_path(agent, vfid)
    os.symlink(outside, root / "link-out")
    token = upload_token(api, vfid, "evil.bin", 4)
    assert 400 <= head(cli, token, dst_dir=dst_dir).status_code < 500
    r = patch(cli, token, 0, b"evil", dst_dir=dst_dir)
    assert 400 <= r.status_code < 500, r.status_code
    assert list(outside.rglob("*")) == []
    assert not staged_file(agent, token).exists()
    assert head(cli, token).headers["Upload-Offset"] == "0"


def test_existing_directory_is_never_replaced(agent, api, cli, vfid):
    root = vfolder_path(agent, vfid)
    (root / "d").mkdir()
    (root / "d" / "inside.txt").write_bytes(b"inside")
    token = upload_token(api, vfid, "d", 3)
    r = patch(cli, token, 0, b"abc")
    assert r.status_code == 409
    assert (root / "d" / "inside.txt").read_bytes() == b"inside"
    assert not staged_file(agent, token).exists()


def test_existing_file_and_symlink_are_replaced_not_written_through(agent, api, cli, vfid, tmp_path):
    root = vfolder_path(agent, vfid)
    (root / "f.txt").write_bytes(b"old")
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"untouched")
    os.symlink(victim, root / "link")
    for name in ("f.txt", "link"):
        token = upload_token(api, vfid, name, 3)
        assert patch(cli, token, 0, b"new").status_code == 204
        assert not (root / name).is_symlink()
        assert (root / name).read_bytes() == b"new"
    assert victim.read_bytes() == b"untouched"


def test_concurrent_uploads_to_one_vfolder(agent, api, vfid):
    blobs = {f"shared/dir/file-{i}.bin": os.urandom(300_000 + i * 7919) for i in range(6)}
    blobs["other/x.bin"] = os.urandom(123_457)

    def one(item: tuple[str, bytes]) -> str:
        relpath, data = item
        token = upload_token(api, vfid, relpath, len(data))
        Uploader(file_stream=io.BytesIO(data), url=_url(agent, token), chunk_size=64 * 1024).upload()
        return relpath

    with ThreadPoolExecutor(max_workers=len(blobs)) as pool:
        done = list(pool.map(one, blobs.items()))
    assert sorted(done) == sorted(blobs)
    root = vfolder_path(agent, vfid)
    for relpath, data in blobs.items():
        assert hashlib.sha256((root / relpath).read_bytes()).digest() == hashlib.sha256(data).digest(), relpath
    assert sorted(p.name for p in (root / "shared" / "dir").iterdir()) == sorted(
        Path(r).name for r in blobs if r.startswith("shared/")
    )


def test_two_patches_racing_on_one_session(agent, api, cli, vfid):
    """The second PATCH at the same offset loses with 409 and the file holds exactly one copy."""
    token = upload_token(api, vfid, "race.bin", 2 * MiB)
    release = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(patch, cli, token, 0, paused_body(b"a" * MiB, b"a" * MiB, release, 10))
        deadline = time.monotonic() + 10
        while not staged_file(agent, token).exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        with httpx.Client(base_url=agent.client_url, timeout=30) as other:
            r = patch(other, token, 0, b"b" * 2 * MiB)
        release.set()
        assert r.status_code == 409
        assert first.result().status_code == 204
    assert (vfolder_path(agent, vfid) / "race.bin").read_bytes() == b"a" * 2 * MiB


def test_client_that_drops_mid_patch_keeps_what_arrived(agent, api, vfid):
    token = upload_token(api, vfid, "drop.bin", 8 * MiB)
    sent = threading.Event()

    def body() -> Iterator[bytes]:
        for _ in range(5):
            yield b"z" * MiB
        sent.set()
        raise RuntimeError("client gives up")

    with httpx.Client(base_url=agent.client_url, timeout=30) as c, pytest.raises(RuntimeError):
        patch(c, token, 0, body())
    with httpx.Client(base_url=agent.client_url, timeout=30) as c:
        deadline = time.monotonic() + 10
        while True:
            offset = int(head(c, token).headers["Upload-Offset"])
            if offset > 0 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        # what the server read was kept, a partial batch too (aiohttp may drop its last buffered piece on EOF)
        assert 4 * MiB < offset <= 5 * MiB
        assert staged_file(agent, token).stat().st_size == offset
        assert patch(c, token, offset, b"z" * (8 * MiB - offset)).status_code == 204
    assert (vfolder_path(agent, vfid) / "drop.bin").read_bytes() == b"z" * 8 * MiB


def test_max_upload_size_and_expiry_sweep(tmp_path):
    agent = make_agent(tmp_path / "a", storage_proxy={"max-upload-size": "1m", "session-expire": "2s"}).start()
    try:
        with agent.client() as api, httpx.Client(base_url=agent.client_url, timeout=30) as cli:
            vfid = create_vfolder(api)
            assert cli.options("/upload").headers["Tus-Max-Size"] == str(MiB)
            r = api.post("/folder/file/upload", json={"volume": "local", "vfid": vfid, "relpath": "x", "size": MiB + 1})
            assert r.status_code == 413
            token = upload_token(api, vfid, "partial.bin", MiB)
            assert patch(cli, token, 0, b"p" * 1000).status_code == 204
            staged = staged_file(agent, token)
            assert staged.exists()
            deadline = time.monotonic() + 15
            while staged.exists() and time.monotonic() < deadline:
                time.sleep(0.2)
            assert not staged.exists(), "expired session's staged bytes were not swept"
            assert 400 <= head(cli, token).status_code < 500
            assert not (vfolder_path(agent, vfid) / "partial.bin").exists()

            def logged() -> None:  # the sweeper logs its round once the staged bytes are gone: wait for it
                assert "swept 1 expired upload session" in agent.log()

            eventually(logged, timeout=15)
    finally:
        agent.stop()
    assert_clean_log(agent)


def test_tuspy_zero_byte_upload_lands(agent, api, vfid):
    """tuspy sends no PATCH when HEAD already reports offset == length; the empty file must land anyway."""
    token = upload_token(api, vfid, "sub/empty.txt", 0)
    uploader = Uploader(file_stream=io.BytesIO(b""), url=_url(agent, token))
    uploader.upload()
    assert (vfolder_path(agent, vfid) / "sub" / "empty.txt").read_bytes() == b""
    assert not staged_file(agent, token).exists()


def test_target_under_a_regular_file_is_refused_before_writing(agent, api, cli, vfid):
    root = vfolder_path(agent, vfid)
    (root / "plain").write_bytes(b"a file, not a directory")
    token = upload_token(api, vfid, "plain/inner/x.bin", 3)
    r = patch(cli, token, 0, b"abc")
    assert r.status_code == 400
    assert r.json()["errno"] == 20  # ENOTDIR
    assert not staged_file(agent, token).exists()
    assert (root / "plain").read_bytes() == b"a file, not a directory"


def test_staged_bytes_cut_behind_the_agents_back_mean_409_and_resume(agent, api, cli, vfid):
    token = upload_token(api, vfid, "cut.bin", 10)
    assert patch(cli, token, 0, b"012345").status_code == 204
    os.truncate(staged_file(agent, token), 2)  # an operator or a disk problem lost the tail
    r = patch(cli, token, 6, b"6789")
    assert r.status_code == 409
    assert r.json()["offset"] == 2
    assert head(cli, token).headers["Upload-Offset"] == "2"
    assert patch(cli, token, 2, b"23456789").status_code == 204
    assert (vfolder_path(agent, vfid) / "cut.bin").read_bytes() == b"0123456789"


def _raw_patch_head(agent: AgentProcess, token: str, offset: int, length: int) -> bytes:
    target = httpx.URL(_url(agent, token)).raw_path.decode()
    return (
        f"PATCH {target} HTTP/1.1\r\nHost: x\r\nTus-Resumable: 1.0.0\r\n"
        f"Content-Type: application/offset+octet-stream\r\nUpload-Offset: {offset}\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


def test_big_patch_bodies_are_spliced_and_close_their_connection(agent, api, cli, vfid):
    """A PATCH body of 2 MiB or more goes from the socket into the staged file past aiohttp's parser: the
    answer says ``Connection: close`` (that connection cannot carry another request); small PATCHes keep
    theirs. A client that goes away mid-body keeps the bytes that arrived, and HEAD says so."""
    data = os.urandom(12 * MiB)
    token = upload_token(api, vfid, "spliced.bin", len(data))
    small = patch(cli, token, 0, data[:MiB])
    assert small.status_code == 204 and small.headers.get("Connection", "").lower() != "close"

    host, port = httpx.URL(agent.client_url).host, httpx.URL(agent.client_url).port
    with socket.create_connection((host, port)) as sock:  # 4 MiB promised, 3 MiB sent, then gone
        sock.sendall(_raw_patch_head(agent, token, MiB, 4 * MiB) + data[MiB : 4 * MiB])
        time.sleep(0.5)
    deadline = time.monotonic() + 10
    while head(cli, token).headers["Upload-Offset"] != str(4 * MiB) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert head(cli, token).headers["Upload-Offset"] == str(4 * MiB)
    assert staged_file(agent, token).read_bytes() == data[: 4 * MiB]

    big = patch(cli, token, 4 * MiB, data[4 * MiB : 9 * MiB])
    assert big.status_code == 204, big.text
    assert big.headers["Upload-Offset"] == str(9 * MiB) and big.headers["Connection"].lower() == "close"
    last = patch(cli, token, 9 * MiB, data[9 * MiB :])  # httpx opens a new connection by itself
    assert last.status_code == 204 and last.headers["Upload-Offset"] == str(len(data))
    assert (
        hashlib.sha256((vfolder_path(agent, vfid) / "spliced.bin").read_bytes()).digest()
        == hashlib.sha256(data).digest()
    )
    assert not staged_file(agent, token).exists()
