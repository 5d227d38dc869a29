"""inotify watcher: one watch per directory, added as the scanner opens each directory.

A watch is added through ``/proc/self/fd/N`` of the directory the scanner opened with ``RESOLVE_BENEATH``,
so it lands on exactly the directory that was read, never on something a symlink swapped in. Every event
names a directory (the watched one); the engine re-reads it. ``IN_Q_OVERFLOW`` means events were lost:
every vfolder goes stale and is rescanned. ``ENOSPC`` from ``inotify_add_watch`` (``max_user_watches``)
marks that vfolder as one whose watches are incomplete.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import threading
from collections.abc import Hashable
from typing import Protocol

from asyncinotify import Inotify, Mask, Watch
from asyncinotify import _FakeFuture as _Batch  # one synchronous, non-blocking read of the queue

log = logging.getLogger(__name__)

MASK = (
    Mask.CREATE
    | Mask.DELETE
    | Mask.MODIFY
    | Mask.ATTRIB
    | Mask.CLOSE_WRITE
    | Mask.MOVED_FROM
    | Mask.MOVED_TO
    | Mask.DELETE_SELF
    | Mask.MOVE_SELF
    | Mask.ONLYDIR
)


_MOVES_MAX = 4096  # directory moves remembered for pairing with their MOVED_TO


class WatchLimit(Exception):
    """The kernel refused another watch (``max_user_watches``)."""


class Sink(Protocol):
    def dirty(self, vf: Hashable, relpath: str, ino: int = 0) -> None:
        """``ino``: the directory the event happened in, as the watcher knew it (0: not known)."""

    def moved_away(self, vf: Hashable, relpath: str) -> None:
        """A directory was renamed away from ``relpath``."""

    def moved_within(self, vf: Hashable, relpath: str) -> None:
        """A directory renamed away from ``relpath`` landed in the same vfolder."""

    def lost(self, vf: Hashable, relpath: str, deleted: bool = False) -> None:
        """The directory at ``relpath`` left (``deleted``: removed, not moved)."""

    def overflow(self) -> None: ...

    def watch_lost(self, vf: Hashable) -> None: ...


class InotifyWatcher:
    kind = "inotify"
    per_directory = True  # a watch is added to each directory the scanner opens

    def __init__(self) -> None:
        self._ino = Inotify(cache_size=256)
        os.set_blocking(self._ino.fd, False)  # :meth:`drain` reads it from the event loop
        self._sink: Sink | None = None
        self._lock = threading.Lock()
        self._by_wd: dict[int, tuple[Watch, Hashable, str, int]] = {}  # wd -> (watch, vf, relpath, ino)
        self._by_ino: dict[tuple[Hashable, int], int] = {}  # (vf, directory inode) -> wd
        self._moves: dict[int, tuple[Hashable, str]] = {}  # cookie -> (vf, relpath) a directory moved from

    def add_vfolder(self, vf: Hashable, path: str, fs_fd: int) -> None:
        """Nothing to do per vfolder: watches come one per directory."""

    def watch(self, vf: Hashable, relpath: str, fd: int) -> None:
        """Watch one open directory (called from scanner threads).

        The kernel answers an existing watch's descriptor for a directory watched before (at its old path),
        so the call and the record are one step under the lock: a :meth:`forget` of the old path in between
        would remove the kernel's watch while the record says it is watched (its events lost for good)."""
        ino = os.fstat(fd).st_ino
        with self._lock:
            try:
                w = self._ino.add_watch(f"/proc/self/fd/{fd}", MASK)
            except OSError as e:
                if e.errno == errno.ENOSPC:
                    raise WatchLimit(str(e)) from None
                raise
            self._by_wd[w.wd] = (w, vf, relpath, ino)
            self._by_ino[(vf, ino)] = w.wd

    def forget(self, vf: Hashable, dirs: list[tuple[str, int]]) -> None:
        """Drop the watches of directories that left the vfolder (moved out, replaced): ``(relpath, inode)``
        as the tree held them. A watch is dropped only if it was last added for that directory at that path:
        one added since at another path (the directory walked where it went) or for another directory met
        at that path (a walk during a rotation) is not the one that left."""
        with self._lock:
            for rel, ino in dirs:
                wd = self._by_ino.get((vf, ino))
                if wd is None:
                    continue
                entry = self._by_wd.get(wd)
                if entry is not None and entry[1] == vf and entry[2] == rel and entry[3] == ino:
                    del self._by_wd[wd]
                    del self._by_ino[(vf, ino)]
                    try:
                        self._ino.rm_watch(entry[0])
                    except OSError:
                        pass  # already gone with its directory

    def forget_vfolder(self, vf: Hashable) -> None:
        with self._lock:
            dirs = [(rel, ino) for (_, v, rel, ino) in self._by_wd.values() if v == vf]
        self.forget(vf, dirs)

    def count(self) -> int:
        return len(self._by_wd)

    async def run(self, sink: Sink) -> None:
        loop = asyncio.get_running_loop()
        self._sink = sink
        loop.add_reader(self._ino.fd, self.drain)
        try:
            await loop.create_future()
        finally:
            loop.remove_reader(self._ino.fd)

    def drain(self, reads: int = 1) -> None:
        """Read what the kernel has queued (at most ``reads`` reads) and hand it to the sink; called by the
        event loop when the queue is readable, and by the engine before it answers, so a change made before
        the request is at least known as pending."""
        sink = self._sink
        if sink is None:
            return
        for _ in range(reads):
            batch = _Batch()
            try:
                self._ino._get(batch)  # noqa: SLF001 - asyncinotify's own parser, without its future
            except BlockingIOError:
                return
            if not batch.result:
                return
            for event in batch.result:
                self._handle(event, sink)

    def _handle(self, event, sink: Sink) -> None:  # noqa: ANN001 - asyncinotify.Event
        mask = event.mask
        if Mask.Q_OVERFLOW in mask:
            log.warning("inotify queue overflowed: events were lost; rescanning")
            sink.overflow()
            return
        watch = event.watch
        if watch is None:
            return
        with self._lock:
            entry = self._by_wd.get(watch.wd)
            if entry is not None and Mask.IGNORED in mask:
                del self._by_wd[watch.wd]
                if self._by_ino.get((entry[1], entry[3])) == watch.wd:
                    del self._by_ino[(entry[1], entry[3])]
        if entry is None:
            return
        _, vf, rel, ino = entry
        if Mask.IGNORED in mask or Mask.DELETE_SELF in mask or Mask.MOVE_SELF in mask:
            # the parent's own event re-reads it; the root going away is special
            sink.lost(vf, rel, deleted=Mask.DELETE_SELF in mask)
        else:
            sink.dirty(vf, rel, ino)
            if Mask.MOVED_FROM in mask and Mask.ISDIR in mask and event.name is not None:
                name = os.fsdecode(bytes(event.name))
                sink.moved_away(vf, f"{rel}/{name}" if rel else name)
                if len(self._moves) >= _MOVES_MAX:
                    self._moves.clear()  # moves out are never paired: forgetting one costs a rescan at most
                self._moves[event.cookie] = (vf, f"{rel}/{name}" if rel else name)
            if Mask.MOVED_TO in mask and Mask.ISDIR in mask:
                # the same rename's MOVED_FROM (same cookie) in this vfolder: the directory stayed in it
                src = self._moves.pop(event.cookie, None)
                if src is not None and src[0] == vf:
                    sink.moved_within(vf, src[1])
            if Mask.DELETE in mask and Mask.ISDIR in mask and event.name is not None:
                name = os.fsdecode(bytes(event.name))
                sink.lost(vf, f"{rel}/{name}" if rel else name, deleted=True)  # removed, not moved away

    def close(self) -> None:
        self._ino.close()
