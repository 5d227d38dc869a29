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

Several processes of one node serve the same sessions (HTTP workers): see
agent/http/upload_sessions.py for how they exclude each other, and
agent/engine/upload_sweeper.py for what runs once per node (start-up
reconciliation, expiry).
"""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import errno
import logging
import os
import posixpath
import stat
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import StreamReader
from aiohttp.http_exceptions import HttpProcessingError

from agent.http.errors import ApiError
from agent.http.upload_sessions import (
    BUSY,
    STAGED_FLAGS,
    Held,
    lock_staged,
    open_staging,
    remove_staged,
    staged_name,
    sync_file,
)
from backends import files, locks
from backends.errors import BackendError, FileOpError, InvalidPath, QuotaExceeded
from backends.ids import VFolderID
from backends.mounted import STAGING, MountedVolume
from backends.resolver import check_relpath, fs_errors

if TYPE_CHECKING:
    from agent.http.socket_body import SocketBody
    from agent.runtime.context import Agent
    from catalog.store import UploadSessionRow

log = logging.getLogger(__name__)

WRITE_BATCH = 4 << 20  # bytes gathered from the socket before one pwritev
MAX_PARTS = 512  # buffers in one pwritev (IOV_MAX is 1024 on Linux)
PUBLISHED_MODE = 0o644  # what the upstream proxy's uploads got under the usual umask

_libc = ctypes.CDLL(None, use_errno=True)
_SYNC_FILE_RANGE_WRITE = 2


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing a range back now, so the closing fdatasync has little left to wait for."""
    try:
        _libc.sync_file_range(fd, ctypes.c_int64(offset), ctypes.c_int64(length), _SYNC_FILE_RANGE_WRITE)
    except AttributeError:  # pragma: no cover - non-glibc
        pass


def _no_session(session_id: object) -> ApiError:
    return ApiError(404, f"no such upload session: {session_id}", "no-such-upload-session")


async def end_sessions(agent: Agent, vol: object, vfid: VFolderID) -> int:
    """Deleting a vfolder ends its upload sessions: rows forgotten (HEAD/PATCH → 404), staged bytes removed.

    Called under the vfolder's lifecycle lock. A PATCH running meanwhile (in this process or another) is not
    waited for. The row goes first: a PATCH that opens the staged file after its removal finds no session
    and removes what it created; one that had it open finds its file unlinked when it records (404)."""
    rows = await agent.catalog.upload_sessions(folder=(getattr(vol, "name", ""), vfid.qsid, vfid.hex))
    for row in rows:
        await agent.catalog.delete_upload_session(row.session_id)
        if isinstance(vol, MountedVolume):
            try:
                await asyncio.to_thread(remove_staged, vol, row.qsid, row.session_id)
            except OSError as e:  # start-up sweeps staged files no session names
                log.warning("upload %s: cannot remove its staged file: %s", row.session_id, e)
    if rows:
        log.info("vfolder %s deleted: ended %d upload session(s)", vfid, len(rows))
    return len(rows)


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
    row = await agent.catalog.get_upload_session(session_id)  # never a copy: another process may have moved it
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
    vol = await agent.volume(row.volume)
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
        async with agent.uploads.hold(upload.vol, row.qsid, row.session_id, create=row.size == 0) as held:
            if held is not None:
                fresh = await agent.catalog.get_upload_session(row.session_id)  # under the lock
                if fresh is None:
                    raise _no_session(row.session_id)
                if fresh.state == "complete":
                    return fresh.size
                try:
                    await _publish(agent, dataclasses.replace(upload, row=fresh))
                except (ApiError, BackendError) as e:
                    # never answer "complete" (offset == size) for a file that is not in place (disk full,
                    # read-only): a tus client would stop there. The status says it; a later HEAD publishes.
                    log.warning("upload %s: cannot publish to %s: %s", row.session_id, upload.target, e)
                    raise
    return row.received


class _TooMuch(Exception):
    """The body carries bytes past the declared size."""


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


def _take_for_patch(upload: Upload, held: Held) -> None:
    """A PATCH's hold: the target checked first (nothing is created for a target that cannot be published),
    then the staged file opened (created if missing) and locked."""
    _check_target(upload)
    with fs_errors(upload.target):
        lock_staged(held, create=True)


async def _append(
    agent: Agent, upload: Upload, offset: int, body: StreamReader, declared: int | None, spliced: SocketBody | None
) -> int:
    sid = upload.session_id
    async with agent.uploads.hold(
        upload.vol, upload.row.qsid, sid, take=lambda held: _take_for_patch(upload, held)
    ) as held:
        if held is None:
            raise ApiError(409, BUSY, "conflict")
        row = await agent.catalog.get_upload_session(sid)  # the offset: the catalogue's, read under the lock
        if held.created and (row is None or row.received > 0 or row.state != "open"):
            # no session's file: the session ended, or its bytes were published (or lost) meanwhile
            await asyncio.to_thread(held.drop)
        if row is None:
            raise _no_session(sid)
        return await _append_locked(agent, dataclasses.replace(upload, row=row), offset, body, declared, spliced, held)


async def _append_locked(
    agent: Agent,
    upload: Upload,
    offset: int,
    body: StreamReader,
    declared: int | None,
    spliced: SocketBody | None,
    held: Held,
) -> int:
    """The PATCH itself; the caller holds the session and read its row under the lock."""
    row = upload.row
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
    fd = held.fd
    if fd is None and row.received == row.size:  # every byte arrived and the file is gone: it was moved into place
        await _publish(agent, upload)
        return row.size
    length = held.size if fd is not None else 0
    if length < row.received:
        log.warning("upload %s: staged file holds %d of %d recorded bytes", row.session_id, length, offset)
        await agent.uploads.record(agent, row, received=length)
        raise ApiError(409, f"staged bytes were lost; resume from offset {length}", "conflict", offset=length)
    assert fd is not None  # found (length >= received) or created for a session still at 0
    if length > row.received:  # bytes of a PATCH that never completed: never acknowledged
        await asyncio.to_thread(_rollback, fd, row.received)
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
            agent.uploads.sync_later(agent, row.session_id, fd, offset + got)
            await asyncio.shield(agent.uploads.record(agent, row, received=offset + got))
        if isinstance(e, OSError) and not isinstance(e, ConnectionError):  # ENOSPC, EDQUOT, EIO ...
            raise FileOpError(e.errno or errno.EIO, e.strerror or str(e), [upload.target]) from None
        raise
    new = offset + got
    if got and new < row.size:  # the last PATCH is synced by publication instead
        agent.uploads.sync_later(agent, row.session_id, fd, new)
    if got:
        row = await agent.uploads.record(agent, row, received=new)
    if new < row.size and _unlinked(fd):  # an fstat of an open file: no disk access, no thread hop
        raise _no_session(row.session_id)  # its vfolder was deleted meanwhile (end_sessions): nothing is left
    if new == row.size:
        await _publish(agent, dataclasses.replace(upload, row=row))
    return new


def _unlinked(fd: int) -> bool:
    return os.fstat(fd).st_nlink == 0


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
    under the vfolder's lifecycle lock (held shared: a delete or re-create waits for the rename). The caller
    holds the session."""
    row = upload.row
    vfid = upload.vfid
    wants = [(locks.scope_key(row.volume, vfid.qsid), locks.SHARED)]
    wants.append((locks.vfolder_key(row.volume, vfid), locks.SHARED))
    async with agent.locks.hold(wants, what=f"vfolder {vfid}"):
        current = await agent.catalog.get_vfolder(row.volume, vfid.qsid, vfid.hex)
        other = row.incarnation is not None and (current is None or current.incarnation != row.incarnation)
        # deleted (and maybe created anew) since the token was issued, or its session ended by a delete
        if other or await agent.catalog.get_upload_session(row.session_id) is None:
            raise _no_session(row.session_id)
        published = await asyncio.to_thread(_move_into_place, upload)
        if not published:
            log.info("upload %s had already been moved into place", row.session_id)
        await agent.uploads.record(agent, row, received=row.size, synced=row.size, state="complete")


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
        sdir = open_staging(upload.vol, row.qsid, create=row.size == 0)
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
                fd = os.open(name, STAGED_FLAGS, 0o600, dir_fd=sdir)  # a zero-byte upload never had a PATCH body
            except FileNotFoundError:
                raise _StagingGone from None
        try:
            os.fchmod(fd, PUBLISHED_MODE)  # staged private, published like any file the user writes
            sync_file(fd)  # durable before it is visible (the background syncs may lag behind)
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


__all__ = ["FileOpError", "Upload", "append", "end_sessions", "offset_of", "open_upload", "target_path"]
