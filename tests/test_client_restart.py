"""Upload sessions survive a real SIGKILL of the agent, and a reboot: HEAD reports only bytes that are really
there (every acknowledged byte after a kill, the synced ones after a reboot), and tus resumes."""

from __future__ import annotations

import io
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import jwt
from tusclient.uploader import Uploader

from tests.client_helpers import MiB, create_vfolder, head, patch, staged_file, upload_token, vfolder_path
from tests.support import assert_clean_log, make_agent


def _wait_for(cond, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return False


def _resume_with_tuspy(agent, token: str, data: bytes, offset: int) -> None:  # noqa: ANN001 - AgentProcess
    """tuspy asks the agent for the offset (HEAD), which must be ``offset``, and sends the rest."""
    url = str(httpx.URL(agent.client_url + "/upload", params={"token": token}))
    uploader = Uploader(file_stream=io.BytesIO(data), url=url, chunk_size=4 * MiB)
    assert uploader.offset == offset
    uploader.upload()


def test_sigkill_mid_patch_then_resume_with_tuspy(tmp_path: Path) -> None:
    agent = make_agent(tmp_path / "a").start()
    try:
        data = os.urandom(24 * MiB)
        with agent.client() as api:
            vfid = create_vfolder(api)
            token = upload_token(api, vfid, "deep/resumed.bin", len(data))
        staged = staged_file(agent, token)

        with httpx.Client(base_url=agent.client_url, timeout=30) as cli:
            assert patch(cli, token, 0, data[: 3 * MiB]).status_code == 204  # acknowledged

        # a second PATCH streams slowly; the agent is killed after it wrote some (unacknowledged) bytes
        release = threading.Event()

        def slow() -> Iterator[bytes]:
            for i in range(3, 12):
                yield data[i * MiB : (i + 1) * MiB]
            release.wait(30)
            yield data[12 * MiB : 13 * MiB]

        def send() -> None:
            with httpx.Client(base_url=agent.client_url, timeout=30) as c:
                try:
                    patch(c, token, 3 * MiB, slow())
                except httpx.HTTPError:
                    pass  # the agent died under it

        with ThreadPoolExecutor(1) as pool:
            fut = pool.submit(send)
            assert _wait_for(lambda: staged.exists() and staged.stat().st_size > 3 * MiB), "no bytes staged"
            agent.kill()  # SIGKILL, mid-body
            release.set()
            fut.result()
        assert staged.stat().st_size > 3 * MiB, "the unacknowledged tail should be on disk before the restart"

        agent.start()
        with httpx.Client(base_url=agent.client_url, timeout=30) as cli:
            h = head(cli, token)
            assert h.status_code == 200
            assert h.headers["Upload-Offset"] == str(3 * MiB)
            assert h.headers["Upload-Length"] == str(len(data))
        assert staged.stat().st_size == 3 * MiB, "start-up must cut the staged file back to the recorded offset"
        assert not (vfolder_path(agent, vfid) / "deep").exists()

        _resume_with_tuspy(agent, token, data, 3 * MiB)
        assert (vfolder_path(agent, vfid) / "deep" / "resumed.bin").read_bytes() == data
        assert not staged.exists()
    finally:
        agent.stop()
    assert "cut" in agent.log() and "back to the recorded offset" in agent.log()
    assert_clean_log(agent)


def test_sigkill_between_patches_keeps_exact_offset_and_completed_uploads(tmp_path: Path) -> None:
    agent = make_agent(tmp_path / "a").start()
    try:
        with agent.client() as api:
            vfid = create_vfolder(api)
            done = upload_token(api, vfid, "done.bin", 5)
            part = upload_token(api, vfid, "part.bin", 10)
        with httpx.Client(base_url=agent.client_url, timeout=30) as cli:
            assert patch(cli, done, 0, b"12345").status_code == 204
            assert patch(cli, part, 0, b"abcd").status_code == 204
        agent.kill()
        agent.start()
        with httpx.Client(base_url=agent.client_url, timeout=30) as cli:
            h = head(cli, done)
            assert h.status_code == 404 or h.headers["Upload-Offset"] == "5"
            assert head(cli, part).headers["Upload-Offset"] == "4"
            # killed in this boot: the acknowledged bytes were still in the page cache; start-up made them durable
            assert _session(agent, part)[:2] == (4, 4)
            assert patch(cli, part, 4, b"efghij").status_code == 204
        root = vfolder_path(agent, vfid)
        assert (root / "done.bin").read_bytes() == b"12345"
        assert (root / "part.bin").read_bytes() == b"abcdefghij"
    finally:
        agent.stop()
    assert_clean_log(agent)


def _session(agent, token: str) -> tuple[int, int, str | None]:  # noqa: ANN001 - AgentProcess
    """(received, synced, boot_id) of the token's session row, read straight from the catalogue file."""
    sid = jwt.decode(token, options={"verify_signature": False})["session"]
    with sqlite3.connect(agent.workdir / "catalog.db") as db:
        return db.execute(
            "SELECT received, synced, boot_id FROM upload_sessions WHERE session_id = ?", (sid,)
        ).fetchone()


def test_after_a_reboot_only_synced_bytes_are_trusted_and_tus_resends_the_rest(tmp_path: Path) -> None:
    """A power cut can leave acknowledged but unsynced bytes zero-filled: after a reboot (another boot id in the
    session row) start-up cuts the staged file back to the synced offset, HEAD says so, and tuspy finishes the
    file byte-identical."""
    agent = make_agent(tmp_path / "a").start()
    try:
        data = os.urandom(24 * MiB)
        with agent.client() as api:
            vfid = create_vfolder(api)
            token = upload_token(api, vfid, "after-reboot.bin", len(data))
        staged = staged_file(agent, token)
        with httpx.Client(base_url=agent.client_url, timeout=30) as cli:
            assert patch(cli, token, 0, data[: 8 * MiB]).status_code == 204
            assert patch(cli, token, 8 * MiB, data[8 * MiB : 16 * MiB]).status_code == 204
        agent.kill()

        received, synced, _ = _session(agent, token)
        assert received == 16 * MiB and synced <= received
        # what the row says when the reboot came before the background sync caught up (at most the first PATCH)
        synced = min(synced, 8 * MiB)
        with sqlite3.connect(agent.workdir / "catalog.db") as db:
            sid = jwt.decode(token, options={"verify_signature": False})["session"]
            db.execute(
                "UPDATE upload_sessions SET synced = ?, boot_id = 'a-boot-before-the-power-cut' WHERE session_id = ?",
                (synced, sid),
            )
        with open(staged, "r+b") as f:  # the unsynced tail did not survive the power cut
            f.seek(synced)
            f.write(bytes(received - synced))

        agent.start()
        with httpx.Client(base_url=agent.client_url, timeout=30) as cli:
            assert head(cli, token).headers["Upload-Offset"] == str(synced)
        assert staged.stat().st_size == synced
        assert _session(agent, token)[:2] == (synced, synced)

        _resume_with_tuspy(agent, token, data, synced)
        assert (vfolder_path(agent, vfid) / "after-reboot.bin").read_bytes() == data
    finally:
        agent.stop()
    assert "written before a reboot" in agent.log()
    assert_clean_log(agent)


def test_a_clean_stop_records_every_acknowledged_byte_as_synced(tmp_path: Path) -> None:
    """A reboot after a clean stop must not cost the client a resend: stop waits for the background syncs."""
    agent = make_agent(tmp_path / "a").start()
    try:
        with agent.client() as api:
            vfid = create_vfolder(api)
            token = upload_token(api, vfid, "half.bin", 8 * MiB)
        with httpx.Client(base_url=agent.client_url, timeout=30) as cli:
            assert patch(cli, token, 0, os.urandom(4 * MiB)).status_code == 204
    finally:
        agent.stop()
    assert _session(agent, token) == (4 * MiB, 4 * MiB, None)
    assert_clean_log(agent)
