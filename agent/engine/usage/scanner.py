"""The full walk of a vfolder (or of one subtree), producing per-directory aggregates.

Blocking: the engine runs it in a worker thread, and it reads directories in parallel with a small pool
of its own threads (``os.scandir`` and ``lstat`` release the GIL while they wait on the filesystem).
It is cancellable between directories, and idempotent: the result is a map relpath -> aggregate, so a scan
that is redone after a crash replaces rows instead of adding to them.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

from agent.engine.usage.aggregates import DirAgg, join, read_dir
from backends import cpu_placement, ioprio


class ScanCancelled(Exception):
    """The scan was asked to stop (vfolder deleted, agent stopping)."""


@dataclass
class ScanProgress:
    """Counters a progress bar can poll while the scan runs."""

    dirs: int = 0
    entries: int = 0


def default_threads() -> int:
    """One reader per CPU (2..4): the directory reads release the GIL, but more threads than CPUs only
    add hand-offs."""
    return max(2, min(4, os.cpu_count() or 1))


def scan(
    root_fd: int,
    start: str = "",
    *,
    threads: int = 0,
    cancel: threading.Event | None = None,
    on_open: Callable[[str, int], None] | None = None,
    progress: ScanProgress | None = None,
    idle: bool = False,
) -> dict[str, DirAgg]:
    """Walk the tree below ``start`` (relative to the vfolder root fd); symlinks are never followed.

    ``threads`` directory reads are in flight at once: on a network filesystem each waits a round trip, so
    more readers than CPUs pay off there. ``idle``: the readers are in the idle I/O class (a rescan on a
    busy node reads only when nothing else waits for the disk)."""
    threads = threads or default_threads()
    cancel = cancel or threading.Event()
    result: dict[str, DirAgg] = {}
    work: queue.SimpleQueue[str | None] = queue.SimpleQueue()
    lock = threading.Lock()
    outstanding = 1
    failure: list[BaseException] = []
    work.put(start)

    def worker() -> None:
        nonlocal outstanding
        cpu_placement.widen_thread()  # the reads wait on the filesystem without the GIL: use every CPU
        if idle:
            ioprio.idle_thread()
        while True:
            rel = work.get()
            if rel is None:
                return
            children: list[str] = []
            if not cancel.is_set() and not failure:
                try:
                    agg = read_dir(root_fd, rel, on_open)
                except BaseException as e:  # noqa: BLE001 - handed to the caller below
                    failure.append(e)
                    agg = None
                if agg is not None:
                    result[rel] = agg
                    children = [join(rel, name) for name in agg.subdirs]
                    if progress is not None:
                        progress.dirs += 1
                        progress.entries += agg.entries
            # the children are counted before they are queued: counted after, another reader could take one
            # (and its own children) and bring the count to zero first, queue the ends, and every child queued
            # after the ends was never read (a scan that returned a subtree short, as if complete)
            with lock:
                outstanding += len(children) - 1
                done = outstanding == 0
            for child in children:
                work.put(child)
            if done:
                for _ in range(threads):
                    work.put(None)

    pool = [threading.Thread(target=worker, name="usage-scan", daemon=True) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    if failure:
        raise failure[0]
    if cancel.is_set():
        raise ScanCancelled(start)
    return result
