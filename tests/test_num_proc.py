"""``[storage-proxy] num-proc = N``: a supervisor, one engine process and N HTTP workers, all real processes.

Checked from the outside: the processes in /proc (each worker holds its own listening socket on each API
port, the kernel's reuseport group), the workers' answers (``X-Storage-Agent-Worker``), what survives a
SIGKILL of a worker or a stall and a SIGKILL of the engine, and that SIGTERM leaves no process behind.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support import (
    AUTH_HEADER,
    WORKER_HEADER,
    AgentProcess,
    assert_clean_log,
    cmdline,
    eventually,
    filled_vfolder,
    make_agent,
    new_vfolder,
    roles,
    walk,
    worker_pids,
)

CHUNK = 2 * 1024 * 1024  # a tus PATCH of the upload test (half of one is held in flight by the race)


def listening_inodes(port: int) -> set[int]:
    """Inodes of the sockets listening on ``port`` (/proc/net/tcp and tcp6, state 0A)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                found.add(int(cols[9]))
    return found


def socket_inodes(pid: int) -> set[int]:
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            out.add(int(link[8:-1]))
    return out


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def fresh(agent: AgentProcess) -> httpx.Client:
    """A client whose requests each take a new connection (the kernel picks the worker per connection)."""
    return httpx.Client(base_url=agent.manager_url, headers={AUTH_HEADER: agent.secret, "Connection": "close"},
                        timeout=60)


def on_worker(
    agent: AgentProcess, index: int, method: str, path: str, *, client_api: bool = False, **kw: object
) -> httpx.Response:
    """A request answered by worker ``index``: new connections until the kernel hands one to it (asked with
    ``GET /openapi.json``), then the request on that same keep-alive connection (so it is made exactly once)."""
    base, headers = (agent.client_url, {}) if client_api else (agent.manager_url, {AUTH_HEADER: agent.secret})
    for _ in range(500):
        with httpx.Client(base_url=base, headers=headers, timeout=60) as api:
            if api.get("/openapi.json").headers.get(WORKER_HEADER) != str(index):
                continue
            r = api.request(method, path, **kw)  # type: ignore[arg-type]
            assert r.headers.get(WORKER_HEADER) == str(index), r.headers
            return r
    raise AssertionError(f"no answer from worker {index} in 500 connections")


def usage(r: httpx.Response) -> dict[str, object]:
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture
def three(tmp_path: Path) -> Iterator[AgentProcess]:
    agent = make_agent(tmp_path, storage_proxy={"num-proc": 3, "pid-file": str(tmp_path / "agent.pid")})
    agent.start(timeout=120)
    try:
        yield agent
    finally:
        agent.stop()
    assert_clean_log(agent)


def test_three_workers_each_hold_a_socket_of_each_port_and_name_themselves(three: AgentProcess) -> None:
    found = roles(three)
    assert sorted(found) == ["engine", "worker 0", "worker 1", "worker 2"], found
    assert all(len(pids) == 1 for pids in found.values()), found
    assert three.proc is not None
    assert (three.workdir / "agent.pid").read_text().split() == [str(three.proc.pid)]  # the supervisor's
    for url in (three.manager_url, three.client_url):
        group = listening_inodes(port_of(url))
        assert len(group) == 3, (url, group)  # one SO_REUSEPORT socket per worker
        held = [socket_inodes(found[f"worker {i}"][0]) & group for i in range(3)]
        assert all(len(h) == 1 for h in held), held  # each worker its own one
        assert set().union(*held) == group
        assert not socket_inodes(found["engine"][0]) & group  # the engine serves no API
        assert group <= socket_inodes(three.proc.pid)  # the supervisor keeps them all open
    seen: set[str] = set()
    with fresh(three) as api:
        for _ in range(300):
            r = api.get("/status")
            assert r.status_code == 200
            seen.add(r.headers[WORKER_HEADER])
            if seen == {"0", "1", "2"}:
                break
    assert seen == {"0", "1", "2"}
    with httpx.Client(base_url=three.client_url, headers={"Connection": "close"}, timeout=60) as client:
        assert client.get("/openapi.json").headers[WORKER_HEADER] in {"0", "1", "2"}


def test_sigterm_stops_every_process(three: AgentProcess) -> None:
    assert three.proc is not None
    pids = [three.proc.pid, *(p for ps in roles(three).values() for p in ps)]
    assert len(pids) == 5
    assert three.stop() == 0
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}"), (pid, cmdline(pid) if os.path.exists(f"/proc/{pid}") else None)
    assert not (three.workdir / "agent.pid").exists()
    assert "stopped" in three.log()


def test_killed_worker_is_replaced_and_no_request_after_the_kill_fails(tmp_path: Path) -> None:
    agent = make_agent(tmp_path, storage_proxy={"num-proc": 2}).start(timeout=120)
    try:
        victim = roles(agent)["worker 0"][0]
        results: list[tuple[float, float, str | None]] = []  # (start, end, error or None)
        killed_at: list[float] = []
        stop = threading.Event()

        def hammer() -> None:
            with fresh(agent) as api:
                while not stop.is_set():
                    began = time.monotonic()
                    try:
                        r = api.get("/status")
                        error = None if r.status_code == 200 else f"status {r.status_code}"
                    except httpx.HTTPError as e:
                        error = f"{type(e).__name__}: {e}"
                    results.append((began, time.monotonic(), error))

        threads = [threading.Thread(target=hammer) for _ in range(8)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        os.kill(victim, signal.SIGKILL)
        killed_at.append(time.monotonic())
        eventually(lambda: _replaced(agent, "worker 0", victim), timeout=60)
        assert on_worker(agent, 0, "GET", "/status").status_code == 200  # the replacement answers
        time.sleep(1.0)  # connections queued on the dead worker's socket were served by it meanwhile
        stop.set()
        for t in threads:
            t.join(120)
        kill = killed_at[0]
        after = [r for r in results if r[0] > kill + 0.05]
        assert after, "no request was made after the kill"
        assert [r for r in after if r[2] is not None] == []  # queued on its socket: served by the replacement
        failed = [r for r in results if r[2] is not None]
        assert len(failed) <= len(threads), failed  # at most the one in flight per connection
        assert all(r[0] <= kill + 0.05 for r in failed), failed
        assert "HTTP worker 0 (pid" in agent.log() and "exited with signal 9" in agent.log()
        assert "restarting it in" not in agent.log()  # the first death: at once
        again = roles(agent)["worker 0"][0]
        os.kill(again, signal.SIGKILL)
        eventually(lambda: _replaced(agent, "worker 0", again), timeout=60)
        quick = roles(agent)["worker 0"][0]  # killed as soon as seen: it dies within 10 s of its start
        os.kill(quick, signal.SIGKILL)
        eventually(lambda: _replaced(agent, "worker 0", quick), timeout=60)
        line = next(x for x in agent.log().splitlines() if f"HTTP worker 0 (pid {quick}) exited" in x)
        assert "restarting it in " in line, line  # a repeated quick death: after a pause
        assert on_worker(agent, 0, "GET", "/status").status_code == 200
    finally:
        agent.stop()


def _replaced(agent: AgentProcess, role: str, old: int) -> None:
    now = roles(agent).get(role, [])
    assert now and old not in now, now


def test_engine_stalled_then_killed_usage_stays_answered_and_comes_back(tmp_path: Path) -> None:
    agent = make_agent(tmp_path, storage_proxy={"num-proc": 2}).start(timeout=120)
    try:
        with agent.client() as api:
            vfid = new_vfolder(api, "qs" + uuid.uuid4().hex[:8])
        root = _root(agent, vfid)
        (root / "a.bin").write_bytes(os.urandom(10_000))
        query = {"json": {"volume": "local", "vfid": vfid}}

        def right(index: int, *, stale: bool | None = None) -> dict[str, object]:
            body = usage(on_worker(agent, index, "GET", "/folder/usage", **query))
            count, size, _ = walk(root)
            assert (body["file_count"], body["used_bytes"]) == (count, size), body
            if stale is not None:
                assert body["stale"] is stale, body
            return body

        eventually(lambda: right(0, stale=False))
        engine = roles(agent)["engine"][0]
        os.kill(engine, signal.SIGSTOP)  # a stalled engine: the heartbeat ages, the workers still answer
        try:
            for i in (0, 1):
                eventually(lambda i=i: right(i, stale=True), timeout=60)
            unknown = f"{vfid.split('/')[0]}/{uuid.uuid4().hex}"  # on disk, never measured: "not known", stale
            _root(agent, unknown).mkdir(parents=True)
            body = usage(on_worker(agent, 1, "GET", "/folder/usage", json={"volume": "local", "vfid": unknown}))
            assert (body["file_count"], body["used_bytes"], body["stale"]) == (-1, -1, True), body
        finally:
            os.kill(engine, signal.SIGKILL)
        eventually(lambda: _replaced(agent, "engine", engine), timeout=60)
        (root / "b.bin").write_bytes(os.urandom(5_000))  # followed again once the new engine watches
        for i in (0, 1):
            eventually(lambda i=i: right(i, stale=False), timeout=60)
        assert "engine (pid" in agent.log() and "exited with signal 9" in agent.log()
    finally:
        agent.stop()


def test_vfolder_made_through_one_worker_is_seen_by_the_others_and_measured(three: AgentProcess) -> None:
    qsid = "qs" + uuid.uuid4().hex[:8]
    assert on_worker(three, 0, "POST", "/quota-scope", json={"volume": "local", "qsid": qsid}).status_code == 204
    vfid = f"{qsid}/{uuid.uuid4().hex}"
    assert on_worker(three, 1, "POST", "/folder/create", json={"volume": "local", "vfid": vfid}).status_code == 204
    query = {"json": {"volume": "local", "vfid": vfid}}
    vfolders = [vfid]
    for i in range(3):  # a first figure within the first-answer wait, whichever worker is asked
        assert usage(on_worker(three, i, "GET", "/folder/usage", **query))["file_count"] == 0
    root = _root(three, vfid)
    (root / "d").mkdir()
    (root / "d" / "f.bin").write_bytes(os.urandom(123_456))
    (root / "g.txt").write_bytes(b"x" * 777)

    def right(index: int) -> None:
        body = usage(on_worker(three, index, "GET", "/folder/usage", **query))
        count, size, alloc = walk(root)
        assert (body["file_count"], body["used_bytes"], body["pending"]) == (count, size, False), body
        r = on_worker(three, index, "GET", "/folder/used-bytes", **query)
        assert r.json()["used_bytes"] == alloc, r.text
        r = on_worker(three, index, "GET", "/quota-scope", json={"volume": "local", "qsid": qsid})
        assert r.json()["used_bytes"] == sum(walk(_root(three, v))[2] for v in vfolders), r.text

    for i in range(3):
        eventually(lambda i=i: right(i), timeout=60)
    clone = f"{qsid}/{uuid.uuid4().hex}"
    r = on_worker(three, 2, "POST", "/folder/clone",
                  json={"src_volume": "local", "src_vfid": vfid, "dst_volume": "local", "dst_vfid": clone})
    assert r.status_code == 204, r.text
    vfolders.append(clone)
    for i in range(3):
        eventually(lambda i=i: _same_usage(three, i, vfid, clone), timeout=60)
    before = _scanned_at(three, vfid)
    r = on_worker(three, 0, "POST", "/folder/usage/refresh", **query)
    assert r.status_code == 202, r.text

    def rescanned() -> None:  # the request reached the engine: a new full scan landed
        assert _scanned_at(three, vfid) > before

    eventually(rescanned, timeout=60)
    for i in range(3):
        eventually(lambda i=i: right(i), timeout=60)
    assert on_worker(three, 2, "POST", "/folder/delete", **query).status_code == 204
    for i in range(3):
        r = on_worker(three, i, "GET", "/folder/usage", **query)
        assert 400 <= r.status_code < 500, r.text

    def forgotten() -> None:  # the engine forgot its figure too
        assert _catalogue(three, "SELECT count(*) FROM vfolder_usage WHERE folder_id = ?", vfid[-32:]) == [(0,)]

    eventually(forgotten, timeout=60)


def _root(agent: AgentProcess, vfid: str) -> Path:
    qsid, folder = vfid.split("/")
    return agent.volume_root() / qsid / folder[:2] / folder[2:4] / folder[4:]


def _catalogue(agent: AgentProcess, sql: str, *args: object) -> list[tuple[object, ...]]:
    db = sqlite3.connect(f"file:{agent.workdir / 'catalog.db'}?mode=ro", uri=True)
    try:
        return db.execute(sql, args).fetchall()
    finally:
        db.close()


def _scanned_at(agent: AgentProcess, vfid: str) -> float:
    rows = _catalogue(agent, "SELECT scanned_at FROM usage_vfolders WHERE folder_id = ?", vfid[-32:])
    assert rows and rows[0][0] is not None, rows
    return float(rows[0][0])  # type: ignore[arg-type]


def _same_usage(agent: AgentProcess, index: int, a: str, b: str) -> None:
    one = usage(on_worker(agent, index, "GET", "/folder/usage", json={"volume": "local", "vfid": a}))
    two = usage(on_worker(agent, index, "GET", "/folder/usage", json={"volume": "local", "vfid": b}))
    assert (one["file_count"], one["used_bytes"]) == (two["file_count"], two["used_bytes"]), (one, two)
    assert not two["stale"], two


@pytest.mark.skipif(os.geteuid() != 0, reason="starting an agent as root needs root")
def test_root_start_every_process_runs_as_the_configured_user(tmp_path: Path) -> None:
    """The supervisor binds (a port below 1024 too) and switches before it starts anyone: the engine and
    the workers are the user, with the kept capabilities, and use them."""
    from agent.runtime.privileges import BASE, CAP_SYS_ADMIN
    from tests.test_privileges import GROUP, USER, _ids, _privileged_port, _status

    uid, gid = _ids()
    agent = make_agent(tmp_path, storage_proxy={"num-proc": 2, "user": USER, "group": GROUP})
    agent.config["api"]["client"]["service-addr"]["port"] = _privileged_port()
    agent.start(timeout=120)
    try:
        assert agent.proc is not None
        kept = sum(1 << c for c in BASE | {CAP_SYS_ADMIN})
        deadline = time.monotonic() + 60
        pids = [agent.proc.pid, *(p for ps in roles(agent).values() for p in ps)]
        assert len(pids) == 4
        for pid in pids:
            status = _status(pid)
            assert status["Uid"].split() == [str(uid)] * 4, (pid, status["Uid"])
            assert status["Gid"].split() == [str(gid)] * 4, (pid, status["Gid"])
            assert int(status["CapEff"], 16) == kept and int(status["CapAmb"], 16) == kept, (pid, status["CapEff"])
        seen = set()  # both workers serve the port below 1024 that the supervisor bound as root
        while seen != {"0", "1"}:
            r = httpx.get(f"{agent.client_url}/openapi.json", headers={"Connection": "close"}, timeout=60)
            assert r.status_code == 200
            seen.add(r.headers[WORKER_HEADER])
            assert len(seen) == 2 or time.monotonic() < deadline
        qsid = "qs" + uuid.uuid4().hex[:8]
        assert on_worker(agent, 1, "POST", "/quota-scope", json={"volume": "local", "qsid": qsid}).status_code == 204
        vfid = f"{qsid}/{uuid.uuid4().hex}"
        assert on_worker(agent, 0, "POST", "/folder/create", json={"volume": "local", "vfid": vfid}).status_code == 204
        where = _root(agent, vfid)
        assert (where.stat().st_uid, where.stat().st_gid) == (uid, gid)
        inner = where / "locked"  # another user's file in a directory only root may write: removed all the same
        inner.mkdir()
        (inner / "f").write_bytes(b"x" * 10)
        os.chown(inner / "f", 12345, 12345)
        inner.chmod(0o500)
        os.chown(inner, 0, 0)
        r = on_worker(agent, 1, "POST", "/folder/delete", json={"volume": "local", "vfid": vfid})
        assert r.status_code in (200, 204), r.text
        eventually(lambda: not where.exists(), timeout=30)
    finally:
        assert agent.stop() == 0, agent.log()
    assert_clean_log(agent)


def test_one_upload_patched_through_every_worker_is_byte_identical(three: AgentProcess) -> None:
    """Each PATCH of one tus session on another worker (as the SDK's one connection per chunk does); a
    PATCH racing one in flight on another worker is refused with 409, as within one process."""
    from tests.client_helpers import TUS, upload_token

    with three.client() as api:
        vfid = new_vfolder(api, "qs" + uuid.uuid4().hex[:8])
        data = os.urandom(9 * CHUNK + 17)
        token = upload_token(api, vfid, "spread.bin", len(data))
    chunks = [data[i : i + CHUNK] for i in range(0, len(data), CHUNK)]
    offset = 0
    for n, chunk in enumerate(chunks):
        worker = n % 3
        r = on_worker(three, worker, "HEAD", "/upload", client_api=True, params={"token": token},
                      headers={"Tus-Resumable": "1.0.0"})
        assert int(r.headers["Upload-Offset"]) == offset, (worker, r.headers)
        if n == 4:  # one PATCH in flight on worker 1 while worker 2 tries the same offset
            _race(three, token, offset, chunk)
        else:
            r = on_worker(three, worker, "PATCH", "/upload", client_api=True, params={"token": token},
                          content=chunk, headers=dict(TUS, **{"Upload-Offset": str(offset)}))
            assert r.status_code == 204, r.text
        offset += len(chunk)
    assert (_root(three, vfid) / "spread.bin").read_bytes() == data


def _race(agent: AgentProcess, token: str, offset: int, chunk: bytes) -> None:
    from tests.client_helpers import TUS, staged_file

    release = threading.Event()
    headers = dict(TUS, **{"Upload-Offset": str(offset)})

    def slow() -> Iterator[bytes]:
        yield chunk[: CHUNK // 2]
        release.wait(30)
        yield chunk[CHUNK // 2 :]

    held: list[httpx.Response] = []

    def first() -> None:
        held.append(on_worker(agent, 1, "PATCH", "/upload", client_api=True, params={"token": token},
                              content=slow(), headers=headers))

    thread = threading.Thread(target=first)
    thread.start()
    try:
        pid = roles(agent)["worker 1"][0]
        eventually(lambda: _flocked(staged_file(agent, token), pid))  # the PATCH holds its session
        other = on_worker(agent, 2, "PATCH", "/upload", client_api=True, params={"token": token}, content=chunk,
                          headers=headers)
    finally:
        release.set()
        thread.join(60)
    assert other.status_code == 409, other.text
    assert held and held[0].status_code == 204, held


def _flocked(path: Path, pid: int) -> None:
    """``path`` has a flock held by process ``pid`` (/proc/locks: ``FLOCK ADVISORY WRITE pid maj:min:inode``)."""
    ino = path.stat().st_ino
    held = [line.split() for line in Path("/proc/locks").read_text().splitlines() if " FLOCK " in line]
    assert any(f[4] == str(pid) and f[5].rsplit(":", 1)[1] == str(ino) for f in held if len(f) > 5), held


def test_metrics_from_any_worker_count_every_worker(three: AgentProcess) -> None:
    """prometheus-client's multiprocess mode, set up by the supervisor: /metrics answered by one worker sums
    what every worker answered, a killed one's included."""
    from prometheus_client.parser import text_string_to_metric_families

    def count() -> float:
        with fresh(three) as api:
            text = api.get("/metrics").text
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                if s.name == "storage_agent_http_requests_total" and s.labels.get("route") == "/volumes":
                    return s.value
        return 0.0

    assert (three.workdir / "catalog.db.metrics").is_dir()
    sent = 0
    answered: set[str] = set()
    with fresh(three) as api:
        while answered != {"0", "1", "2"} or sent < 30:
            r = api.get("/volumes")
            assert r.status_code == 200
            answered.add(r.headers[WORKER_HEADER])
            sent += 1
    assert count() == sent
    victim = roles(three)["worker 2"][0]
    os.kill(victim, signal.SIGKILL)
    eventually(lambda: _replaced(three, "worker 2", victim), timeout=60)
    assert count() == sent  # what the dead worker answered stays counted


def test_an_engine_restarted_beside_workers_leaves_their_clone_in_flight_alone(tmp_path: Path) -> None:
    """The start-up reconciliation takes a clone's staged tree and running job for leftovers of a stopped
    agent. An engine restarted while the workers serve must not: the clone in flight on a worker ends as
    a complete copy (before the fix, the restarted engine removed its staging tree and failed its job)."""
    agent = make_agent(tmp_path, storage_proxy={"num-proc": 2}).start(timeout=120)
    try:
        with fresh(agent) as api:
            vfid, src = filled_vfolder(agent, api, 100, 400)
        staging = agent.volume_root() / "qs" / ".staging"
        dst = f"qs/{uuid.uuid4().hex}"
        answer: list[httpx.Response] = []

        def clone() -> None:
            with fresh(agent) as api:
                answer.append(api.post("/folder/clone", json={
                    "src_volume": "local", "src_vfid": vfid, "dst_volume": "local", "dst_vfid": dst}))

        thread = threading.Thread(target=clone)
        thread.start()
        eventually(lambda: _cloning(staging), timeout=60)
        engine = roles(agent)["engine"][0]
        os.kill(engine, signal.SIGKILL)
        eventually(lambda: _replaced(agent, "engine", engine), timeout=60)
        thread.join(300)
        assert answer and answer[0].status_code == 204, answer and answer[0].text
        assert walk(_root(agent, dst))[:2] == walk(src)[:2]
        assert "engine restarted beside live HTTP workers" in agent.log()
        assert "leftover" not in agent.log()
    finally:
        agent.stop()
    assert_clean_log(agent)


def _cloning(staging: Path) -> None:
    assert staging.is_dir() and any(p.name.startswith("clone-") for p in staging.iterdir())


def test_a_write_through_an_outside_hard_link_reaches_the_workers_answers(tmp_path: Path) -> None:
    """A file of the vfolder whose inode also has a name outside it: an append through that name reaches no
    event of the vfolder. One process re-reads such links when it answers; with workers answering from the
    catalogue, the engine re-reads them on a short schedule (before: the old figure, ``stale: false``, for good)."""
    agent = make_agent(tmp_path, storage_proxy={"num-proc": 2}).start(timeout=120)
    try:
        with fresh(agent) as api:
            vfid = new_vfolder(api, "qs")
            (_root(agent, vfid) / "f").write_bytes(b"x" * 1000)
            outside = agent.volume_root() / "qs" / "outside-name"
            os.link(_root(agent, vfid) / "f", outside)
            body = {"volume": "local", "vfid": vfid}

            def settled(size: int) -> None:
                u = usage(api.request("GET", "/folder/usage", json=body))
                assert (u["used_bytes"], u["stale"], u["pending"]) == (size, False, False), u

            eventually(lambda: settled(1000), timeout=60)
            with outside.open("ab") as f:
                f.write(b"y" * 5000)
            eventually(lambda: settled(6000), timeout=30)
    finally:
        agent.stop()
    assert_clean_log(agent)


def _clone_jobs(agent: AgentProcess) -> dict[str, tuple[str, str | None, dict[str, object]]]:
    """Clone jobs by destination: (state, error, params)."""
    import json

    rows = _catalogue(agent, "SELECT params, state, error FROM jobs WHERE kind = 'clone'")
    out = {}
    for params, state, error in rows:
        p = json.loads(str(params))
        out[str(p["dst"])] = (str(state), error if error is None else str(error), p)
    return out


def test_a_clone_of_a_killed_worker_is_rolled_back_while_the_live_workers_clone_completes(tmp_path: Path) -> None:
    """Two clones at once, one on each worker; worker 0 is killed mid-copy. Its staged tree and running job
    are settled soon after (before: they waited for the next full start), the clone on worker 1 is not
    touched and completes."""
    agent = make_agent(tmp_path, storage_proxy={"num-proc": 2}).start(timeout=120)
    try:
        with fresh(agent) as api:
            vfid, src = filled_vfolder(agent, api, 60, 300)
        staging = agent.volume_root() / "qs" / ".staging"
        dsts = [f"qs/{uuid.uuid4().hex}" for _ in range(2)]
        answers: dict[int, httpx.Response | str] = {}

        def clone(index: int) -> None:
            body = {"src_volume": "local", "src_vfid": vfid, "dst_volume": "local", "dst_vfid": dsts[index]}
            try:
                answers[index] = on_worker(agent, index, "POST", "/folder/clone", json=body)
            except httpx.HTTPError as e:
                answers[index] = f"{type(e).__name__}: {e}"

        threads = [threading.Thread(target=clone, args=(i,)) for i in (0, 1)]
        for t in threads:
            t.start()

        def both_staged() -> None:
            assert set(_clone_jobs(agent)) == set(dsts)
            assert staging.is_dir() and len([p for p in staging.iterdir() if p.name.startswith("clone-")]) == 2

        eventually(both_staged, timeout=120)
        victim = roles(agent)["worker 0"][0]
        live = roles(agent)["worker 1"][0]
        os.kill(victim, signal.SIGKILL)

        def settled() -> None:
            state, error, _ = _clone_jobs(agent)[dsts[0]]
            assert state == "failed" and "died" in str(error), (state, error)

        eventually(settled, timeout=60)
        for t in threads:
            t.join(300)
        assert isinstance(answers[1], httpx.Response) and answers[1].status_code == 204, answers
        assert walk(_root(agent, dsts[1]))[:2] == walk(src)[:2]
        assert _clone_jobs(agent)[dsts[1]][:2] == ("done", None)
        assert not _root(agent, dsts[0]).exists()
        assert _catalogue(agent, "SELECT count(*) FROM vfolders WHERE folder_id = ?", dsts[0][3:]) == [(0,)]
        assert not staging.exists() or list(staging.iterdir()) == []  # the dead worker's staged copy went
        owners = {dst: params["owner"] for dst, (_, _, params) in _clone_jobs(agent).items()}
        assert [owners[d]["pid"] for d in dsts] == [victim, live], owners  # type: ignore[index]
        assert f"interrupted by the death of its HTTP worker (pid {victim})" in agent.log()
    finally:
        agent.stop()
    assert_clean_log(agent)


def test_a_delete_of_a_killed_worker_is_finished_by_the_engine(tmp_path: Path) -> None:
    """Worker 0 is stopped, then killed, while it removes a deleted vfolder's tree (moved aside into the
    staging area). The engine finishes that delete soon after (before: the trash and the catalogue row waited
    for the next full start): the trash removed, the vfolder forgotten, the job done."""
    agent = make_agent(tmp_path, storage_proxy={"num-proc": 2}).start(timeout=120)
    try:
        with fresh(agent) as api:
            vfid, src = filled_vfolder(agent, api, 40, 500)
        staging = agent.volume_root() / "qs" / ".staging"
        victim = roles(agent)["worker 0"][0]
        answer: list[object] = []

        def delete() -> None:
            try:
                answer.append(on_worker(agent, 0, "POST", "/folder/delete", json={"volume": "local", "vfid": vfid}))
            except httpx.HTTPError as e:
                answer.append(e)

        thread = threading.Thread(target=delete)
        thread.start()
        deadline = time.monotonic() + 120
        while not (staging.is_dir() and any(p.name.startswith("trash-") for p in staging.iterdir())):
            assert time.monotonic() < deadline and thread.is_alive(), ("the delete never moved the tree aside", answer)
            time.sleep(0.001)
        os.kill(victim, signal.SIGSTOP)
        [trash] = [p for p in staging.iterdir() if p.name.startswith("trash-")]
        assert any(trash.iterdir()), "the removal had finished before the stop"
        os.kill(victim, signal.SIGKILL)
        thread.join(60)
        assert answer and isinstance(answer[0], httpx.HTTPError), answer  # its worker died: no answer

        def finished() -> None:
            jobs = _catalogue(agent, "SELECT state, error FROM jobs WHERE kind = 'delete'")
            assert jobs == [("done", None)], jobs

        eventually(finished, timeout=60)
        assert not trash.exists() and not src.exists()
        assert _catalogue(agent, "SELECT count(*) FROM vfolders WHERE folder_id = ?", vfid[3:]) == [(0,)]
        assert f"the delete of vfolder {vfid} was interrupted by the death of its HTTP worker (pid {victim}); " \
               "finished it (removed its trash)" in agent.log()
        with fresh(agent) as api:
            assert api.request("GET", "/folder/usage", json={"volume": "local", "vfid": vfid}).status_code == 404
            assert api.post("/folder/delete", json={"volume": "local", "vfid": vfid}).status_code == 404
    finally:
        agent.stop()
    assert_clean_log(agent)


def _holds(pid: int, path: Path) -> bool:
    """Whether process ``pid`` has ``path`` (or a renamed copy of it: same inode) open."""
    want = path.stat()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except FileNotFoundError:  # it has exited since it was listed
        return False
    for fd in fds:
        try:
            st = os.stat(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (want.st_dev, want.st_ino):
            return True
    return False


def test_workers_move_to_the_catalogue_an_engine_restarted_beside_them_rebuilt(tmp_path: Path) -> None:
    """The catalogue goes corrupt under a running agent; the engine is killed and restarted beside the
    workers, keeps the bad file aside and starts a new one (adopting what is on disk). The workers, which
    held the old file open, are replaced and answer from the new one (before: from the old file for good,
    and the new one had adopted nothing)."""
    agent = make_agent(tmp_path, storage_proxy={"num-proc": 2}).start(timeout=120)
    db = agent.workdir / "catalog.db"
    try:
        with fresh(agent) as api:
            old_vfid = new_vfolder(api, "qs")
        (_root(agent, old_vfid) / "a.bin").write_bytes(os.urandom(3000))
        before = {role: pids[0] for role, pids in roles(agent).items()}
        engine = before["engine"]
        os.kill(engine, signal.SIGSTOP)
        try:
            for name in ("catalog.db", "catalog.db-wal"):  # garbage over the file and its WAL (ignored as invalid)
                path = agent.workdir / name
                if path.exists():
                    path.write_bytes(os.urandom(max(path.stat().st_size, 8192)))
        finally:
            os.kill(engine, signal.SIGKILL)
        eventually(lambda: _replaced(agent, "engine", engine), timeout=60)
        for i in (0, 1):
            eventually(lambda i=i: _replaced(agent, f"worker {i}", before[f"worker {i}"]), timeout=120)
        kept = sorted(db.parent.glob("catalog.db.corrupt-*"))
        assert kept, "the corrupt catalogue was not kept aside"

        def only_new_file() -> None:
            now = roles(agent)
            assert [len(now.get(r, [])) for r in ("worker 0", "worker 1")] == [1, 1], now  # replaced ones exited
            for role in ("worker 0", "worker 1", "engine"):
                assert now.get(role), now
                pid = now[role][0]
                assert _holds(pid, db), (role, "does not read the new catalogue")
                assert not any(_holds(pid, k) for k in kept), (role, "still holds the corrupt one")

        eventually(only_new_file, timeout=120)
        query = {"json": {"volume": "local", "vfid": old_vfid}}
        for i in (0, 1):  # adopted from disk into the new file, measured, answered by both workers
            eventually(lambda i=i: _usage_is(agent, i, old_vfid, 1, 3000), timeout=60)
        new_vfid = f"qs/{uuid.uuid4().hex}"
        r = on_worker(agent, 0, "POST", "/folder/create", json={"volume": "local", "vfid": new_vfid})
        assert r.status_code == 204, r.text
        r = on_worker(agent, 1, "POST", "/folder/metadata", json={"volume": "local", "vfid": new_vfid, "payload": "m"})
        assert r.status_code == 200, r.text
        for i in (0, 1):  # written through the engine into the new file, read by each worker from it
            r = on_worker(agent, i, "GET", "/folder/metadata", json={"volume": "local", "vfid": new_vfid})
            assert r.status_code == 200 and r.json()["payload"] == "m", (i, r.text)
        assert usage(on_worker(agent, 1, "GET", "/folder/usage", **query))["file_count"] == 1
        assert "replacing the HTTP workers" in agent.log()
    finally:
        agent.stop()


def _usage_is(agent: AgentProcess, index: int, vfid: str, count: int, size: int) -> None:
    body = usage(on_worker(agent, index, "GET", "/folder/usage", json={"volume": "local", "vfid": vfid}))
    assert (body["file_count"], body["used_bytes"], body["stale"]) == (count, size, False), body


def test_an_allocation_made_at_writeback_reaches_the_workers_answers(tmp_path: Path) -> None:
    """Delayed allocation: a sparse file gains an extent-tree block when the kernel writes it back, with no
    event (fuzzer seeds 2444, 2445). One process re-reads directories with files written lately when it
    answers; with workers answering from the catalogue, the engine re-reads them every second and writes the
    figure through (before: the pre-writeback figure, ``stale: false``, for good)."""
    from tests.test_usage_regressions import counted_then_written_back
    from tests.usage_model import du

    agent = make_agent(tmp_path, storage_proxy={"num-proc": 2}).start(timeout=120)
    try:
        with fresh(agent) as api:
            vfid = new_vfolder(api, "qs")
            root = _root(agent, vfid)
            (root / "quiet").mkdir()
            body = {"volume": "local", "vfid": vfid}

            def settled() -> None:
                ub = usage(api.request("GET", "/folder/used-bytes", json=body))
                assert (ub["used_bytes"], ub["stale"]) == (du(bytes(root)), False), ub

            eventually(settled, timeout=60)  # measured: the file below is counted through its events

            def counted() -> None:
                time.sleep(1.0)  # the engine has read every event of the write (a worker cannot tell)
                eventually(settled, timeout=60)

            counted_then_written_back(root / "quiet", counted, agent.volume_root())
            eventually(settled, timeout=30)
    finally:
        agent.stop()
    assert_clean_log(agent)


def test_a_request_in_flight_at_sigterm_gets_the_whole_stop_timeout(tmp_path: Path) -> None:
    """``[storage-proxy] stop-timeout`` is the one bound of a stop: a worker's request in flight at SIGTERM may
    take all of it (here a download whose client stops reading for 25 s), and the supervisor kills a child only
    after stop-timeout + its margin (agent/runtime/supervisor.py ``stop_bound``). Before, the supervisor killed
    every child 20 s after SIGTERM whatever stop-timeout said (60 s here, the default): that download was cut
    off and its worker killed."""
    from tests.client_helpers import download_token, vfolder_path

    agent = make_agent(tmp_path, storage_proxy={"num-proc": 2, "stop-timeout": 60}).start(timeout=120)
    try:
        with agent.client() as api:
            vfid = new_vfolder(api, "qs" + uuid.uuid4().hex[:8])
            data = os.urandom(32 * CHUNK)  # far more than the socket buffers hold: the handler waits for the reader
            (vfolder_path(agent, vfid) / "big.bin").write_bytes(data)
            token = download_token(api, vfid, "big.bin")
        reading, release = threading.Event(), threading.Event()
        got: list[tuple[int, bytes, str | None] | BaseException] = []

        def download() -> None:
            try:
                with httpx.Client(base_url=agent.client_url, timeout=120) as cli, \
                        cli.stream("GET", "/download", params={"token": token}) as r:
                    body = bytearray()
                    for chunk in r.iter_bytes():
                        body += chunk
                        if not reading.is_set():
                            reading.set()
                            release.wait(120)
                    got.append((r.status_code, bytes(body), r.headers.get(WORKER_HEADER)))
            except httpx.HTTPError as e:
                got.append(e)

        thread = threading.Thread(target=download)
        thread.start()
        try:
            assert reading.wait(60), "the download did not start"
            workers = worker_pids(agent)
            assert agent.proc is not None
            agent.proc.send_signal(signal.SIGTERM)
            # longer than the supervisor's former fixed bound (20 s), well within stop-timeout (60 s); the worker
            # of the download is still there (the other, idle, has stopped)
            time.sleep(25)
            assert any(os.path.exists(f"/proc/{pid}") for pid in workers), "the worker of the download was killed"
        finally:
            release.set()
            thread.join(120)
        assert got and not isinstance(got[0], BaseException), got
        status, body, _ = got[0]
        assert status == 200 and body == data, (status, len(body))
        assert agent.proc.wait(120) == 0
    finally:
        agent.stop()
    assert "did not stop within" not in agent.log(), agent.log()
