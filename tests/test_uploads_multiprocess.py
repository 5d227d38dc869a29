"""Upload sessions and metrics shared by several agent processes of one node (issue 21, item 3).

Two real ``storage-agent serve`` processes on one config: one catalogue, one volume, one lock directory,
the same secrets; only their ports differ. The second runs with ``[usage] enabled = false``: two usage
engines would watch the same volume and write the same figures (with num-proc, only the engine process
runs it). Both run the upload sweeper, which holds each session the way a PATCH does (flock on the staged
file), so it is safe beside any other process; the second starts before any upload exists, so its start-up
reconciliation finds nothing to touch. Every PATCH goes on a connection of its own, as the Backend.AI SDK
sends them (one 16 MiB chunk per connection), so consecutive chunks of one upload land on either process.
"""

from __future__ import annotations

import copy
import hashlib
import io
import os
import random
import signal
import sqlite3
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import jwt
import pytest
from prometheus_client.parser import text_string_to_metric_families
from tusclient.uploader import Uploader

from agent.http import metrics
from agent.http.upload_sessions import BUSY
from tests.client_helpers import (
    TUS,
    MiB,
    create_vfolder,
    head,
    paused_body,
    staged_file,
    staging_dir,
    upload_token,
    vfolder_path,
)
from tests.support import AgentProcess, assert_clean_log, eventually, free_port, make_agent

VOL = "local"


def _twin(first: AgentProcess, workdir: Path) -> AgentProcess:
    """A second process on ``first``'s config: same catalogue, volume and secrets; its own ports and log."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(first.config)
    for listener in ("client", "manager"):
        config["api"][listener]["service-addr"]["port"] = free_port()
    config.setdefault("usage", {})["enabled"] = False
    return AgentProcess(workdir, config)


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[AgentProcess, AgentProcess]]:
    a = make_agent(tmp_path / "a").start()
    b = _twin(a, tmp_path / "b")
    try:
        b.start()
        yield a, b
    finally:
        b.stop()
        a.stop()
    assert_clean_log(a)
    assert_clean_log(b)


def _patch(agent: AgentProcess, token: str, offset: int, data: object) -> httpx.Response:
    """One PATCH on a new connection (what the SDK does for each chunk)."""
    headers = dict(TUS, **{"Upload-Offset": str(offset)})
    with httpx.Client(base_url=agent.client_url, timeout=60) as c:
        return c.patch("/upload", params={"token": token}, content=data, headers=headers)


def _head(agent: AgentProcess, token: str) -> httpx.Response:
    with httpx.Client(base_url=agent.client_url, timeout=60) as c:
        return head(c, token)


def _staged_left(agent: AgentProcess, vfid: str) -> list[str]:
    d = staging_dir(agent, vfid)
    return sorted(os.listdir(d)) if d.exists() else []


# -- (a) one upload, its PATCHes spread over both processes -------------------------------------------------


def test_tuspy_upload_alternating_between_processes_is_byte_identical(pair) -> None:  # noqa: ANN001
    a, b = pair
    data = os.urandom(9 * MiB + 12345)
    with a.client() as api:
        vfid = create_vfolder(api)
        token = upload_token(api, vfid, "dir/tus.bin", len(data))
    urls = [str(httpx.URL(p.client_url + "/upload", params={"token": token})) for p in (a, b)]
    uploader = Uploader(file_stream=io.BytesIO(data), url=urls[0], chunk_size=2 * MiB + 7)
    chunks = 0
    while uploader.offset < len(data):
        uploader.set_url(urls[chunks % 2])  # tuspy sends each PATCH with requests: a new connection each
        uploader.upload_chunk()
        chunks += 1
    assert chunks == 5
    assert (vfolder_path(a, vfid) / "dir" / "tus.bin").read_bytes() == data
    assert _staged_left(a, vfid) == []
    assert _head(b, token).headers["Upload-Offset"] == str(len(data))


@pytest.mark.parametrize("seed", [random.randrange(1 << 30) for _ in range(3)])
def test_seeded_patches_over_both_processes_publish_the_exact_bytes(pair, seed: int) -> None:  # noqa: ANN001
    """Random chunk sizes (small ones through aiohttp, ≥ 2 MiB spliced), each to a random process, a HEAD to a
    random process between them; sometimes a chunk is sent again at a stale offset (409, nothing written)."""
    print(f"seed {seed}")
    rng = random.Random(seed)
    a, b = pair
    procs = (a, b)
    size = rng.randrange(4 * MiB, 20 * MiB)
    data = rng.randbytes(size)
    with a.client() as api:
        vfid = create_vfolder(api)
        token = upload_token(api, vfid, "seeded.bin", size)
    offset = 0
    while offset < size:
        n = min(size - offset, rng.choice([rng.randrange(1, 64 << 10), rng.randrange(2 * MiB, 6 * MiB)]))
        r = _patch(rng.choice(procs), token, offset, data[offset : offset + n])
        assert r.status_code == 204, (seed, offset, n, r.text)
        assert int(r.headers["Upload-Offset"]) == offset + n
        if offset and rng.random() < 0.3:  # a retry of an old chunk: refused, named, nothing written
            stale = _patch(rng.choice(procs), token, offset, data[offset : offset + n])
            assert stale.status_code == 409 and stale.json()["offset"] == offset + n, stale.text
        offset += n
        if offset < size:
            assert _head(rng.choice(procs), token).headers["Upload-Offset"] == str(offset)
    got = (vfolder_path(a, vfid) / "seeded.bin").read_bytes()
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest(), seed
    assert _staged_left(a, vfid) == []


def _session(agent: AgentProcess, token: str) -> tuple[int, int, str | None]:
    """(received, synced, boot_id) of the token's session, read from the catalogue file."""
    sid = jwt.decode(token, options={"verify_signature": False})["session"]
    con = sqlite3.connect(f"file:{agent.workdir / 'catalog.db'}?mode=ro", uri=True, timeout=10)
    try:
        return con.execute(
            "SELECT received, synced, boot_id FROM upload_sessions WHERE session_id = ?", (sid,)
        ).fetchone()
    finally:
        con.close()


def test_a_background_sync_records_its_durable_offset_for_every_process(pair) -> None:  # noqa: ANN001
    """The bytes a process synced in the background are recorded as they land, not with that process's next
    PATCH of the session (which may never come: the next one may land on the other process)."""
    a, b = pair
    data = os.urandom(5 * MiB)
    with a.client() as api:
        vfid = create_vfolder(api)
        token = upload_token(api, vfid, "synced.bin", len(data))
    assert _patch(a, token, 0, data[: 3 * MiB]).status_code == 204
    assert eventually(lambda: _synced_all(a, token)) == (3 * MiB, 3 * MiB, None)
    assert _patch(b, token, 3 * MiB, data[3 * MiB : 4 * MiB]).status_code == 204
    assert eventually(lambda: _synced_all(a, token)) == (4 * MiB, 4 * MiB, None)
    assert _patch(a, token, 4 * MiB, data[4 * MiB :]).status_code == 204
    assert (vfolder_path(a, vfid) / "synced.bin").read_bytes() == data


def _synced_all(agent: AgentProcess, token: str) -> tuple[int, int, str | None]:
    row = _session(agent, token)
    assert row[1] == row[0], row
    return row


# -- (b) two PATCHes of one session at once, one on each process ----------------------------------------------


@pytest.mark.parametrize("second_spliced", [False, True])
def test_a_patch_racing_one_on_the_other_process_is_refused_as_in_one(pair, second_spliced: bool) -> None:  # noqa: ANN001
    """Exactly what one process answers (tests/test_client_upload.py): the second PATCH at the same offset
    gets 409 with the same msg while the first runs, and the file holds the first one's bytes only."""
    a, b = pair
    with a.client() as api:
        vfid = create_vfolder(api)
        token = upload_token(api, vfid, "race.bin", 4 * MiB)
    staged = staged_file(a, token)
    release = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(_patch, a, token, 0, paused_body(b"a" * MiB, b"a" * 3 * MiB, release))
        eventually(lambda: _held(staged))
        second = _patch(b, token, 0, b"b" * 4 * MiB if second_spliced else iter([b"b" * 4 * MiB]))
        assert _head(b, token).headers["Upload-Offset"] == "0"  # nothing acknowledged yet
        release.set()
        assert second.status_code == 409, second.text
        assert second.json()["msg"] == BUSY
        assert first.result().status_code == 204
    assert (vfolder_path(a, vfid) / "race.bin").read_bytes() == b"a" * 4 * MiB
    assert _staged_left(a, vfid) == []


def _assert(ok: bool) -> None:
    assert ok


def _held(staged: Path) -> None:
    """The staged file exists and a process holds its flock (read from /proc/locks: a probe with flock of
    its own could take the lock in the instant between the PATCH's create and its flock)."""
    try:
        st = staged.stat()
    except FileNotFoundError:
        raise AssertionError(f"{staged} does not exist yet") from None
    where = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    held = [
        line for line in Path("/proc/locks").read_text().splitlines()
        if line.split()[1:4] == ["FLOCK", "ADVISORY", "WRITE"] and line.split()[5] == where
    ]
    assert held, f"nobody holds {staged}"


@pytest.mark.parametrize("seed", [random.randrange(1 << 30) for _ in range(2)])
def test_seeded_concurrent_pairs_never_interleave(pair, seed: int) -> None:  # noqa: ANN001
    """Rounds of two PATCHes at the same offset sent at once, one to each process, with different bytes and
    random sizes: exactly one is taken (204); the other is refused (409: busy, or the offset moved), and the
    published file is the winners' bytes in order, nothing of a loser."""
    print(f"seed {seed}")
    rng = random.Random(seed)
    a, b = pair
    rounds = [(rng.randrange(1, 3 * MiB), rng.randrange(1, 3 * MiB)) for _ in range(6)]
    size = sum(max(x, y) for x, y in rounds)  # enough room for any winner; the tail is sent at the end
    with a.client() as api:
        vfid = create_vfolder(api)
        token = upload_token(api, vfid, "pairs.bin", size)
    expected = bytearray()
    offset = 0
    with ThreadPoolExecutor(2) as pool:
        for i, (na, nb) in enumerate(rounds):
            bodies = {a.client_url: bytes([65 + i]) * na, b.client_url: bytes([97 + i]) * nb}
            order = [a, b] if rng.random() < 0.5 else [b, a]
            futures = {p.client_url: pool.submit(_patch, p, token, offset, bodies[p.client_url]) for p in order}
            answers = {url: f.result() for url, f in futures.items()}
            won = [url for url, r in answers.items() if r.status_code == 204]
            assert len(won) == 1, (seed, i, {u: (r.status_code, r.text) for u, r in answers.items()})
            lost = next(r for url, r in answers.items() if url not in won)
            assert lost.status_code == 409, (seed, i, lost.text)
            assert lost.json()["msg"] == BUSY or "does not match the current offset" in lost.json()["msg"], lost.text
            expected += bodies[won[0]]
            offset += len(bodies[won[0]])
            assert int(answers[won[0]].headers["Upload-Offset"]) == offset
    tail = bytes(size - offset)
    assert _patch(rng.choice((a, b)), token, offset, tail).status_code == 204
    expected += tail
    assert (vfolder_path(a, vfid) / "pairs.bin").read_bytes() == bytes(expected), seed
    assert _staged_left(a, vfid) == []


# -- (c) the vfolder deleted through one process while a PATCH streams on the other -----------------------------


def test_deleting_the_vfolder_on_one_process_ends_a_patch_streaming_on_the_other(pair) -> None:  # noqa: ANN001
    a, b = pair
    with a.client() as api:
        vfid = create_vfolder(api)
        token = upload_token(api, vfid, "z.bin", 3 * MiB)
    qsid = vfid.partition("/")[0]
    staged = staged_file(a, token)
    deleted = threading.Event()

    def body() -> Iterator[bytes]:
        yield b"a" * MiB
        eventually(lambda: _held(staged))  # B holds it and writes
        with a.client() as api:
            r = api.post("/folder/delete", json={"volume": VOL, "vfid": vfid})
        assert r.status_code == 204, r.text
        deleted.set()
        yield b"b" * MiB

    r = _patch(b, token, 0, body())
    assert deleted.is_set()
    assert r.status_code == 404 and "no-such-upload-session" in r.text, r.text
    assert not staged.exists(), "the PATCH re-created or kept bytes of a deleted vfolder's upload"
    for p in (a, b):
        assert _head(p, token).status_code == 404
        assert _patch(p, token, 0, b"x").status_code == 404
    assert _staged_left(a, vfid) == []
    with b.client() as api:  # nothing of the upload is left in the scope: it can go
        r = api.request("DELETE", "/quota-scope", json={"volume": VOL, "qsid": qsid})
        assert r.status_code == 204, r.text


def test_expired_sessions_are_swept_beside_a_patch_on_another_process(tmp_path: Path) -> None:
    """Both processes sweep (every second here); a session one of them is writing is never swept under it."""
    a = make_agent(tmp_path / "a", storage_proxy={"session-expire": "3s"}).start()
    b = _twin(a, tmp_path / "b")
    try:
        b.start()
        with a.client() as api:
            vfid = create_vfolder(api)
            idle = upload_token(api, vfid, "idle.bin", 10)
            busy = upload_token(api, vfid, "busy.bin", 2 * MiB)
        assert _patch(b, idle, 0, b"01234").status_code == 204
        release = threading.Event()
        with ThreadPoolExecutor(1) as pool:
            running = pool.submit(_patch, a, busy, 0, paused_body(b"s" * MiB, b"s" * MiB, release))
            eventually(lambda: _assert(not staged_file(a, idle).exists()), timeout=30)  # idle one swept
            time.sleep(2.5)  # the busy one expired meanwhile: every sweep of both processes skipped it
            _held(staged_file(a, busy))
            release.set()
            r = running.result()
        # it ran past its expiry: published, or (swept right after it let go) gone — never half of either
        final = vfolder_path(a, vfid) / "busy.bin"
        assert r.status_code in (204, 404), r.text
        if r.status_code == 204:
            assert final.read_bytes() == b"s" * 2 * MiB
        else:
            assert not final.exists()
        eventually(lambda: _assert(_staged_left(a, vfid) == []), timeout=30)
    finally:
        b.stop()
        a.stop()
    assert_clean_log(a)
    assert_clean_log(b)


# -- metrics: every process's counts, summed -----------------------------------------------------------------


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def test_metrics_of_one_process_show_the_totals_of_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seed = random.randrange(1 << 30)
    print(f"seed {seed}")
    rng = random.Random(seed)
    monkeypatch.setenv(metrics.MULTIPROC_ENV, "unset")  # restored after the test, whatever prepare sets
    counts = tmp_path / "metrics"
    counts.mkdir()
    (counts / "counter_1.db").write_bytes(b"left by an earlier run")
    metrics.prepare_multiprocess(counts)
    assert os.environ[metrics.MULTIPROC_ENV] == str(counts) and list(counts.iterdir()) == []
    a = make_agent(tmp_path / "a").start()
    b = _twin(a, tmp_path / "b")
    key = (
        "storage_agent_http_requests_total",
        (("listener", "manager"), ("method", "GET"), ("route", "/volumes"), ("status", "200")),
    )
    count_key = ("storage_agent_http_request_duration_seconds_count", key[1])
    try:
        b.start()
        sent = {a.manager_url: rng.randrange(1, 40), b.manager_url: rng.randrange(1, 40)}
        for p in (a, b):
            with p.client() as api:
                for _ in range(sent[p.manager_url]):
                    assert api.get("/volumes").status_code == 200
        total = sum(sent.values())
        for p in (a, b):
            with p.client() as api:
                got = _samples(api.get("/metrics").text)
            assert got[key] == total, (p.manager_url, got[key], sent)
            assert got[count_key] == total
            assert ("storage_agent_upload_sessions_open", ()) in got  # the answering process's own figures
            assert ("process_resident_memory_bytes", ()) in got
        b.proc.send_signal(signal.SIGKILL)  # a worker dies: what it answered stays counted
        b.proc.wait()
        metrics.process_exited(b.proc.pid)
        with a.client() as api:
            assert api.get("/volumes").status_code == 200
            got = _samples(api.get("/metrics").text)
        assert got[key] == total + 1
    finally:
        b.stop()
        a.stop()
    assert_clean_log(a)
