"""Where the agent's threads run: its Python threads on one CPU, the event loop first on it, and the
whole machine given back to what needs it.

**One CPU.** Nearly all of the agent's Python runs on the event-loop thread, and it hands the GIL to and
from worker threads many times per request (``to_thread`` hops, aiosqlite, the catalogue writer). When
those threads sit on different CPUs, every hand-off is a cross-CPU wake-up: an inter-processor
interrupt, which on a VM is also an exit to the hypervisor. On one CPU it is a local context switch.
The GIL lets only one of these threads run Python at a time anyway, so one CPU costs them little.

**The event loop first.** Every thread but the event loop's runs as ``SCHED_BATCH``
(:func:`background_thread`): when a worker wakes up (its system call returned, a job arrived) it no
longer preempts the event loop in the middle of a callback, and waits for the loop's time slice to end
or for the loop to sleep. Its share of the CPU is unchanged, so it is not starved by other processes.

Measured with ``bench/load_bench.py`` (200 connections, mixed routes, think 500 ms, ~490 requests/s,
2-CPU VM): the pin took the usage p99 from 59 to 28 ms and the agent's CPU from 82 to 66% of a core;
``SCHED_BATCH`` workers, in interleaved runs, gave 26–36 ms against 32–53 ms without. The trade-off:
one big upload's throughput (``bench/transfer_bench.py``) came out lower pinned than not in most runs,
within a wide run-to-run spread; ``cpu-pin = "off"`` is the switch for a node that cares more for that.

What does need more than one CPU, or is kernel work that would take turns with the event loop, runs
on every CPU again: the usage scanner's threads and the C walk's (directory reads without the GIL),
a clone's copy, a deleted tree's unlinks run under :func:`widen_thread` / :func:`widened`, and so is
every spawn of a process (commands, the FUSE view): a child inherits the CPUs of the thread that forks
it. An upload's splice into its file and its background fdatasync, many calls a second, run on the
threads of :func:`wide_executor`, widened once when they start. The set is the one the process started with,
so a cpuset or ``taskset`` given by the operator is kept.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from backends.daemon_pool import DaemonPool

log = logging.getLogger(__name__)

_started_with: frozenset[int] | None = None  # the CPUs this process was allowed before pin()
_pinned: frozenset[int] | None = None  # the one CPU of pin()


def allowed() -> frozenset[int]:
    """The CPUs this process may run on (its start-up set, before any pin)."""
    return _started_with if _started_with is not None else frozenset(os.sched_getaffinity(0))


def choose(setting: str | int) -> int | None:
    """The CPU that ``[storage-proxy] cpu-pin`` asks for, or None for no pin.

    ``"off"``: none. ``"auto"``: the highest-numbered allowed CPU (CPU 0 usually takes more of the
    machine's interrupts), or none when only one is allowed. A number must be an allowed CPU.
    """
    cpus = allowed()
    if setting == "off":
        return None
    if setting == "auto":
        return max(cpus) if len(cpus) > 1 else None
    if not isinstance(setting, int) or setting not in cpus:
        raise ValueError(
            f"cpu-pin = {setting!r}: expected \"auto\", \"off\" or one of the CPUs this process may use "
            f"({_ranges(cpus)})"
        )
    return setting


def pin(cpu: int) -> None:
    """Confine every thread of this process, and so every thread it starts later, to ``cpu``."""
    global _started_with, _pinned
    if _started_with is None:
        _started_with = frozenset(os.sched_getaffinity(0))
    _pinned = frozenset({cpu})
    for tid in _thread_ids():
        try:
            os.sched_setaffinity(tid, {cpu})
        except ProcessLookupError:  # the thread ended meanwhile
            pass
    log.info("Python threads pinned to CPU %d of %s ([storage-proxy] cpu-pin)", cpu, _ranges(_started_with))


def widen_thread() -> None:
    """Let the calling thread run on every CPU the process started with (no-op without a pin)."""
    if _started_with is not None and _pinned is not None:
        os.sched_setaffinity(0, _started_with)


@contextmanager
def widened() -> Iterator[None]:
    """The calling thread on every start-up CPU for the block (threads started in it inherit that), then
    back on the pinned CPU. Back on the pin, not on what the thread had before: on the event loop's
    thread two tasks' blocks can interleave across an ``await``, and the second saw the first's set."""
    if _started_with is None or _pinned is None:
        yield
        return
    os.sched_setaffinity(0, _started_with)
    try:
        yield
    finally:
        os.sched_setaffinity(0, _pinned)


WIDE_THREADS = 32
_wide: DaemonPool | None = None
_wide_lock = threading.Lock()


def wide_executor() -> DaemonPool:
    """Threads for a transfer's kernel work (an upload's splice into its file, its fdatasync, a download's
    sendfile), which run on every start-up CPU from their start and as ``SCHED_BATCH``. Per call,
    :func:`widened` costs two ``sched_setaffinity``: each a migration the calling thread waits for, holding
    the GIL; measured as about a fifth of the event loop's GIL time in an upload of 16 MiB PATCHes on their
    own connections. These threads never go back to the pin: nothing here may run Python that must share
    the event loop's CPU."""
    global _wide
    with _wide_lock:
        if _wide is None:
            _wide = DaemonPool(WIDE_THREADS, "storage-agent-wide", initializer=_wide_thread)  # never joined at exit
        return _wide


def _wide_thread() -> None:
    widen_thread()
    background_thread()


def background_thread(tid: int = 0) -> None:
    """Run a thread (the calling one when ``tid`` is 0) as ``SCHED_BATCH``: it does not preempt the event
    loop when it wakes up (see the module docstring). Threads it starts inherit that. Where the kernel
    refuses, the thread stays as it was: this is an optimisation, never a reason to fail."""
    try:
        os.sched_setscheduler(tid, os.SCHED_BATCH, os.sched_param(0))
    except (OSError, AttributeError):  # no such thread any more, not permitted, or not Linux
        pass


def _thread_ids() -> list[int]:
    try:
        return [int(t) for t in os.listdir("/proc/self/task")]
    except FileNotFoundError:  # no /proc: only the calling thread
        return [0]


def _ranges(cpus: frozenset[int]) -> str:
    """``{0, 1, 2, 5}`` → ``"0-2,5"``, as the kernel writes CPU lists."""
    out: list[str] = []
    for cpu in sorted(cpus):
        if out and int(out[-1].rsplit("-", 1)[-1]) == cpu - 1:
            out[-1] = f"{out[-1].split('-')[0]}-{cpu}"
        else:
            out.append(str(cpu))
    return ",".join(out)
