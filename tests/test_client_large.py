"""A 1 GiB tus upload and download while the agent's RSS is sampled: memory stays flat."""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx

from tests.client_helpers import (
    TUS,
    MiB,
    RssSampler,
    create_vfolder,
    download_token,
    upload_token,
    vfolder_path,
)
from tests.support import assert_clean_log, make_agent

SIZE = 1 << 30
CHUNK = 8 * MiB
MAX_GROWTH = 64 * MiB


def _chunks(block: bytes) -> Iterator[bytes]:
    """SIZE bytes, CHUNK at a time, each chunk distinct (a counter in front of one random block)."""
    for i in range(SIZE // CHUNK):
        yield i.to_bytes(8, "little") + block[8:]


def test_one_gib_upload_and_download_keep_memory_flat(tmp_path: Path) -> None:
    agent = make_agent(tmp_path / "agent").start()
    try:
        block = os.urandom(CHUNK)
        expected = hashlib.sha256()
        with agent.client() as api:
            vfid = create_vfolder(api)
            token = upload_token(api, vfid, "big/one-gib.bin", SIZE)
            dl_token = download_token(api, vfid, "big/one-gib.bin")
            zip_token = download_token(api, vfid, "big", archive=True)

        with httpx.Client(base_url=agent.client_url, timeout=120) as cli:
            with RssSampler(agent.proc.pid) as up:
                offset = 0
                for chunk in _chunks(block):
                    expected.update(chunk)
                    headers = dict(TUS, **{"Upload-Offset": str(offset)})
                    r = cli.patch("/upload", params={"token": token}, content=chunk, headers=headers)
                    assert r.status_code == 204, r.text
                    offset = int(r.headers["Upload-Offset"])
            assert offset == SIZE
            landed = vfolder_path(agent, vfid) / "big" / "one-gib.bin"
            assert landed.stat().st_size == SIZE
            assert up.growth < MAX_GROWTH, f"agent RSS grew by {up.growth / MiB:.1f} MiB during the upload"

            with RssSampler(agent.proc.pid) as down:
                got = hashlib.sha256()
                n = 0
                with cli.stream("GET", "/download", params={"token": dl_token}) as r:
                    assert r.status_code == 200
                    assert int(r.headers["content-length"]) == SIZE
                    for part in r.iter_raw(4 * MiB):
                        got.update(part)
                        n += len(part)
            assert n == SIZE
            assert got.hexdigest() == expected.hexdigest(), "downloaded bytes differ from the uploaded ones"
            assert down.growth < MAX_GROWTH, f"agent RSS grew by {down.growth / MiB:.1f} MiB during the download"

            # the same tree as a streamed zip: only its size and its end (the central directory) are kept
            with RssSampler(agent.proc.pid) as zipped:
                total, tail = 0, b""
                with cli.stream("GET", "/download", params={"token": zip_token, "archive": "true"}) as r:
                    assert r.status_code == 200
                    for part in r.iter_raw(4 * MiB):
                        total += len(part)
                        tail = (tail + part)[-65536:]
            assert zipped.growth < MAX_GROWTH, f"agent RSS grew by {zipped.growth / MiB:.1f} MiB during the zip"
            assert SIZE < total < SIZE + 4096
            assert b"one-gib.bin" in tail and b"PK\x05\x06" in tail  # central directory and its end record
    finally:
        agent.stop()
        shutil.rmtree(agent.volume_root(), ignore_errors=True)
    assert_clean_log(agent)
