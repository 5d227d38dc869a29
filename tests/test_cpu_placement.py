"""Where the agent's threads run (backends/cpu_placement.py): ``[storage-proxy] cpu-pin`` puts its Python
threads on one CPU, and the scanner, the C walk and the processes it starts get every CPU back; every
thread but the event loop's is ``SCHED_BATCH``, so it does not preempt the loop."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.support import AgentProcess, make_agent

ALLOWED = sorted(os.sched_getaffinity(0))
pytestmark = pytest.mark.skipif(len(ALLOWED) < 2, reason="pinning to one CPU needs a machine with two or more")


def _thread_cpus(pid: int) -> dict[str, set[int]]:
    """Thread id and name -> the CPUs the kernel lets it run on."""
    out: dict[str, set[int]] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            name = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
            out[f"{tid} {name}"] = set(os.sched_getaffinity(int(tid)))
        except (FileNotFoundError, ProcessLookupError):
            pass
    return out


def _policies(pid: int) -> dict[str, int]:
    """Thread id and name -> scheduling policy."""
    out: dict[str, int] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            name = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
            out[f"{tid} {name}"] = os.sched_getscheduler(int(tid))
        except (FileNotFoundError, ProcessLookupError):
            pass
    return out


def _started(tmp_path: Path, **storage_proxy: object) -> AgentProcess:
    agent = make_agent(tmp_path / "agent")
    agent.config["storage-proxy"].update(storage_proxy)
    return agent.start()


def test_agent_threads_share_one_cpu_by_default(tmp_path: Path) -> None:
    agent = _started(tmp_path)
    try:
        with agent.client() as api:  # some work first, so the worker pools have started their threads
            assert api.get("/volumes").status_code == 200
            assert api.post("/quota-scope", json={"volume": "local", "qsid": "q1"}).status_code in (200, 201, 204)
        pid = agent.proc.pid
        threads = _thread_cpus(pid)
        assert len(threads) > 2
        assert all(cpus == {ALLOWED[-1]} for cpus in threads.values()), threads
        assert f"pinned to CPU {ALLOWED[-1]} of" in agent.log()
        # the event loop runs as usual; the catalogue writer, aiosqlite's and the worker pool's threads as batch
        policies = _policies(pid)
        assert policies.pop(f"{pid} {Path(f'/proc/{pid}/comm').read_text().strip()}") == os.SCHED_OTHER
        assert len(policies) >= 3 and all(p == os.SCHED_BATCH for p in policies.values()), policies
    finally:
        agent.stop()


def test_off_leaves_every_cpu(tmp_path: Path) -> None:
    agent = _started(tmp_path, **{"cpu-pin": "off"})
    try:
        threads = _thread_cpus(agent.proc.pid)
        assert threads and all(cpus == set(ALLOWED) for cpus in threads.values()), threads
        assert "pinned to CPU" not in agent.log()
    finally:
        agent.stop()


def test_a_cpu_the_process_may_not_use_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError) as e:
        _started(tmp_path, **{"cpu-pin": max(ALLOWED) + 1000})
    message = str(e.value)
    assert "storage-proxy.cpu-pin" in message and "Traceback" not in message, message


def test_what_needs_every_cpu_gets_it_back(tmp_path: Path) -> None:
    """In a fresh interpreter (the pin is process-wide): after pin(), a new thread is on the one CPU; the
    scanner's threads, a ``widened()`` block and a command run through the subprocess helper are not."""
    tree = tmp_path / "tree"
    for i in range(20):
        (tree / f"d{i}").mkdir(parents=True)
        (tree / f"d{i}" / "f").write_bytes(b"x" * i)
    script = textwrap.dedent(
        f"""
        import asyncio, json, os, threading
        from backends import cpu_placement, process
        from agent.engine.usage import scanner

        cpu = cpu_placement.choose("auto")
        cpu_placement.pin(cpu)
        seen = {{}}
        t = threading.Thread(target=lambda: seen.update(thread=sorted(os.sched_getaffinity(0))))
        t.start(); t.join()
        scan_cpus = []
        fd = os.open({str(tree)!r}, os.O_RDONLY | os.O_DIRECTORY)
        result = scanner.scan(fd, threads=2, on_open=lambda rel, fd: scan_cpus.append(sorted(os.sched_getaffinity(0))))
        with cpu_placement.widened():
            seen["widened"] = sorted(os.sched_getaffinity(0))
        seen["after_widened"] = sorted(os.sched_getaffinity(0))
        async def command():  # a short command reads its CPUs at once: it must have them from the fork
            return (await process.run(["grep", "Cpus_allowed_list", "/proc/self/status"])).text.split()[-1]
        async def commands():  # at the same time: their widened blocks interleave on the event loop's thread
            return await asyncio.gather(*(command() for _ in range(5)))
        seen.update(cpu=cpu, dirs=len(result), scan=scan_cpus, commands=asyncio.run(commands()),
                    main=sorted(os.sched_getaffinity(0)))
        print(json.dumps(seen))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=Path.cwd())
    seen = json.loads(out.stdout)
    assert seen["cpu"] == ALLOWED[-1]
    assert seen["main"] == seen["thread"] == seen["after_widened"] == [ALLOWED[-1]]
    assert seen["dirs"] == 21 and seen["scan"] and all(cpus == ALLOWED for cpus in seen["scan"]), seen
    assert seen["widened"] == ALLOWED
    for listed in seen["commands"]:
        cpus = set()
        for part in listed.split(","):
            lo, _, hi = part.partition("-")
            cpus.update(range(int(lo), int(hi or lo) + 1))
        assert sorted(cpus) == ALLOWED, seen["commands"]
