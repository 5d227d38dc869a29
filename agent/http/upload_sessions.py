"""Upload sessions held across the processes of one node, their staged files, and their background syncs.

Several processes serve the same tus sessions (HTTP workers; the engine sweeps and reconciles them): each
holds one :class:`UploadSessions` (``Agent.uploads``). A session is held (PATCH, publication, sweep,
start-up reconciliation) with an asyncio lock in this process and ``flock(LOCK_EX|LOCK_NB)`` on its staged
file, which excludes the other processes too; neither is ever waited for. Nothing here is a copy of a
session's row: the offset is always read from the catalogue while the session is held. The HTTP side is
agent/http/uploads.py; what runs once per node, agent/engine/upload_sweeper.py.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import errno
import fcntl
import functools
import logging
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from agent.runtime.owner import boot_id
from backends import cpu_placement
from backends.mounted import STAGING, MountedVolume
from backends.resolver import RESOLVE_BENEATH, RESOLVE_NO_SYMLINKS, openat2

if TYPE_CHECKING:
    from agent.runtime.context import Agent
    from catalog.store import UploadSessionRow

log = logging.getLogger(__name__)

PREFIX = "upload-"
STAGED_FLAGS = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC


def staged_name(session_id: str) -> str:
    return PREFIX + session_id


BUSY = "another PATCH for this upload is in progress; HEAD for the offset and retry"


class _Busy(Exception):
    """Another process holds the session's staged file."""


@dataclass
class Held:
    """A session held by this request. ``fd``: its staged file, open read-write and flock'ed (None when
    there is none); ``created``: this request created it; ``size``: its length when it was locked."""

    vol: MountedVolume
    qsid: str
    session_id: str
    fd: int | None = None
    created: bool = False
    size: int = 0

    def release(self) -> None:
        """Let go of the staged file (closing it releases the flock)."""
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)

    def drop(self) -> None:
        """Unlink the staged file (if the name is still ours) and release it: the session has ended, or the
        file was created for a session that already has bytes elsewhere (published, or lost)."""
        if self.fd is None:
            return
        try:
            sdir = open_staging(self.vol, self.qsid, create=False)
        except FileNotFoundError:
            pass
        else:
            try:
                name = staged_name(self.session_id)
                if _names(sdir, name, self.fd):
                    os.unlink(name, dir_fd=sdir)
            finally:
                os.close(sdir)
        self.release()


def _names(sdir: int, name: str, fd: int) -> bool:
    """Whether ``name`` in ``sdir`` is the file open as ``fd`` (its holder may have renamed or removed it)."""
    try:
        st = os.stat(name, dir_fd=sdir, follow_symlinks=False)
    except FileNotFoundError:
        return False
    fst = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (fst.st_dev, fst.st_ino)


_OPEN_STAGED = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC


def lock_staged(held: Held, *, create: bool) -> None:
    """Open the session's staged file (created when ``create``) and take its ``flock`` without waiting
    (:class:`_Busy`); ``held.fd`` stays None when there is no such file and ``create`` is false.

    The lock is on the inode: after taking it, the name must still point at that inode, else its holder
    renamed it into place or removed it before letting go, and the name is looked up again."""
    name = staged_name(held.session_id)
    for _ in range(5):
        try:
            sdir = open_staging(held.vol, held.qsid, create=create)
        except FileNotFoundError:
            if create:
                raise
            return
        try:
            created = False
            try:
                if create:
                    try:
                        fd = os.open(name, STAGED_FLAGS | os.O_EXCL, 0o600, dir_fd=sdir)
                        created = True
                    except FileExistsError:
                        fd = os.open(name, _OPEN_STAGED, dir_fd=sdir)
                else:
                    fd = os.open(name, _OPEN_STAGED, dir_fd=sdir)
            except FileNotFoundError:
                if not create:
                    return
                continue  # removed between the two opens, or the empty staging dir with it: look again
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if _names(sdir, name, fd):
                    held.fd, held.created, held.size = fd, created, os.fstat(fd).st_size
                    return
            except BlockingIOError:
                os.close(fd)
                raise _Busy from None
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
        finally:
            os.close(sdir)
    raise OSError(errno.ENOENT, "staged file keeps disappearing", STAGING)


SYNC_INTERVAL = 1.0  # seconds between the starts of two background syncs of one session


class UploadSessions:
    """This process's side of the upload sessions: who holds which session here, and the background syncs
    (tasks it owns: a stop finishes them, so a reboot after a clean stop loses nothing acknowledged)."""

    name = "upload sessions"

    def __init__(self) -> None:
        self._locks: dict[str, asyncio.Lock] = {}
        self._users: collections.Counter[str] = collections.Counter()
        self._synced: dict[str, int] = {}  # the newest offset this process made durable, per session
        self._waiting: dict[str, tuple[int, int]] = {}  # (fd, offset) the next sync covers
        self._syncing: dict[str, asyncio.Task[None]] = {}
        self._pauses: dict[str, asyncio.Future[None]] = {}  # a session's wait between two syncs; settle ends it
        self._settling = False

    # -- holding a session ------------------------------------------------------------------------------

    @asynccontextmanager
    async def hold(
        self,
        vol: MountedVolume,
        qsid: str,
        session_id: str,
        *,
        create: bool = False,
        take: Callable[[Held], None] | None = None,
    ) -> AsyncIterator[Held | None]:
        """Hold the session and yield its :class:`Held`, or yield None at once when someone else (a task
        here, or another process) holds it. ``take`` (in a worker thread) opens and locks the staged file;
        by default :func:`lock_staged` with ``create`` (a PATCH checks its target first, see _take_for_patch)."""
        lock = self._locks.setdefault(session_id, asyncio.Lock())
        self._users[session_id] += 1
        try:
            if lock.locked():
                yield None
                return
            async with lock:
                held = Held(vol, qsid, session_id)
                # on the transfer threads, which run on any CPU: a PATCH's client waits for this step (see
                # cpu_placement.wide_executor), and the pinned pool's SCHED_BATCH threads wait for the end of
                # the time slice of whatever runs on the agent's CPU (measured: 5-7 ms a PATCH on a busy node)
                loop = asyncio.get_running_loop()
                wide = cpu_placement.wide_executor()
                if take is None:
                    taking = loop.run_in_executor(wide, functools.partial(lock_staged, held, create=create))
                else:
                    taking = loop.run_in_executor(wide, take, held)
                try:
                    await asyncio.shield(taking)
                except _Busy:
                    yield None
                    return
                except asyncio.CancelledError:  # the thread goes on: what it takes is let go when it is done
                    taking.add_done_callback(lambda _: held.release())
                    raise
                try:
                    yield held
                finally:
                    held.release()
        finally:
            self._users[session_id] -= 1
            if self._users[session_id] <= 0:
                del self._users[session_id]
                self._locks.pop(session_id, None)

    # -- the session's row --------------------------------------------------------------------------------

    async def record(
        self, agent: Agent, row: UploadSessionRow, *, received: int, synced: int | None = None, state: str = "open"
    ) -> UploadSessionRow:
        """Record the acknowledged offset, with the newest durable offset known (given, or what a sync reached)."""
        sid = row.session_id
        if synced is None:
            synced = max(row.synced, self._synced.get(sid, 0))
        synced = min(synced, received)
        boot = boot_id() if synced < received else None
        await agent.catalog.update_upload_session(sid, received=received, synced=synced, boot_id=boot, state=state)
        return dataclasses.replace(row, received=received, synced=synced, boot_id=boot, state=state)

    # -- background durability: one fdatasync at a time per session, at most one a second ------------------

    def sync_later(self, agent: Agent, session_id: str, fd: int, offset: int) -> None:
        """Make the staged file durable up to ``offset`` in the background; a newer request replaces a waiting
        one. Each sync's offset is recorded in the catalogue as it lands (so any process's next answer, and a
        restart after a power cut, trust it).

        Syncs of one session start at most once a second: each ``fdatasync`` is a journal commit and a disk
        flush, and one per PATCH (or per batch of PATCHes) measured to cost a fast upload close to half its
        throughput. A power cut loses at most the last second's bytes, which ``HEAD`` then says to resend.
        """
        old = self._waiting.pop(session_id, None)
        if old is not None:
            os.close(old[0])
        self._synced.setdefault(session_id, 0)
        self._waiting[session_id] = (_reopen(fd), offset)
        if session_id not in self._syncing:
            self._syncing[session_id] = asyncio.create_task(
                self._sync_loop(agent, session_id), name=f"sync upload {session_id}"
            )

    async def _sync_loop(self, agent: Agent, session_id: str) -> None:
        loop = asyncio.get_running_loop()
        try:
            while (job := self._waiting.pop(session_id, None)) is not None:
                fd, offset = job
                started = loop.time()
                try:
                    await loop.run_in_executor(cpu_placement.wide_executor(), _sync_and_close, fd)
                except OSError as e:  # the bytes stay acknowledged; publication syncs again and reports a failure
                    log.warning("upload %s: background fdatasync failed: %s", session_id, e)
                    continue
                if offset > self._synced.get(session_id, 0):
                    self._synced[session_id] = offset
                try:
                    await agent.catalog.raise_upload_synced(session_id, offset)
                except Exception as e:  # the next PATCH's record carries it
                    log.warning("upload %s: recording the durable offset %d failed: %s", session_id, offset, e)
                if not self._settling:  # also when nothing waits yet: the next PATCH is likely on its way
                    await self._pause(session_id, started + SYNC_INTERVAL)
        finally:
            self._syncing.pop(session_id, None)
            if session_id not in self._waiting:
                self._synced.pop(session_id, None)  # the catalogue holds it now: memory stays flat

    async def _pause(self, session_id: str, until: float) -> None:
        loop = asyncio.get_running_loop()
        pause = self._pauses[session_id] = loop.create_future()
        timer = loop.call_at(until, _settle, pause)
        try:
            await pause
        finally:
            timer.cancel()
            self._pauses.pop(session_id, None)

    async def settle_all(self) -> None:
        """Finish the background syncs at once (each records its offset as it lands)."""
        self._settling = True
        try:
            for pause in self._pauses.values():
                _settle(pause)
            if self._syncing:
                await asyncio.gather(*self._syncing.values(), return_exceptions=True)
        finally:
            self._settling = False

    # -- the service: started and stopped with the agent ----------------------------------------------------

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        """At a clean stop (after the listeners closed): finish the background syncs, so a reboot after it
        loses nothing acknowledged."""
        await self.settle_all()


def service(agent: Agent) -> UploadSessions:
    """The agent's upload sessions as a service (``runtime/server.py`` starts and stops it with the others)."""
    return agent.uploads


def _reopen(fd: int) -> int:
    """A descriptor of the same file with its own open file description: a ``dup`` would share the flock,
    and a sync still waiting would keep the session held after its PATCH answered."""
    return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)


def _settle(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _sync_and_close(fd: int) -> None:
    """On a thread of :func:`cpu_placement.wide_executor`: already on every CPU (see :func:`sync_file`)."""
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)


def sync_file(fd: int) -> None:
    """fdatasync on any CPU: submitting a second's worth of written pages is CPU work, which on the agent's
    pinned CPU (backends/cpu_placement.py) would take turns with receiving the next bytes."""
    with cpu_placement.widened():
        os.fdatasync(fd)


# -- the staging area ---------------------------------------------------------------


def open_staging(vol: MountedVolume, qsid: str, *, create: bool) -> int:
    """An O_PATH descriptor of the scope's staging directory, reached with no symlink anywhere."""
    base = os.open(vol.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for _ in range(5):
            try:
                return openat2(
                    base, f"{qsid}/{STAGING}", os.O_PATH | os.O_DIRECTORY, RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS
                )
            except FileNotFoundError:
                if not create:
                    raise
            scope = openat2(base, qsid, os.O_PATH | os.O_DIRECTORY, RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)
            try:
                os.mkdir(STAGING, 0o700, dir_fd=scope)
            except FileExistsError:
                pass
            finally:
                os.close(scope)
        raise OSError(errno.ENOENT, "staging directory keeps disappearing", STAGING)
    finally:
        os.close(base)


def settle_held(held: Held, trusted: int) -> int:
    """Cut the held staged file back to ``trusted`` bytes if longer, and make what stays durable; returns
    its length before any cut (start-up reconciliation, agent/engine/upload_sweeper.py)."""
    assert held.fd is not None
    length = os.fstat(held.fd).st_size
    if length > trusted:
        os.ftruncate(held.fd, trusted)
    os.fdatasync(held.fd)
    return length


def remove_staged(vol: MountedVolume, qsid: str, session_id: str) -> None:
    try:
        sdir = open_staging(vol, qsid, create=False)
    except FileNotFoundError:
        return
    try:
        os.unlink(staged_name(session_id), dir_fd=sdir)
    except FileNotFoundError:
        pass
    finally:
        os.close(sdir)


__all__ = [
    "BUSY",
    "PREFIX",
    "STAGED_FLAGS",
    "Held",
    "UploadSessions",
    "boot_id",
    "lock_staged",
    "open_staging",
    "remove_staged",
    "service",
    "settle_held",
    "staged_name",
    "sync_file",
]
