"""``[logging]`` drivers as upstream names them: ``file`` writes upstream's path/filename and rotates it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import httpx

from tests.support import ROOT, assert_clean_log, make_agent, to_toml


def test_file_driver_writes_json_lines_and_rotates(tmp_path: Path) -> None:
    logs = tmp_path / "logs" / "nested"  # upstream creates the directory
    rotation, backups = 2048, 2
    agent = make_agent(
        tmp_path / "agent",
        logging={
            "level": "INFO",
            "drivers": ["console", "file", "logstash"],
            "file": {"path": str(logs), "filename": "storage-proxy.log", "rotation-size": "2k",
                     "backup-count": backups},
            "logstash": {"endpoint": {"host": "127.0.0.1", "port": 9}, "protocol": "tcp"},
        },
    )
    agent.start()
    try:
        with agent.client() as api:
            for _ in range(60):  # each 4xx is logged at INFO: enough lines to rotate more than `backups` times
                r = api.post("/folder/create", json={"volume": "nowhere", "vfid": f"qs1/{uuid.uuid4().hex}"})
                assert r.status_code == 404
    finally:
        assert agent.stop() == 0
    assert_clean_log(agent)
    files = sorted(p.name for p in logs.iterdir())
    assert files == ["storage-proxy.log", "storage-proxy.log.1", "storage-proxy.log.2"], files
    lines = []
    for name in files:
        data = (logs / name).read_bytes()
        assert 0 < len(data) <= rotation, (name, len(data))
        lines += [json.loads(line) for line in data.decode().splitlines()]
    assert all({"timestamp", "level", "name", "message"} <= set(rec) for rec in lines)
    assert any("unknown volume 'nowhere'" in rec["message"] for rec in lines)
    console = agent.log()
    assert "unknown volume 'nowhere'" in console  # the console driver is served alongside
    # logstash is accepted, with one warning naming it
    assert sum("logstash" in line and "WARNING" in line for line in console.splitlines()) == 1, console


def test_file_driver_without_its_table_is_a_config_error(tmp_path: Path) -> None:
    agent = make_agent(tmp_path / "agent", logging={"drivers": ["file"]})
    agent.config_path.write_text(to_toml(agent.config))
    r = subprocess.run([sys.executable, "-m", "agent", "check-config", "-f", str(agent.config_path)],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 2 and "logging.file" in r.stderr, r.stderr


def test_file_driver_under_num_proc_keeps_every_line_once_and_names_its_process(tmp_path: Path) -> None:
    """num-proc = 2: one process writes and rotates the file. Before, each process rotated it on its own: a
    line landed in a file another process had just renamed, renames overwrote each other's backups (lines
    lost), and files grew past ``rotation-size``."""
    logs = tmp_path / "logs"
    rotation = 4096
    agent = make_agent(
        tmp_path / "agent",
        storage_proxy={"num-proc": 2},
        logging={"level": "INFO", "drivers": ["console", "file"],
                 "file": {"path": str(logs), "filename": "agent.log", "rotation-size": "4k", "backup-count": 100}},
    )
    agent.start(timeout=120)
    served: dict[str, str] = {}  # request id -> the worker that answered
    lock = threading.Lock()

    def burst(seed: int) -> None:
        with agent.client() as api:
            for i in range(40):
                rid = f"burst-{seed}-{i}-{uuid.uuid4().hex[:8]}"
                r = api.post("/folder/create", json={"volume": "nowhere", "vfid": f"qs1/{uuid.uuid4().hex}"},
                             headers={"X-Request-ID": rid})
                assert r.status_code == 404
                with lock:
                    served[rid] = r.headers["X-Storage-Agent-Worker"]

    try:
        threads = [threading.Thread(target=burst, args=(n,)) for n in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        assert agent.stop() == 0
    assert_clean_log(agent)
    assert len(served) == 240
    files = sorted(logs.iterdir())
    assert 1 + len(served) * 150 // rotation <= len(files) <= 101, [p.name for p in files]  # it rotated
    records, sizes = [], {}
    for path in files:
        data = sizes[path.name] = path.read_bytes()
        assert 0 < len(data) <= rotation, (path.name, len(data))
        records += [json.loads(line) for line in data.decode().splitlines()]
    longest = max(len(json.dumps(rec)) + 1 for rec in records)
    # a file was set aside only when the next line did not fit in it (not because another process rotated)
    rotated = {name: len(data) for name, data in sizes.items() if name != "agent.log"}
    assert all(size + longest > rotation for size in rotated.values()), rotated
    roles = {"supervisor", "engine", "worker-0", "worker-1"}
    assert all(rec["processName"] in roles for rec in records), {rec["processName"] for rec in records} - roles
    seen: dict[str, list[str]] = {}
    for rec in records:
        if "[request burst-" in rec["message"]:
            rid = rec["message"].rsplit("[request ", 1)[1].rstrip("]")
            seen.setdefault(rid, []).append(rec["processName"])
    assert set(seen) == set(served), (len(seen), len(served))
    for rid, names in seen.items():
        assert names == [f"worker-{served[rid]}"], (rid, names)
    assert any(rec["processName"] == "supervisor" and "started engine" in rec["message"] for rec in records)
    assert any(rec["processName"] == "engine" and "engine ready" in rec["message"] for rec in records)


def test_a_stalled_log_writer_never_stalls_a_worker_and_what_was_dropped_is_counted(tmp_path: Path) -> None:
    """The supervisor (the file's one writer) stopped with SIGSTOP while the workers log ~6 KiB lines: once a
    worker's relay socket is full it waits for it once (2 s), then drops lines without waiting, so every
    request is answered; after SIGCONT the file says how many lines each worker dropped, and no line is
    written twice."""
    logs = tmp_path / "logs"
    agent = make_agent(
        tmp_path / "agent",
        storage_proxy={"num-proc": 2},
        logging={"level": "INFO", "drivers": ["file"],
                 "file": {"path": str(logs), "filename": "agent.log", "rotation-size": "64M", "backup-count": 1}},
    )
    agent.start(timeout=120)
    assert agent.proc is not None
    pad = "x" * 6000  # the refused request's line quotes its target: ~6 KiB per line fills the socket soon
    sent: list[str] = []
    lock = threading.Lock()

    def burst(seed: int, count: int) -> None:
        with agent.client() as api:
            for i in range(count):
                rid = f"stall-{seed}-{i}-{uuid.uuid4().hex[:8]}"
                r = api.post(f"/folder/create?pad={pad}", json={"volume": "nowhere", "vfid": "qs1/" + "a" * 32},
                             headers={"X-Request-ID": rid}, timeout=60)
                assert r.status_code == 404
                with lock:
                    sent.append(rid)

    os.kill(agent.proc.pid, signal.SIGSTOP)
    try:
        threads = [threading.Thread(target=burst, args=(n, 150)) for n in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert not any(t.is_alive() for t in threads), "a worker stalled behind the stopped log writer"
    finally:
        os.kill(agent.proc.pid, signal.SIGCONT)
    burst(99, 20)  # lines that get through again, each worker's first one after the count of what it dropped
    assert agent.stop() == 0
    assert len(sent) == 920
    records = [json.loads(line) for p in sorted(logs.iterdir()) for line in p.read_text().splitlines()]
    seen = [rec["message"].rsplit("[request ", 1)[1].rstrip("]") for rec in records
            if "[request stall-" in rec["message"]]
    assert len(seen) == len(set(seen)) and set(seen) <= set(sent)
    notes = [rec for rec in records if "log records dropped" in rec["message"]]
    assert notes and all(rec["processName"] in ("worker-0", "worker-1") for rec in notes), notes
    dropped = sum(int(rec["message"].split()[0]) for rec in notes)
    assert len(seen) + dropped >= len(sent), (len(seen), dropped, len(sent))


def test_lines_of_a_killed_worker_are_kept(tmp_path: Path) -> None:
    """A worker killed with SIGKILL mid-burst: every request it answered has its line in the file (a line is
    in the kernel's queue before the answer leaves; the supervisor reads it after the worker is gone)."""
    from tests.support import roles

    logs = tmp_path / "logs"
    agent = make_agent(
        tmp_path / "agent",
        storage_proxy={"num-proc": 2},
        logging={"level": "INFO", "drivers": ["console", "file"],
                 "file": {"path": str(logs), "filename": "agent.log", "rotation-size": "1M", "backup-count": 5}},
    )
    agent.start(timeout=120)
    answered: dict[str, str] = {}
    lock = threading.Lock()
    halfway = threading.Event()

    def burst(seed: int) -> None:
        for i in range(60):
            if i == 20:
                halfway.set()
            rid = f"kill-{seed}-{i}-{uuid.uuid4().hex[:8]}"
            try:
                with agent.client() as api:  # a connection per request: the survivor takes them after the kill
                    r = api.post("/folder/create", json={"volume": "nowhere", "vfid": "qs1/" + "a" * 32},
                                 headers={"X-Request-ID": rid}, timeout=60)
            except httpx.HTTPError:
                continue  # in flight on the killed worker
            assert r.status_code == 404
            with lock:
                answered[rid] = r.headers["X-Storage-Agent-Worker"]

    try:
        threads = [threading.Thread(target=burst, args=(n,)) for n in range(3)]
        for t in threads:
            t.start()
        assert halfway.wait(120)
        (victim,) = roles(agent)["worker 0"]
        os.kill(victim, signal.SIGKILL)
        for t in threads:
            t.join(300)
    finally:
        assert agent.stop() == 0
    records = [json.loads(line) for p in sorted(logs.iterdir()) for line in p.read_text().splitlines()]
    seen: dict[str, list[str]] = {}
    for rec in records:
        if "[request kill-" in rec["message"]:
            seen.setdefault(rec["message"].rsplit("[request ", 1)[1].rstrip("]"), []).append(rec["processName"])
    assert any(w == "0" for w in answered.values())
    for rid, worker in answered.items():
        assert seen.get(rid) == [f"worker-{worker}"], (rid, worker, seen.get(rid))
    assert any("HTTP worker 0" in rec["message"] and "signal 9" in rec["message"] for rec in records)
