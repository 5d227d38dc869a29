"""Choosing the watcher: fanotify where the kernel and our capabilities allow, else inotify."""

from __future__ import annotations

import logging
import os
from collections.abc import Hashable
from typing import Protocol

from agent.engine.usage.watch_inotify import InotifyWatcher, Sink, WatchLimit

log = logging.getLogger(__name__)

__all__ = ["Watcher", "WatchLimit", "pick_watcher"]


class Watcher(Protocol):
    kind: str
    per_directory: bool  # whether :meth:`watch` must see every directory the scanner opens

    def add_vfolder(self, vf: Hashable, path: str, fs_fd: int) -> None: ...

    def watch(self, vf: Hashable, relpath: str, fd: int) -> None: ...

    def forget(self, vf: Hashable, dirs: list[tuple[str, int]]) -> None:
        """``dirs``: (relpath, inode) of the directories that left the vfolder, as the tree held them."""

    def forget_vfolder(self, vf: Hashable) -> None: ...

    def count(self) -> int: ...

    def drain(self, reads: int = 1) -> None: ...

    async def run(self, sink: Sink) -> None: ...

    def close(self) -> None: ...


def fanotify_unavailable(roots: list[str]) -> str | None:
    """Why fanotify filesystem marks cannot be used here (None when they can)."""
    try:
        from agent.engine.usage.watch_fanotify import probe
    except (AttributeError, OSError) as e:  # libc without fanotify_* symbols
        return f"libc has no fanotify: {e}"
    return probe(roots or ["/"])


def pick_watcher(kind: str, roots: list[str]) -> Watcher | None:
    """``auto``: fanotify if it works for every volume root, else inotify (logged either way)."""
    roots = [os.path.realpath(r) for r in roots]
    if kind == "none":
        log.info("usage engine: watching disabled by config; figures come from scans")
        return None
    if kind in ("auto", "fanotify"):
        reason = fanotify_unavailable(roots)
        if reason is None:
            from agent.engine.usage.watch_fanotify import FanotifyWatcher

            log.info("usage engine: watching with fanotify (FAN_MARK_FILESYSTEM + FAN_REPORT_DFID_NAME)")
            return FanotifyWatcher(roots)
        if kind == "fanotify":
            log.warning("usage engine: fanotify asked for but unavailable (%s); using inotify", reason)
        else:
            log.info("usage engine: fanotify unavailable (%s); using inotify", reason)
    else:
        log.info("usage engine: watching with inotify (one watch per directory)")
    return InotifyWatcher()
