"""Which process runs a piece of work, recorded with it, and whether that process is still there.

An HTTP worker records itself (:func:`this_process`) with each clone it starts (the job's params); the
engine rolls back the clones whose worker is gone (agent/engine/orphans.py), never one a live worker
still runs. A pid alone is not enough (pids are reused), so the process's start time (in clock ticks
since boot, ``/proc/<pid>/stat`` field 22) and the boot's id go with it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from functools import cache
from typing import Any


@cache
def boot_id() -> str | None:
    """This boot's id: bytes a process wrote in the same boot are still in the page cache after it was killed."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip() or None
    except OSError:  # pragma: no cover - no procfs: every restart is treated as a reboot
        return None


def _stat(pid: int | str) -> tuple[str, int] | None:
    """(state, start time) of a process or task, None when there is none."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text[text.rindex(b")") + 2 :].split()  # the name may hold spaces and parentheses
    return fields[0].decode(), int(fields[19])


def this_process() -> dict[str, Any]:
    own = _stat("self")
    assert own is not None, "/proc is mounted"
    return {"pid": os.getpid(), "start": own[1], "boot": boot_id()}


def gone(owner: Mapping[str, Any]) -> bool | None:
    """Whether the recorded process has ended (None: not a record this can judge)."""
    pid, start = owner.get("pid"), owner.get("start")
    if not isinstance(pid, int) or not isinstance(start, int) or isinstance(pid, bool) or pid <= 0:
        return None
    if owner.get("boot") != boot_id():
        return True  # another boot: every process of that one is gone
    found = _stat(pid)
    if found is None or found[1] != start:
        return True  # no such process, or a later one that got the pid
    if found[0] not in ("Z", "X"):
        return False
    try:  # a zombie leader: gone unless another of its threads still runs
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return True
    return all((_stat(f"{pid}/task/{t}") or ("X", 0))[0] in ("Z", "X") for t in tasks)
