"""tus 1.0.0 upload sessions: bytes staged outside every vfolder, durable offsets, atomic publication.

A session is a catalogue row (created by ``POST /folder/file/upload``). Its
bytes go to ``<volume root>/<qsid>/.staging/upload-<session>``: the same
filesystem (and btrfs subvolume / XFS project) as the scope's vfolders, so the
final move is a rename, but outside every vfolder's tree, so a partial upload
is never listed and never counted as vfolder usage.

Durability rule: a PATCH writes its bytes into the staged file and records
the new offset (``received``) before it answers; the bytes are then in the
kernel's page cache, which outlives the agent's process but not the machine.
So each session also records ``synced`` (bytes known durable: a background
``fdatasync`` per session, one at a time, catching up with the PATCHes) and
``boot_id`` (the boot that wrote the bytes past ``synced``). At start-up in
the same boot (the agent was killed) the acknowledged bytes are still there:
they are made durable and ``HEAD`` reports all of them. After a reboot (power
cut, kernel crash) only ``synced`` is trusted: the staged file is cut back to
it and ``HEAD`` reports that, so the client resends the rest rather than the
agent adopting a torn or zero-filled tail. Nothing is published before it is
durable: publication ``fdatasync``\\ s the file before the rename. Bytes past
``received`` were never acknowledged (the PATCH that wrote them did not
complete), so on restart and before every PATCH they are cut off.

Why not ``fdatasync`` before answering every PATCH: on an ordinary disk an 8 MiB
write plus its ``fdatasync`` takes tens of milliseconds (a journal commit
each), capping a tus upload at a few hundred MiB/s whatever the network does.

Publication (when ``received`` reaches ``size``): parents are created through
the resolver, the staged file is renamed onto ``[dst_dir/]relpath`` and the
directory fsynced, then the session is marked complete. An existing regular
file (or symlink) at the destination is replaced atomically — re-uploading a
file overwrites it, as with the upstream proxy — but a directory never is
(the kernel refuses with EISDIR → 409). If the agent dies between recording
the last bytes and publishing, the next ``HEAD`` or ``PATCH`` publishes; if it
dies after publishing but before marking complete, the staged file is gone
and the session is marked complete then.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import dataclasses
import errno
import logging
import os
import posixpath
import stat
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any

from aiohttp import StreamReader
from aiohttp.http_exceptions import HttpProcessingError

from agent.http.errors import ApiError
from agent.runtime.services import Periodic
from backends import cpu_placement, files, locks
from backends.errors import BackendError, FileOpError, InvalidPath, QuotaExceeded
from backends.ids import VFolderID
from backends.mounted import STAGING, MountedVolume
from backends.resolver import RESOLVE_BENEATH, RESOLVE_NO_SYMLINKS, check_relpath, fs_errors, openat2

if TYPE_CHECKING:
    from agent.http.socket_body import SocketBody
    from agent.runtime.context import Agent
    from catalog.store import UploadSessionRow

log = logging.getLogger(__name__)

PREFIX = "upload-"
WRITE_BATCH = 4 << 20  # bytes gathered from the socket before one pwritev
MAX_PARTS = 512  # buffers in one pwritev (IOV_MAX is 1024 on Linux)
PUBLISHED_MODE = 0o644  # what the upstream proxy's uploads got under the usual umask
_STAGED_FLAGS = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC

_libc = ctypes.CDLL(None, use_errno=True)
_SYNC_FILE_RANGE_WRITE = 2


def staged_name(session_id: str) -> str:
    return PREFIX + session_id


@cache
def boot_id() -> str | None:
    """This boot's id: bytes a process wrote in the same boot are still in the page cache after it was killed."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip() or None
    except OSError:  # pragma: no cover - no procfs: every restart is treated as a reboot
        return None


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing a range back now, so the closing fdatasync has little left to wait for."""
    try:
        _libc.sync_file_range(fd, ctypes.c_int64(offset), ctypes.c_int64(length), _SYNC_FILE_RANGE_WRITE)
    except AttributeError:  # pragma: no cover - non-glibc
        pass


# -- per-session serialisation ----------------------------------------------------

_locks: dict[str, asyncio.Lock] = {}
_users: collections.Counter[str] = collections.Counter()
_ended: set[str] = set()  # sessions ended (vfolder deleted) while a request of theirs was running


@asynccontextmanager
async def _session_lock(session_id: str) -> AsyncIterator[bool]:
    """Hold the session's lock and yield True, or yield False at once when someone else holds it.

    Never waiting keeps a second PATCH from queueing behind a long one (it gets 409 and HEADs again)."""
    lock = _locks.setdefault(session_id, asyncio.Lock())
    _users[session_id] += 1
    try:
        if lock.locked():
            yield False
            return
        async with lock:
            yield True
    finally:
        _users[session_id] -= 1
        if _users[session_id] <= 0:
            del _users[session_id]
            _locks.pop(session_id, None)
            _ended.discard(session_id)


# -- session rows: the catalogue, with this process's copy ------------------------------
#
# Only this process changes a session after the manager API created it, and every change goes through
# _record / _forget, so a row cached here is never stale. That spares a catalogue round trip (several
# thread hand-offs) per PATCH. Open sessions only: a finished one is dropped, so memory stays flat.

_rows: dict[str, UploadSessionRow] = {}


async def _row(agent: Agent, session_id: str) -> UploadSessionRow | None:
    row = _rows.get(session_id)
    if row is None:
        row = await agent.catalog.get_upload_session(session_id)
        if row is not None and row.state == "open":
            _rows[session_id] = row
    return row


async def create_session(
    agent: Agent,
    volume: str,
    qsid: str,
    folder_id: str,
    relpath: str,
    size: int,
    *,
    expires_at: float,
    incarnation: str | None = None,
) -> UploadSessionRow:
    """A new session row (the manager API's upload token names it), kept here too: its PATCHes read no row."""
    row = await agent.catalog.create_upload_session(
        volume, qsid, folder_id, relpath, size, expires_at=expires_at, incarnation=incarnation
    )
    _rows[row.session_id] = row
    return row


async def _record(
    agent: Agent, row: UploadSessionRow, *, received: int, synced: int | None = None, state: str = "open"
) -> UploadSessionRow:
    """Record the acknowledged offset, with the newest durable offset known (given, or what the syncer reached)."""
    sid = row.session_id
    if sid in _ended:  # its vfolder was deleted meanwhile: nothing of it may come back
        raise _no_session(sid)
    if synced is None:
        synced = max(row.synced, _synced.get(sid, 0))
    synced = min(synced, received)
    boot = boot_id() if synced < received else None
    await agent.catalog.update_upload_session(sid, received=received, synced=synced, boot_id=boot, state=state)
    new = dataclasses.replace(row, received=received, synced=synced, boot_id=boot, state=state)
    if state == "complete":  # rarely asked again (a late HEAD reads the catalogue): keep memory flat
        _rows.pop(sid, None)
        _synced.pop(sid, None)
    else:
        _rows[sid] = new
        _synced[sid] = max(synced, _synced.get(sid, 0))  # a sync may have finished while this was written
    return new


async def _forget(agent: Agent, session_id: str) -> None:
    await agent.catalog.delete_upload_session(session_id)
    _rows.pop(session_id, None)
    _synced.pop(session_id, None)


async def end_sessions(agent: Agent, vol: object, vfid: VFolderID) -> int:
    """Deleting a vfolder ends its upload sessions: staged bytes removed, rows forgotten (HEAD/PATCH → 404).

    Called under the vfolder's lifecycle lock. A PATCH running meanwhile is not waited for: it finds its
    session ended when it records its offset (404) and removes what it staged itself."""
    rows = await agent.catalog.upload_sessions(folder=(getattr(vol, "name", ""), vfid.qsid, vfid.hex))
    for row in rows:
        if _users.get(row.session_id):
            _ended.add(row.session_id)
        if isinstance(vol, MountedVolume):
            try:
                await asyncio.to_thread(remove_staged, vol, row.qsid, row.session_id)
            except OSError as e:  # start-up sweeps staged files no session names
                log.warning("upload %s: cannot remove its staged file: %s", row.session_id, e)
        await _forget(agent, row.session_id)
    if rows:
        log.info("vfolder %s deleted: ended %d upload session(s)", vfid, len(rows))
    return len(rows)


# -- background durability: one fdatasync at a time per session, at most one a second ---------------------

SYNC_INTERVAL = 1.0  # seconds between the starts of two background syncs of one session

_synced: dict[str, int] = {}  # the newest offset made durable, per session (recorded with the next change)
_waiting: dict[str, tuple[int, int]] = {}  # (dup'ed fd, offset) the next sync covers
_syncing: dict[str, asyncio.Task[None]] = {}
_pauses: dict[str, asyncio.Future[None]] = {}  # a session's wait between two syncs; settle_all ends it
_settling = False


def _sync_later(session_id: str, fd: int, offset: int) -> None:
    """Make the staged file durable up to ``offset`` in the background; a newer request replaces a waiting one.

    Syncs of one session start at most once a second: each ``fdatasync`` is a journal commit and a disk
    flush, and one per PATCH (or per batch of PATCHes) measured to cost a fast upload close to half its
    throughput. A power cut loses at most the last second's bytes, which ``HEAD`` then says to resend.
    """
    old = _waiting.pop(session_id, None)
    if old is not None:
        os.close(old[0])
    _synced.setdefault(session_id, 0)
    _waiting[session_id] = (os.dup(fd), offset)
    if session_id not in _syncing:
        _syncing[session_id] = asyncio.create_task(_sync_loop(session_id), name=f"sync upload {session_id}")


async def _sync_loop(session_id: str) -> None:
    loop = asyncio.get_running_loop()
    try:
        while (job := _waiting.pop(session_id, None)) is not None:
            fd, offset = job
            started = loop.time()
            try:
                await asyncio.to_thread(_sync_and_close, fd)
            except OSError as e:  # the bytes stay acknowledged; publication syncs again and reports a failure
                log.warning("upload %s: background fdatasync failed: %s", session_id, e)
                continue
            if session_id in _synced and offset > _synced[session_id]:
                _synced[session_id] = offset
            if not _settling:  # also when nothing waits yet: the next PATCH is likely on its way
                await _pause(session_id, started + SYNC_INTERVAL)
    finally:
        _syncing.pop(session_id, None)


def _settle(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


async def _pause(session_id: str, until: float) -> None:
    loop = asyncio.get_running_loop()
    pause = _pauses[session_id] = loop.create_future()
    timer = loop.call_at(until, _settle, pause)
    try:
        await pause
    finally:
        timer.cancel()
        _pauses.pop(session_id, None)


def _sync_and_close(fd: int) -> None:
    try:
        _flush(fd)
    finally:
        os.close(fd)


def _flush(fd: int) -> None:
    """fdatasync on any CPU: submitting a second's worth of written pages is CPU work, which on the agent's
    pinned CPU (backends/cpu_placement.py) would take turns with receiving the next bytes."""
    with cpu_placement.widened():
        os.fdatasync(fd)


async def settle_all(agent: Agent) -> None:
    """At a clean stop: finish the background syncs at once, so a reboot after it loses nothing acknowledged."""
    global _settling
    _settling = True
    try:
        for pause in _pauses.values():
            if not pause.done():
                pause.set_result(None)
        if _syncing:
            await asyncio.gather(*_syncing.values(), return_exceptions=True)
    finally:
        _settling = False
    for sid, row in list(_rows.items()):  # open sessions only (see _record)
        done = _synced.get(sid, row.synced)
        if done > row.synced:
            await _record(agent, row, received=row.received, synced=done)


# -- the session named by a token ---------------------------------------------------


@dataclass(frozen=True)
class Upload:
    row: UploadSessionRow
    vol: MountedVolume
    vfid: VFolderID
    target: str  # path inside the vfolder where the finished file goes

    @property
    def session_id(self) -> str:
        return self.row.session_id


def _no_session(session_id: object) -> ApiError:
    return ApiError(404, f"no such upload session: {session_id}", "no-such-upload-session")


def target_path(relpath: str, dst_dir: str | None) -> str:
    """``[dst_dir/]relpath``, refused early (before any byte is written) when it cannot name a file inside."""
    check_relpath(relpath)
    path = relpath
    if dst_dir:
        check_relpath(dst_dir)
        path = f"{dst_dir.rstrip('/')}/{relpath}"
    norm = posixpath.normpath(path)
    if norm == ".." or norm.startswith("../"):
        raise InvalidPath(path, "resolves outside the vfolder")
    name = path.rstrip("/").rpartition("/")[2]
    if name in ("", ".", ".."):
        raise InvalidPath(path, "does not name a file inside the vfolder")
    return path


async def open_upload(agent: Agent, claims: dict[str, Any], dst_dir: str | None, *, check: bool = True) -> Upload:
    """The live session a verified upload token names, cross-checked against the catalogue row.

    With ``check`` the target is also resolved (see :func:`_check_target`); PATCH does that in the same
    worker-thread hop that opens the staged file.
    """
    session_id = claims.get("session")
    if not isinstance(session_id, str) or not session_id:
        raise ApiError(403, "invalid token: it names no upload session", "invalid-token")
    row = await _row(agent, session_id)
    if row is None or row.expires_at < time.time():
        raise _no_session(session_id)
    try:
        vfid = VFolderID.parse(claims.get("vfid"))
    except ValueError:
        raise ApiError(403, "invalid token: bad vfid claim", "invalid-token") from None
    if (claims.get("volume"), vfid.qsid, vfid.hex, claims.get("relpath"), claims.get("size"), claims.get("inc")) != (
        row.volume,
        row.qsid,
        row.folder_id,
        row.relpath,
        row.size,
        row.incarnation,
    ):
        raise ApiError(403, "invalid token: its claims do not match the upload session", "invalid-token")
    vol = agent.volume(row.volume)
    if not isinstance(vol, MountedVolume):
        raise ApiError(400, f"volume {vol.name!r} does not take uploads", "unsupported-operation")
    upload = Upload(row, vol, vfid, target_path(row.relpath, dst_dir))
    if check:
        await asyncio.to_thread(_check_target, upload)
    return upload


def _check_target(upload: Upload) -> None:
    """Refuse, before any byte is written, a target that could not be published: one whose deepest existing
    ancestor resolves outside the vfolder (400) or is not a directory (400 ENOTDIR), or that is a directory (409).
    """
    target = upload.target
    head = target.rpartition("/")[0] or "."
    with fs_errors(target), upload.vol.open_vfolder(upload.vfid) as root:
        parts = [p for p in head.split("/") if p not in ("", ".")]
        for i in range(len(parts), -1, -1):
            try:
                fd = root.open("/".join(parts[:i]) or ".", os.O_PATH | os.O_DIRECTORY)
            except FileNotFoundError:
                continue
            os.close(fd)
            break
        try:
            with root.parent(target) as (dfd, name):
                st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError):
            return
        if stat.S_ISDIR(st.st_mode):
            raise ApiError(
                409, f"{target} is an existing directory; an upload cannot replace it", "conflict", paths=[target]
            )


# -- staging area -------------------------------------------------------------------


def _open_staging(vol: MountedVolume, qsid: str, *, create: bool) -> int:
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


def _open_staged(vol: MountedVolume, qsid: str, session_id: str) -> int:
    """The staged file, created empty if needed. Retries when a concurrent cleanup removed the empty staging dir."""
    for _ in range(5):
        sdir = _open_staging(vol, qsid, create=True)
        try:
            return os.open(staged_name(session_id), _STAGED_FLAGS, 0o600, dir_fd=sdir)
        except FileNotFoundError:
            continue
        finally:
            os.close(sdir)
    raise OSError(errno.ENOENT, "staging directory keeps disappearing", STAGING)


def settle_staged(vol: MountedVolume, qsid: str, session_id: str, trusted: int) -> int | None:
    """Cut the staged file back to ``trusted`` bytes if longer, and make what stays durable.

    Returns its length before any cut, or None when there is no staged file."""
    try:
        sdir = _open_staging(vol, qsid, create=False)
    except FileNotFoundError:
        return None
    try:
        fd = os.open(staged_name(session_id), os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=sdir)
    except FileNotFoundError:
        return None
    finally:
        os.close(sdir)
    try:
        length = os.fstat(fd).st_size
        if length > trusted:
            os.ftruncate(fd, trusted)
        os.fdatasync(fd)
        return length
    finally:
        os.close(fd)


def remove_staged(vol: MountedVolume, qsid: str, session_id: str) -> None:
    try:
        sdir = _open_staging(vol, qsid, create=False)
    except FileNotFoundError:
        return
    try:
        os.unlink(staged_name(session_id), dir_fd=sdir)
    except FileNotFoundError:
        pass
    finally:
        os.close(sdir)


def _pwrite_all(fd: int, parts: list[bytes], pos: int) -> None:
    """Write the buffers at ``pos`` with one pwritev (no joining copy); a short write finishes with pwrite."""
    length = sum(len(p) for p in parts)
    done = os.pwritev(fd, parts, pos) if parts else 0
    if done < length:
        rest = memoryview(b"".join(parts))[done:]
        while rest:
            n = os.pwrite(fd, rest, pos + done)
            rest = rest[n:]
            done += n
    _start_writeback(fd, pos, length)


# -- HEAD and PATCH -------------------------------------------------------------------


async def offset_of(agent: Agent, upload: Upload) -> int:
    """The offset for HEAD: every acknowledged byte (see the module's durability rule).

    A session whose bytes have all arrived but that is not published yet (the agent died in between, or it
    is a zero-byte upload, for which tus clients send no PATCH at all) is published now.
    """
    row = upload.row
    if row.state == "complete":
        return row.size
    if row.received == row.size:
        async with _session_lock(row.session_id) as mine:
            if mine:
                try:
                    await _publish(agent, upload)
                except (ApiError, BackendError) as e:
                    # never answer "complete" (offset == size) for a file that is not in place (disk full,
                    # read-only): a tus client would stop there. The status says it; a later HEAD publishes.
                    log.warning("upload %s: cannot publish to %s: %s", row.session_id, upload.target, e)
                    raise
    return row.received


class _TooMuch(Exception):
    """The body carries bytes past the declared size."""


class _Lost(Exception):
    """The staged file is shorter than the recorded offset (someone cut it): the client resumes from its length."""

    def __init__(self, length: int) -> None:
        super().__init__(length)
        self.length = length


async def append(
    agent: Agent,
    upload: Upload,
    offset: int,
    body: StreamReader,
    declared: int | None,
    spliced: SocketBody | None = None,
) -> int:
    """Append a PATCH body at ``offset`` (read from ``spliced`` when given); returns the new offset. A full
    quota scope is named."""
    try:
        return await _append(agent, upload, offset, body, declared, spliced)
    except FileOpError as e:
        if e.errno != errno.EDQUOT:
            raise
        what = f"store upload {upload.target} (what was written before the limit is kept; HEAD tells the offset)"
        raise QuotaExceeded.at_limit(upload.vol.name, upload.row.qsid, what) from None


async def _append(
    agent: Agent, upload: Upload, offset: int, body: StreamReader, declared: int | None, spliced: SocketBody | None
) -> int:
    async with _session_lock(upload.session_id) as mine:
        if not mine:
            raise ApiError(
                409, "another PATCH for this upload is in progress; HEAD for the offset and retry", "conflict"
            )
        try:
            return await _append_locked(agent, upload, offset, body, declared, spliced)
        finally:
            if upload.session_id in _ended:  # its vfolder was deleted while this PATCH ran: drop what it staged
                await asyncio.shield(asyncio.to_thread(remove_staged, upload.vol, upload.row.qsid, upload.session_id))


async def _append_locked(
    agent: Agent, upload: Upload, offset: int, body: StreamReader, declared: int | None, spliced: SocketBody | None
) -> int:
    """The PATCH itself; the caller holds the session's lock."""
    row = await _row(agent, upload.session_id)  # fresh, under the lock
    if row is None:
        raise _no_session(upload.session_id)
    upload = Upload(row, upload.vol, upload.vfid, upload.target)
    max_size = agent.config.storage_proxy.max_upload_size
    if row.size > max_size:
        raise ApiError(413, f"upload size {row.size} exceeds max-upload-size {max_size}", "upload-too-large")
    if offset != row.received:
        raise ApiError(
            409,
            f"Upload-Offset {offset} does not match the current offset {row.received}",
            "conflict",
            offset=row.received,
        )
    if row.state == "complete":
        if declared:
            raise ApiError(413, "the upload is already complete", "upload-too-large")
        return row.size
    remaining = row.size - offset
    if declared is not None and declared > remaining:
        raise ApiError(
            413, f"the body ({declared} bytes) goes past the declared size ({row.size} bytes)", "upload-too-large"
        )
    try:
        fd = await asyncio.to_thread(_prepare_staged, upload)  # checks the target first
    except _Lost as lost:
        log.warning("upload %s: staged file holds %d of %d recorded bytes", row.session_id, lost.length, offset)
        await _record(agent, row, received=lost.length)
        raise ApiError(
            409, f"staged bytes were lost; resume from offset {lost.length}", "conflict", offset=lost.length
        ) from None
    try:
        try:
            if spliced is not None:  # its length is the declared one, checked above against the size
                idle = agent.config.api.client.idle_timeout
                got = await spliced.copy_to(
                    lambda parts, pos: _pwrite_all(fd, parts, pos),
                    lambda pos, length: _start_writeback(fd, pos, length),
                    fd,
                    offset,
                    idle,
                )
            else:
                got = await _receive(body, fd, offset, remaining)
        except _TooMuch:
            await asyncio.to_thread(_rollback, fd, offset)
            raise ApiError(
                413,
                f"the body goes past the declared size ({row.size} bytes); nothing was written",
                "upload-too-large",
            ) from None
        except BaseException as e:
            # the client went away or a write failed: keep what was written (tus: store as much as possible)
            got = await asyncio.shield(asyncio.to_thread(_written_length, fd, offset))
            if got:
                _sync_later(row.session_id, fd, offset + got)
                await asyncio.shield(_record(agent, row, received=offset + got))
            if isinstance(e, OSError) and not isinstance(e, ConnectionError):  # ENOSPC, EDQUOT, EIO ...
                raise FileOpError(e.errno or errno.EIO, e.strerror or str(e), [upload.target]) from None
            raise
        new = offset + got
        if got and new < row.size:  # the last PATCH is synced by publication instead
            _sync_later(row.session_id, fd, new)
    finally:
        os.close(fd)
    if got:
        row = await _record(agent, row, received=new)
    if new == row.size:
        await _publish(agent, dataclasses.replace(upload, row=row))
    return new


def _prepare_staged(upload: Upload) -> int:
    """Open the staged file at exactly the recorded offset: cut an unacknowledged tail, notice lost bytes."""
    row = upload.row
    _check_target(upload)
    with fs_errors(upload.target):
        fd = _open_staged(upload.vol, row.qsid, row.session_id)
        try:
            size = os.fstat(fd).st_size
            if size > row.received:
                os.ftruncate(fd, row.received)
            elif size < row.received:
                raise _Lost(size)
        except BaseException:
            os.close(fd)
            raise
    return fd


async def _receive(body: StreamReader, fd: int, offset: int, limit: int) -> int:
    """Copy the body into the staged file from ``offset``; at most ``limit`` bytes.

    Writing one batch overlaps with reading the next from the socket. When the body breaks off, what
    arrived is still written before the error goes up (the caller makes it durable and records it).
    """
    pos = offset
    total = 0
    parts: list[bytes] = []
    gathered = 0
    pending: asyncio.Future[None] | None = None
    try:
        while True:
            try:
                chunk = await body.readany()
            except (ConnectionError, HttpProcessingError):
                if pending is not None:
                    await pending
                    pending = None
                if parts:
                    await asyncio.to_thread(_pwrite_all, fd, parts, pos)
                raise
            if not chunk:
                break
            total += len(chunk)
            if total > limit:
                raise _TooMuch
            parts.append(chunk)
            gathered += len(chunk)
            if gathered >= WRITE_BATCH or len(parts) >= MAX_PARTS:
                if pending is not None:
                    await pending
                pending = asyncio.ensure_future(asyncio.to_thread(_pwrite_all, fd, parts, pos))
                pos += gathered
                parts, gathered = [], 0
        if pending is not None:
            await pending
            pending = None
        if parts:
            await asyncio.to_thread(_pwrite_all, fd, parts, pos)
        pos += gathered
    finally:
        if pending is not None:
            try:
                await asyncio.shield(pending)
            except Exception:
                pass
    return pos - offset


def _rollback(fd: int, offset: int) -> None:
    os.ftruncate(fd, offset)


def _written_length(fd: int, offset: int) -> int:
    """After an interrupted PATCH: how much of it reached the file."""
    try:
        length = os.fstat(fd).st_size
    except OSError:
        os.ftruncate(fd, offset)
        return 0
    return max(0, length - offset)


# -- publication ----------------------------------------------------------------------


async def _publish(agent: Agent, upload: Upload) -> None:
    """Move the finished file into its vfolder -- only the incarnation the session was issued for, checked
    under the vfolder's lifecycle lock (held shared: a delete or re-create waits for the rename)."""
    row = upload.row
    vfid = upload.vfid
    wants = [(locks.scope_key(row.volume, vfid.qsid), locks.SHARED)]
    wants.append((locks.vfolder_key(row.volume, vfid), locks.SHARED))
    async with agent.locks.hold(wants, what=f"vfolder {vfid}"):
        current = await agent.catalog.get_vfolder(row.volume, vfid.qsid, vfid.hex)
        other = row.incarnation is not None and (current is None or current.incarnation != row.incarnation)
        if row.session_id in _ended or other:  # deleted (and maybe created anew) since the token was issued
            raise _no_session(row.session_id)
        await _publish_locked(agent, upload)


async def _publish_locked(agent: Agent, upload: Upload) -> None:
    row = upload.row
    published = await asyncio.to_thread(_move_into_place, upload)
    if not published:
        log.info("upload %s had already been moved into place before a restart", row.session_id)
    await _record(agent, row, received=row.size, synced=row.size, state="complete")


class _StagingGone(Exception):
    """The empty staging directory was removed (another operation's cleanup) after we opened it."""


def _move_into_place(upload: Upload) -> bool:
    """Rename the staged file onto the target (parents created). False when it was already published."""
    for _ in range(5):
        try:
            return _move_once(upload)
        except _StagingGone:
            continue
    raise OSError(errno.ENOENT, "staging directory keeps disappearing", STAGING)


def _move_once(upload: Upload) -> bool:
    row = upload.row
    target = upload.target
    try:
        sdir = _open_staging(upload.vol, row.qsid, create=row.size == 0)
    except FileNotFoundError:
        return False
    try:
        name = staged_name(row.session_id)
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=sdir)
        except FileNotFoundError:
            if row.size > 0:
                return False
            try:
                fd = os.open(name, _STAGED_FLAGS, 0o600, dir_fd=sdir)  # a zero-byte upload never had a PATCH body
            except FileNotFoundError:
                raise _StagingGone from None
        try:
            os.fchmod(fd, PUBLISHED_MODE)  # staged private, published like any file the user writes
            _flush(fd)  # durable before it is visible (the background syncs may lag behind)
        finally:
            os.close(fd)
        with upload.vol.open_vfolder(upload.vfid) as root:
            head = target.rpartition("/")[0]
            if head:
                files.mkdir(root, head, parents=True, exist_ok=True)
            with fs_errors(target), root.parent(target) as (dfd, dname):
                try:
                    os.rename(name, dname, src_dir_fd=sdir, dst_dir_fd=dfd)
                except IsADirectoryError:
                    raise ApiError(
                        409, f"{target} is a directory; the upload was not moved there", "conflict", paths=[target]
                    ) from None
                dir_fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dfd)
                try:
                    os.fsync(dir_fd)
                finally:
                    os.close(dir_fd)
        return True
    finally:
        os.close(sdir)


# -- restart and expiry ---------------------------------------------------------------


async def reconcile(agent: Agent) -> None:
    """At start-up: bring every open session's staged file in line with what its row says can be trusted.

    Killed in this boot: every acknowledged byte is still in the page cache, so it is made durable. After a
    reboot: only the bytes recorded as synced are, so the file is cut back to them (see the module docstring).
    """
    this_boot = boot_id()
    for row in await agent.catalog.upload_sessions(state="open"):
        vol = agent.volumes.get(row.volume)
        if not isinstance(vol, MountedVolume):
            continue
        state = agent.states.get(row.volume)
        if state is not None and not state.serving:
            continue
        if await agent.catalog.get_vfolder(row.volume, row.qsid, row.folder_id) is None:
            # its vfolder was deleted (the agent died before the delete ended its sessions): end it now
            try:
                await asyncio.to_thread(remove_staged, vol, row.qsid, row.session_id)
                await _forget(agent, row.session_id)
            except OSError as e:
                log.warning("upload %s: cannot remove its staged file: %s", row.session_id, e)
            continue
        rebooted = row.synced < row.received and (this_boot is None or row.boot_id != this_boot)
        trusted = row.synced if rebooted else row.received
        try:
            length = await asyncio.to_thread(settle_staged, vol, row.qsid, row.session_id, trusted)
            if length is None:
                if row.received == row.size and row.size > 0:
                    await _record(agent, row, received=row.size, synced=row.size, state="complete")
                elif row.received:
                    log.warning("upload %s: staged bytes are gone; the client must start again", row.session_id)
                    await _record(agent, row, received=0, synced=0)
                continue
            if length > trusted:
                where = "the last durable offset (written before a reboot)" if rebooted else "the recorded offset"
                log.info("upload %s: cut %d byte(s) back to %s %d", row.session_id, length - trusted, where, trusted)
            if length < trusted:
                log.warning(
                    "upload %s: staged file holds %d of %d recorded bytes; resuming from %d",
                    row.session_id,
                    length,
                    trusted,
                    length,
                )
            kept = min(length, trusted)
            if (kept, kept) != (row.received, row.synced):
                await _record(agent, row, received=kept, synced=kept)
        except OSError as e:
            log.warning("upload %s: cannot check its staged file: %s", row.session_id, e)


async def sweep(agent: Agent, now: float | None = None) -> int:
    """Remove expired sessions (open or complete) and their staged bytes; returns how many."""
    now = time.time() if now is None else now
    swept = 0
    for row in await agent.catalog.upload_sessions(expired_before=now):
        async with _session_lock(row.session_id) as mine:
            if not mine:
                continue  # a PATCH is running; the next round gets it
            vol = agent.volumes.get(row.volume)
            if isinstance(vol, MountedVolume):
                try:
                    await asyncio.to_thread(remove_staged, vol, row.qsid, row.session_id)
                except OSError as e:
                    log.warning("upload %s: cannot remove its staged file: %s", row.session_id, e)
                    continue
            await _forget(agent, row.session_id)
            swept += 1
    if swept:
        log.info("swept %d expired upload session(s)", swept)
    return swept


class UploadSweeper:
    """Reconciles staged uploads at start-up, then removes expired sessions periodically."""

    name = "upload sweeper"

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        # a quarter of the session lifetime, between one second and five minutes
        interval = min(300.0, max(1.0, agent.config.storage_proxy.session_expire / 4))
        self._sweeps = Periodic("sweeping expired upload sessions", interval, lambda: sweep(agent))

    async def start(self) -> None:
        await reconcile(self.agent)
        await sweep(self.agent)
        await self._sweeps.start()

    async def stop(self) -> None:
        await self._sweeps.stop()
        try:
            await settle_all(self.agent)
        except Exception:
            log.exception("recording the upload sessions' durable offsets at stop failed")


def sweeper(agent: Agent) -> UploadSweeper:
    return UploadSweeper(agent)


__all__ = ["FileOpError", "Upload", "UploadSweeper", "append", "offset_of", "open_upload", "sweep", "sweeper"]
