"""A volume whose mount hangs must not stall the agent: /volumes and /volume/hwinfo check volumes off the event
loop, bounded (the mechanism /health uses), so they and every other route keep answering.

Start-up checks each volume the same way: an agent whose volume hangs from the start still becomes ready and
serves the others.

A hung mount is played by a FIFO in place of ``version.txt``: opening it for reading blocks until a writer comes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support import AgentProcess, assert_clean_log, eventually, make_agent


@pytest.fixture
def two_volumes(tmp_path: Path) -> Iterator[tuple[AgentProcess, Path]]:
    roots = {name: tmp_path / name for name in ("hung", "fine")}
    for root in roots.values():
        root.mkdir()
        (root / "version.txt").write_text("3\n")
    agent = make_agent(
        tmp_path / "agent", volumes={name: {"backend": "vfs", "path": str(root)} for name, root in roots.items()}
    ).start()
    try:
        yield agent, roots["hung"]
    finally:
        _release(roots["hung"])
        agent.stop()
    assert_clean_log(agent)


def _hang(root: Path) -> None:
    fifo = root / "version.fifo"
    os.mkfifo(fifo)
    os.rename(fifo, root / "version.txt")


def _release(root: Path, answer: bytes = b"3\n") -> None:
    """A real ``version.txt`` again, then the blocked reads their ``answer``: opening the FIFO read-write never
    blocks and wakes every reader blocked opening it (one per agent process), each then reads ``answer`` or the
    end of the pipe (an unreadable version: not served until the next check, which finds the file)."""
    target = root / "version.txt"
    fd = os.open(target, os.O_RDWR | os.O_NONBLOCK) if target.is_fifo() else None
    (root / "version.new").write_text("3\n")
    os.rename(root / "version.new", target)
    if fd is not None:
        try:
            if answer:
                os.write(fd, answer)
        finally:
            os.close(fd)


def test_volumes_and_hwinfo_answer_while_a_volume_hangs(two_volumes: tuple[AgentProcess, Path]) -> None:
    agent, hung = two_volumes
    _hang(hung)
    results: dict[str, httpx.Response] = {}

    def list_volumes() -> None:
        with agent.client() as api:
            results["volumes"] = api.get("/volumes", timeout=60)

    pending = threading.Thread(target=list_volumes)
    pending.start()
    try:
        # while /volumes waits on the hung volume, the loop is free: other routes answer (generous timeouts: a
        # blocked loop would not answer at all, a busy machine only slowly)
        with agent.client() as api:
            r = api.request("GET", "/volume/hwinfo", json={"volume": "fine"}, timeout=30)
            assert r.status_code == 200 and r.json()["status"] == "healthy", r.text
            assert api.get("/", timeout=30).status_code == 200
    finally:
        pending.join(60)
    assert not pending.is_alive(), "/volumes did not answer"
    r = results["volumes"]
    assert r.status_code == 200, r.text
    states = {v["name"]: v for v in r.json()["volumes"]}
    assert states["fine"]["status"] == "serving"
    assert states["hung"]["status"] == "unavailable" and "has not answered" in states["hung"]["status_info"]

    with agent.client() as api:
        r = api.request("GET", "/volume/hwinfo", json={"volume": "hung"}, timeout=30)
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "unavailable" and "has not answered" in r.json()["status_info"]
        _release(hung)  # the mount comes back: served again from the next check on
        volumes = {v["name"]: v["status"] for v in api.get("/volumes", timeout=30).json()["volumes"]}
        assert volumes == {"hung": "serving", "fine": "serving"}
        r = api.request("GET", "/volume/hwinfo", json={"volume": "hung"}, timeout=30)
        assert r.json()["status"] == "healthy", r.text


def test_an_unserved_volume_looked_at_again_while_its_mount_hangs_stalls_no_other_request(tmp_path: Path) -> None:
    """A volume not served at start-up (it needs migration) is looked at again by each request naming it (a
    migration may have finished). When its mount hangs, that look blocks a thread and answers 503 within the
    check's bound; every other request keeps answering. Before, the look ran on the event loop: the whole
    agent stopped answering until the mount came back."""
    roots = {name: tmp_path / name for name in ("old", "fine")}
    for root in roots.values():
        root.mkdir()
    (roots["old"] / "version.txt").write_text("2\n")
    (roots["fine"] / "version.txt").write_text("3\n")
    agent = make_agent(
        tmp_path / "agent", volumes={name: {"backend": "vfs", "path": str(root)} for name, root in roots.items()}
    ).start()
    results: dict[str, httpx.Response] = {}
    try:
        with agent.client() as api:
            r = api.post("/quota-scope", json={"volume": "old", "qsid": "qs1"})
            assert r.status_code == 503 and "needs migration" in r.json()["msg"], r.text
        _hang(roots["old"])

        def create_on_old() -> None:
            with agent.client() as api:
                results["old"] = api.post("/quota-scope", json={"volume": "old", "qsid": "qs1"}, timeout=60)

        pending = threading.Thread(target=create_on_old)
        pending.start()
        time.sleep(1.0)  # not a bound: lets that request reach the agent before the others (no assert on time)
        try:
            with agent.client() as api:  # generous timeouts: a blocked loop never answers, a busy machine slowly
                for _ in range(5):
                    assert api.get("/", timeout=30).status_code == 200
                    assert api.post("/quota-scope", json={"volume": "fine", "qsid": "qs2"},
                                    timeout=30).status_code in (204, 409)
        finally:
            pending.join(60)
        assert not pending.is_alive(), "the request naming the hung volume did not answer"
        r = results["old"]
        assert r.status_code == 503 and "has not answered" in r.json()["msg"], r.text
        _release(roots["old"])  # back, and now migrated: served from the next look on
        with agent.client() as api:
            assert api.post("/quota-scope", json={"volume": "old", "qsid": "qs1"}, timeout=30).status_code == 204
    finally:
        _release(roots["old"])
        agent.stop()
    assert_clean_log(agent)


def _hung_and_fine(tmp_path: Path, storage_proxy: dict[str, object]) -> tuple[dict[str, Path], AgentProcess]:
    """An agent (not started) of two vfs volumes: ``hung``, whose root hangs whoever opens it, and ``fine``."""
    roots = {name: tmp_path / name for name in ("hung", "fine")}
    for root in roots.values():
        root.mkdir()
        (root / "version.txt").write_text("3\n")
    _hang(roots["hung"])
    agent = make_agent(
        tmp_path / "agent", volumes={name: {"backend": "vfs", "path": str(root)} for name, root in roots.items()},
        storage_proxy=storage_proxy,
    )
    return roots, agent


@pytest.mark.parametrize("num_proc", [1, 2])
def test_an_agent_whose_volume_hangs_from_the_start_serves_the_others(tmp_path: Path, num_proc: int) -> None:
    """The start-up check of each volume runs off the event loop, bounded, all volumes at once: a volume whose
    mount hangs is recorded as not served ("has not answered", an error line naming it, its reconciliation
    skipped) and the agent -- the single process, or the engine and each HTTP worker -- becomes ready and serves
    the others. Once the mount answers, the volume is served from the next request naming it. Before, the check
    ran on the event loop, unbounded: the agent never became ready."""
    roots, agent = _hung_and_fine(tmp_path, {"num-proc": num_proc})
    try:
        # generous: the start waits at most a few bounds of 5 s per process, on a busy machine
        agent.start(timeout=120)
        with agent.client() as api:
            for qsid in ("qs1", "qs2", "qs3"):  # over each worker, likely: every one serves "fine"
                assert api.post("/quota-scope", json={"volume": "fine", "qsid": qsid}).status_code == 204
            vfid = f"qs1/{uuid.uuid4().hex}"
            assert api.post("/folder/create", json={"volume": "fine", "vfid": vfid}).status_code == 204
            for _ in range(3):
                r = api.get("/volumes")
                assert r.status_code == 200, r.text
                states = {v["name"]: v for v in r.json()["volumes"]}
                assert states["fine"]["status"] == "serving", states
                assert states["hung"]["status"] == "unavailable", states
                assert "has not answered" in states["hung"]["status_info"], states
            r = api.post("/quota-scope", json={"volume": "hung", "qsid": "qs1"})
            assert r.status_code == 503 and "has not answered" in r.json()["msg"], r.text
        errors = [line for line in agent.log().splitlines() if "volume hung is NOT served" in line]
        assert errors and all("has not answered" in line for line in errors), agent.log()
        # the engine says so, or the single process
        assert any("reconciliation waits" in line for line in errors), agent.log()

        # the mount answers again; the checks that hung get nothing (an unreadable version: still not served, so
        # each process must look at the volume again to serve it)
        _release(roots["hung"], answer=b"")

        def served() -> None:
            with agent.client() as api:
                volumes = {v["name"]: v["status"] for v in api.get("/volumes").json()["volumes"]}
                assert volumes == {"hung": "serving", "fine": "serving"}, volumes

        for _ in range(3):  # each process answers from its own next check
            eventually(served, timeout=60)
        with agent.client() as api:
            for qsid in ("qs1", "qs2", "qs3"):
                r = api.post("/quota-scope", json={"volume": "hung", "qsid": qsid})
                assert r.status_code == 204, r.text
            assert (roots["hung"] / "qs3").is_dir()
            # and measured by the usage engine (under num-proc = 2 the engine process, which no request reaches:
            # it looks at the volume again when a worker's request about one of its vfolders arrives)
            hexid = uuid.uuid4().hex
            vfid = f"qs1/{hexid}"
            assert api.post("/folder/create", json={"volume": "hung", "vfid": vfid}).status_code == 204
            folder = roots["hung"] / "qs1" / hexid[:2] / hexid[2:4] / hexid[4:]
            (folder / "a.bin").write_bytes(os.urandom(10_000))
            query = {"volume": "hung", "vfid": vfid}
            assert api.post("/folder/usage/refresh", json=query).status_code == 202

            def measured() -> None:
                body = api.request("GET", "/folder/usage", json=query).json()
                assert (body["file_count"], body["used_bytes"], body["stale"]) == (1, 10_000, False), body

            eventually(measured, timeout=60)
    finally:
        _release(roots["hung"])
        agent.stop()
    assert_clean_log(agent)


@pytest.mark.parametrize("num_proc", [1, 2])
def test_stop_is_bounded_while_a_volume_check_hangs(tmp_path: Path, num_proc: int) -> None:
    """SIGTERM while a volume's check is stuck in a hung mount: ``serve`` stops (exit 0) without waiting for
    the mount, and under num-proc = 2 every child stops by itself (none is killed by the supervisor). Before,
    the check ran in the default executor, whose threads ``asyncio.run`` and the interpreter join at exit: the
    single process never stopped; the engine and workers were killed after the supervisor's bound."""
    roots, agent = _hung_and_fine(tmp_path, {"num-proc": num_proc, "stop-timeout": 2})
    try:
        agent.start(timeout=120)
        with agent.client() as api:  # each process's start-up check is still blocked opening the FIFO
            states = {v["name"]: v["status"] for v in api.get("/volumes").json()["volumes"]}
            assert states == {"hung": "unavailable", "fine": "serving"}, states
        assert agent.proc is not None
        agent.proc.send_signal(signal.SIGTERM)
        try:
            code = agent.proc.wait(90)  # generous (a busy machine); a stop that waits for the mount never ends
        except subprocess.TimeoutExpired:
            code = None
        assert code == 0, f"serve did not stop while the mount hung (exit {code}):\n{agent.log()[-3000:]}"
        assert "did not stop within" not in agent.log(), agent.log()
    finally:
        _release(roots["hung"])
        agent.stop()


def test_single_process_stop_is_bounded_while_a_listing_hangs_in_a_fuse_mount(tmp_path: Path) -> None:
    """num-proc = 1, SIGTERM while a listing is stuck in a hung FUSE mount (tests/hang_fuse.py: READDIR never
    answers): its request is cancelled after stop-timeout, the catalogue is closed, the pool's thread still in
    the mount is named and left behind, and ``serve`` is done (its pid file removed): the process ends as soon
    as the kernel lets that thread go (a FUSE request already with its server waits uninterruptibly: here when
    the FUSE server dies), exit 0. Before, the listing's thread was one of the default executor's, which
    ``asyncio.run`` and the interpreter join at exit: ``serve`` waited for the mount forever (no supervisor to
    kill it)."""
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        pytest.skip("a FUSE mount needs root and /dev/fuse")
    from tests.support import new_vfolder

    pid_file = tmp_path / "agent.pid"
    agent = make_agent(tmp_path / "agent", storage_proxy={"stop-timeout": 2, "pid-file": str(pid_file)},
                       usage={"enabled": False})
    mnt: Path | None = None
    fuse: subprocess.Popen[bytes] | None = None
    try:
        agent.start(timeout=120)
        with agent.client() as api:
            vfid = new_vfolder(api, "qs1")
        qsid, hexid = vfid.split("/")
        mnt = agent.volume_root() / qsid / hexid[:2] / hexid[2:4] / hexid[4:] / "mnt"
        mnt.mkdir()
        fuse = subprocess.Popen([sys.executable, "-m", "tests.hang_fuse", str(mnt)], stdout=subprocess.PIPE)
        assert fuse.stdout is not None and fuse.stdout.readline() == b"mounted\n"
        results: list[object] = []

        def listing() -> None:
            try:
                with agent.client() as api:
                    results.append(api.post("/folder/file/list", json={"volume": "local", "vfid": vfid,
                                                                        "relpath": "mnt"}, timeout=120))
            except httpx.HTTPError as e:
                results.append(e)

        pending = threading.Thread(target=listing)
        pending.start()
        time.sleep(1.0)  # not a bound: lets the listing reach the mount
        assert not results, results  # it hangs
        assert agent.proc is not None and pid_file.exists()
        agent.proc.send_signal(signal.SIGTERM)

        def done() -> None:  # generous (a busy machine); a stop that joins the thread never gets there
            assert not pid_file.exists(), f"serve did not finish while the mount hung:\n{agent.log()[-3000:]}"

        eventually(done, timeout=90)
        log = agent.log()
        assert "still busy" in log and "storage-agent-io" in log and "in_vfolder" in log, log[-3000:]
        assert "Traceback" not in log, log
        fuse.kill()  # the mount answers at last (ENOTCONN): the thread returns, the process ends
        fuse.wait()
        assert agent.proc.wait(60) == 0
        pending.join(60)
    finally:
        if fuse is not None:
            fuse.kill()
            fuse.wait()
        if mnt is not None:
            subprocess.run(["umount", "-l", str(mnt)], check=False)
        agent.stop()
