"""Lifecycle locks: one per vfolder id and one per quota scope, held with ``flock(2)`` on lock files.

Create, delete and clone of vfolders, upload-token issue and scope deletion
must not interleave on the same vfolder or scope (a delete between a create's
prefix ``mkdir`` and its catalogue row, a scope removed under a clone). They
are serialised here:

* every vfolder operation holds its scope's lock **shared** and its vfolder's
  lock **exclusive** (a clone's source: shared, so clones of one source run
  side by side); deleting a scope holds the scope's lock **exclusive**;
* the locks are ``flock`` locks on files in a directory of the agent's own
  state (next to the catalogue), not in-process objects, so they also hold
  between several agent processes on one node (HTTP workers); each acquisition
  opens its own descriptor, so two tasks of one process exclude each other too;
* keys are hashed onto a fixed set of stripe files (no file per vfolder id to
  clean up); the stripes of one acquisition are merged (strongest mode) and
  taken in sorted order, so two operations never deadlock;
* waiting polls with ``LOCK_NB`` on the event loop — no worker thread ever
  sleeps in ``flock`` — and gives up after ``wait`` seconds with :class:`Busy`
  (409 naming what is busy), so a long clone makes a delete of its source
  answer 409 rather than hang.

Races that locks cannot cover (the shared ``aa/bb`` prefix directories and the
scope's ``.staging`` directory, emptied and removed by one operation while
another needs them) are handled where they happen, by retrying the ``mkdir``.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import hashlib
import os
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from pathlib import Path

from backends.errors import Busy

SHARED, EXCLUSIVE = fcntl.LOCK_SH, fcntl.LOCK_EX
VFOLDER_STRIPES = 1024
SCOPE_STRIPES = 64
WAIT = 60.0  # seconds a request waits for a lock before answering 409


def _stripe(key: str) -> str:
    kind, _, name = key.partition(":")
    n = VFOLDER_STRIPES if kind == "vf" else SCOPE_STRIPES
    h = int.from_bytes(hashlib.blake2b(name.encode("utf-8", "surrogateescape"), digest_size=8).digest(), "big")
    return f"{kind}-{h % n:04d}.lock"


def scope_key(volume: str, qsid: str) -> str:
    return f"scope:{volume}/{qsid}"


def vfolder_key(volume: str, vfid: object) -> str:
    return f"vf:{volume}/{vfid}"


class LifecycleLocks:
    """The lock files of one agent (a directory it owns); see the module docstring."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)

    def _open(self, stripe: str) -> int:
        return os.open(self.directory / stripe, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)

    @asynccontextmanager
    async def hold(self, wants: Iterable[tuple[str, int]], *, what: str, wait: float = WAIT) -> AsyncIterator[None]:
        """Hold every ``(key, SHARED|EXCLUSIVE)`` of ``wants``; raises :class:`Busy` naming ``what`` after ``wait``."""
        modes: dict[str, int] = {}
        for key, mode in wants:
            stripe = _stripe(key)
            modes[stripe] = EXCLUSIVE if EXCLUSIVE in (mode, modes.get(stripe)) else SHARED
        held: list[int] = []
        try:
            deadline = time.monotonic() + wait
            for stripe in sorted(modes):
                fd = self._open(stripe)
                held.append(fd)
                delay = 0.001
                while True:
                    try:
                        fcntl.flock(fd, modes[stripe] | fcntl.LOCK_NB)
                        break
                    except OSError as e:
                        if e.errno not in (errno.EWOULDBLOCK, errno.EINTR):
                            raise
                    if time.monotonic() >= deadline:
                        raise Busy(f"{what}: another operation on it is still running; try again later")
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 0.05)
            yield
        finally:
            for fd in reversed(held):
                os.close(fd)  # closing the descriptor releases its flock
