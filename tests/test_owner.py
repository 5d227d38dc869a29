"""agent/runtime/owner.py against real processes: alive, a zombie not yet reaped, reaped, another boot,
a later process given the same pid (told apart by its start time)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from agent.runtime import owner


def _record(pid: int) -> dict[str, object]:
    text = Path(f"/proc/{pid}/stat").read_bytes()
    start = int(text[text.rindex(b")") + 2 :].split()[19])
    return {"pid": pid, "start": start, "boot": owner.this_process()["boot"]}


def test_a_recorded_process_is_gone_once_dead_and_only_then() -> None:
    me = owner.this_process()
    assert me["pid"] == os.getpid() and owner.gone(me) is False
    child = subprocess.Popen(["sleep", "60"])
    try:
        record = _record(child.pid)
        assert owner.gone(record) is False
        assert owner.gone({**record, "start": int(record["start"]) + 1}) is True  # a later process on that pid
        assert owner.gone({**record, "boot": "another-boot"}) is True
        os.kill(child.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while Path(f"/proc/{child.pid}/stat").read_text().split(") ")[1][0] != "Z":  # dead, not reaped: a zombie
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert owner.gone(record) is True
    finally:
        child.kill()
        child.wait()
    assert owner.gone(record) is True  # reaped
    assert owner.gone({"pid": "1", "start": 0}) is None and owner.gone({}) is None  # not a record
