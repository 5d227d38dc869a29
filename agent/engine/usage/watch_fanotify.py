"""fanotify watcher: one ``FAN_MARK_FILESYSTEM`` mark per filesystem, events that name a directory.

With ``FAN_REPORT_DFID_NAME`` every event carries the file handle of the directory it happened in (and the
entry's name). The handle is turned into a path once (``open_by_handle_at`` + the ``/proc/self/fd`` link)
and cached. A directory move drops what it made wrong: the cached places at and below its old path (or, when
the cache is large or the old path unknown, the whole cache) and every "outside all vfolders" answer; a
removed directory's handle cannot come back (handles carry the inode's generation), so a deletion keeps the
cache. Lost events (a queue overflow) empty it. There is no per-directory watch, so no
``max_user_watches`` limit. Needs CAP_SYS_ADMIN (and CAP_DAC_READ_SEARCH for ``open_by_handle_at``) and
Linux >= 5.9; :func:`probe` says why it cannot be used when it cannot.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import logging
import os
import struct
import threading
from collections.abc import Hashable, Iterator

from agent.engine.usage.watch_inotify import Sink

log = logging.getLogger(__name__)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int, ctypes.c_char_p]
_libc.open_by_handle_at.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int]

FAN_CLOEXEC, FAN_NONBLOCK = 0x1, 0x2
FAN_REPORT_DIR_FID, FAN_REPORT_NAME = 0x400, 0x800
FAN_MARK_ADD, FAN_MARK_FILESYSTEM = 0x1, 0x100
FAN_MODIFY, FAN_ATTRIB, FAN_CLOSE_WRITE = 0x2, 0x4, 0x8
FAN_MOVED_FROM, FAN_MOVED_TO, FAN_CREATE, FAN_DELETE = 0x40, 0x80, 0x100, 0x200
FAN_DELETE_SELF, FAN_MOVE_SELF, FAN_Q_OVERFLOW, FAN_ONDIR = 0x400, 0x800, 0x4000, 0x40000000
EVENTS = FAN_MODIFY | FAN_ATTRIB | FAN_CLOSE_WRITE | FAN_MOVED_FROM | FAN_MOVED_TO | FAN_CREATE | FAN_DELETE | FAN_ONDIR
FAN_RENAME = 0x10000000  # Linux >= 5.17: one event with both ends of a rename
INFO_DFID_NAME, INFO_DFID, INFO_OLD_DFID_NAME, INFO_NEW_DFID_NAME = 2, 3, 10, 12
_META = struct.Struct("=IBBHQii")  # event_len, vers, reserved, metadata_len, mask, fd, pid
_INFO_HDR = struct.Struct("=BBH")
_FID_RECORDS = (INFO_DFID_NAME, INFO_DFID, INFO_OLD_DFID_NAME, INFO_NEW_DFID_NAME)


def _info_records(buf: bytes, pos: int, end: int) -> Iterator[tuple[int, bytes, bytes, bytes]]:
    """The file-id info records of one event, between ``pos`` and ``end``: (type, fsid, file handle, the
    bytes after the handle: a NUL-padded name, or only padding)."""
    while pos + _INFO_HDR.size <= end:
        info_type, _pad, info_len = _INFO_HDR.unpack_from(buf, pos)
        if info_len == 0:
            return
        if info_type in _FID_RECORDS:
            (hbytes,) = struct.unpack_from("=I", buf, pos + 12)
            fsid, handle = buf[pos + 4 : pos + 12], buf[pos + 12 : pos + 20 + hbytes]
            yield info_type, fsid, handle, buf[pos + 20 + hbytes : pos + info_len]
        pos += info_len
_CACHE_MAX = 16_384  # places cached at most (a full cache is emptied): deleted directories stay until then
_PRECISE_MAX = 4_096  # up to this many cached places a directory move drops only the wrong ones


def _err(what: str) -> OSError:
    e = ctypes.get_errno()
    return OSError(e, f"{what}: {os.strerror(e)}")


def probe(paths: list[str]) -> str | None:
    """None when fanotify filesystem marks work for every path here; else the kernel's reason."""
    fd = _libc.fanotify_init(FAN_CLOEXEC | FAN_NONBLOCK | FAN_REPORT_DIR_FID | FAN_REPORT_NAME, os.O_RDONLY)
    if fd < 0:
        return str(_err("fanotify_init(FAN_REPORT_DFID_NAME)"))
    try:
        for p in paths:
            if _libc.fanotify_mark(fd, FAN_MARK_ADD | FAN_MARK_FILESYSTEM, EVENTS, -100, os.fsencode(p)) < 0:
                return str(_err(f"fanotify_mark(FAN_MARK_FILESYSTEM, {p})"))
    finally:
        os.close(fd)
    return None


def _path_of(fd: int) -> tuple[str, bool]:
    """The path of an open directory, and whether it is exact.

    A directory deeper than PATH_MAX has no path the kernel will print
    (ENAMETOOLONG): then the path of its nearest printable ancestor is given,
    with ``False``, so the caller can rescan the vfolder holding it.
    """
    try:
        return os.readlink(f"/proc/self/fd/{fd}"), True
    except OSError as e:
        if e.errno != errno.ENAMETOOLONG:
            raise
    cur = os.open("..", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
    try:
        while True:
            try:
                return os.readlink(f"/proc/self/fd/{cur}"), False
            except OSError as e:
                if e.errno != errno.ENAMETOOLONG:
                    raise
            up = os.open("..", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=cur)
            os.close(cur)
            cur = up
    finally:
        os.close(cur)


class FanotifyWatcher:
    kind = "fanotify"
    per_directory = False  # one mark per filesystem

    def __init__(self, roots: list[str]) -> None:
        self._fd = _libc.fanotify_init(FAN_CLOEXEC | FAN_NONBLOCK | FAN_REPORT_DIR_FID | FAN_REPORT_NAME, os.O_RDONLY)
        if self._fd < 0:
            raise _err("fanotify_init")
        self._mount_fds: dict[bytes, int] = {}  # fsid -> an fd on that filesystem, for open_by_handle_at
        self._lock = threading.Lock()
        self._vfolders: dict[str, Hashable] = {}  # absolute vfolder root -> engine state
        self._prefixes: tuple[str, ...] = ()
        self._cache: dict[bytes, tuple[Hashable, str | None, int] | None] = {}  # handle -> (vf, relpath, ino)
        self._sink: Sink | None = None
        self._events = EVENTS | FAN_RENAME  # without FAN_RENAME every never-read directory moved is doubted
        for root in roots:
            self._mark(root)

    def _mark(self, path: str) -> None:
        flags = FAN_MARK_ADD | FAN_MARK_FILESYSTEM
        if _libc.fanotify_mark(self._fd, flags, self._events, -100, os.fsencode(path)) < 0:
            if self._events & FAN_RENAME and ctypes.get_errno() == errno.EINVAL:
                self._events = EVENTS  # a kernel before 5.17
            if _libc.fanotify_mark(self._fd, flags, self._events, -100, os.fsencode(path)) < 0:
                raise _err(f"fanotify_mark({path})")
        fsid = struct.pack("=Q", os.statvfs(path).f_fsid)
        if fsid not in self._mount_fds:
            self._mount_fds[fsid] = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._prefixes = tuple(sorted({*self._prefixes, path.rstrip("/") + "/"}))

    def add_vfolder(self, vf: Hashable, path: str, fs_fd: int) -> None:
        with self._lock:
            self._vfolders[path] = vf
            self._cache.clear()

    def watch(self, vf: Hashable, relpath: str, fd: int) -> None:
        """One mark covers the whole filesystem: nothing to add per directory."""

    def forget(self, vf: Hashable, dirs: list[tuple[str, int]]) -> None:
        """Nothing to drop: removed directories' handles are dead, moved ones' places were dropped at the move."""

    def forget_vfolder(self, vf: Hashable) -> None:
        with self._lock:
            for path in [p for p, v in self._vfolders.items() if v is vf]:
                del self._vfolders[path]
            self._cache.clear()

    def count(self) -> int:
        return len(self._mount_fds)

    def _locate(self, path: str) -> tuple[Hashable, str] | None:
        """(vfolder, relpath) of a directory path, or None when it is outside every vfolder."""
        if not path.startswith(self._prefixes):
            return None
        head, rest = path, ""
        while head and head != "/":
            vf = self._vfolders.get(head)
            if vf is not None:
                return vf, rest
            head, _, name = head.rpartition("/")
            rest = f"{name}/{rest}" if rest else name
        return None

    def _resolve(self, fsid: bytes, handle: bytes) -> tuple[Hashable, str | None, int] | None:
        key = fsid + handle
        try:
            return self._cache[key]
        except KeyError:
            pass
        mount_fd = self._mount_fds.get(fsid)
        found = None
        if mount_fd is not None:
            fd = _libc.open_by_handle_at(mount_fd, handle, os.O_PATH | os.O_CLOEXEC)
            if fd >= 0:
                try:
                    path, exact = _path_of(fd)
                    ino = os.fstat(fd).st_ino
                finally:
                    os.close(fd)
                with self._lock:
                    place = self._locate(path)
                if place is not None:
                    # deeper than PATH_MAX: no relpath, the engine rescans that vfolder; the inode lets the
                    # engine notice that the path names another directory by the time it is re-read
                    found = (place[0], place[1] if exact else None, ino)
            elif ctypes.get_errno() not in (errno.ESTALE, errno.ENOENT):
                log.debug("open_by_handle_at: %s", os.strerror(ctypes.get_errno()))
        if len(self._cache) > _CACHE_MAX:
            self._cache.clear()
        self._cache[key] = found
        return found

    def _drain(self, sink: Sink) -> None:
        """One bounded read per event-loop turn (the loop calls back while more is queued), so a storm of
        events elsewhere on the filesystem never holds an answer up for long."""
        try:
            buf = os.read(self._fd, 16 * 1024)
        except BlockingIOError:
            return
        if not buf:
            return
        self._parse(buf, sink)

    def drain(self, reads: int = 1) -> None:
        """Read what is queued now (at most ``reads`` reads): the engine calls this before it answers, so a
        change made before the request is at least known as pending."""
        if self._sink is None:
            return
        for _ in range(reads):
            try:
                buf = os.read(self._fd, 16 * 1024)
            except BlockingIOError:
                return
            if not buf:
                return
            self._parse(buf, self._sink)

    def _parse(self, buf: bytes, sink: Sink) -> None:
        off = 0
        while off + _META.size <= len(buf):
            event_len, _vers, _res, meta_len, mask, fd, _pid = _META.unpack_from(buf, off)
            if fd >= 0:
                os.close(fd)
            if mask & FAN_Q_OVERFLOW:
                log.warning("fanotify queue overflowed: events were lost; rescanning")
                with self._lock:
                    self._cache.clear()  # a lost directory move may have made cached places wrong
                sink.overflow()
                off += event_len
                continue
            moved = mask & (FAN_MOVED_FROM | FAN_MOVED_TO) if mask & FAN_ONDIR else 0
            pos, end = off + meta_len, off + event_len
            if mask & FAN_RENAME:
                if mask & FAN_ONDIR:
                    self._renamed(buf, pos, end, sink)
                off += event_len
                continue
            for info_type, fsid, handle, tail in _info_records(buf, pos, end):
                if info_type not in (INFO_DFID_NAME, INFO_DFID):
                    continue
                if moved:
                    self._dir_moved(fsid + handle, tail if info_type == INFO_DFID_NAME else None, moved)
                where = self._resolve(fsid, handle)
                if where is not None:
                    vf, drel, dino = where
                    if drel is None:
                        sink.watch_lost(vf)
                    else:
                        sink.dirty(vf, drel, dino)
                        if info_type == INFO_DFID_NAME and mask & FAN_ONDIR and mask & (FAN_DELETE | FAN_MOVED_FROM):
                            child = os.fsdecode(tail.split(b"\0", 1)[0])
                            rel = f"{drel}/{child}" if drel else child
                            if mask & FAN_DELETE:
                                sink.lost(vf, rel, deleted=True)
                            else:
                                sink.moved_away(vf, rel)
                elif info_type == INFO_DFID_NAME and mask & FAN_ONDIR and mask & (FAN_MOVED_FROM | FAN_DELETE):
                    self._root_event(tail, fsid, handle, sink)
            off += event_len

    def _renamed(self, buf: bytes, pos: int, end: int, sink: Sink) -> None:
        """A directory was renamed (FAN_RENAME, queued before its MOVED_FROM/MOVED_TO): when both ends are
        in one vfolder the engine is told the move stayed in it (else a move of a directory it never read
        is taken for a move out)."""
        ends: dict[int, tuple[Hashable, str | None, int] | None] = {}
        old_name = b""
        for info_type, fsid, handle, tail in _info_records(buf, pos, end):
            if info_type in (INFO_OLD_DFID_NAME, INFO_NEW_DFID_NAME):
                ends[info_type] = self._resolve(fsid, handle)
                if info_type == INFO_OLD_DFID_NAME:
                    old_name = tail.split(b"\0", 1)[0]
        old, new = ends.get(INFO_OLD_DFID_NAME), ends.get(INFO_NEW_DFID_NAME)
        if old is None or new is None or old[0] is not new[0] or old[1] is None or new[1] is None or not old_name:
            return
        name = os.fsdecode(old_name)
        sink.moved_within(old[0], f"{old[1]}/{name}" if old[1] else name)

    def _dir_moved(self, parent_key: bytes, raw_name: bytes | None, mask: int) -> None:
        """A directory was moved out of (FROM) or into (TO) the directory ``parent_key``: drop the cached
        places that became wrong, precisely while the cache is small, else all of them."""
        with self._lock:
            if len(self._cache) > _PRECISE_MAX or parent_key not in self._cache or raw_name is None:
                self._cache.clear()  # the old path is not known from the cache (or the scan would cost more)
                return
            parent = self._cache[parent_key]
            if mask & FAN_MOVED_TO:  # what was outside every vfolder may be inside one now
                for key in [k for k, v in self._cache.items() if v is None]:
                    del self._cache[key]
            if mask & FAN_MOVED_FROM:
                if parent is None or parent[1] is None:  # moved outside every vfolder (maybe an ancestor of
                    self._cache.clear()  # vfolder roots), or deeper than PATH_MAX: rare, so drop all
                    return
                vf, prel = parent[0], parent[1]
                name = os.fsdecode(raw_name.split(b"\0", 1)[0])
                old = f"{prel}/{name}" if prel else name
                below = old + "/"
                for key in [
                    k
                    for k, v in self._cache.items()
                    if v is not None and v[0] is vf and v[1] is not None and (v[1] == old or v[1].startswith(below))
                ]:
                    del self._cache[key]

    def _root_event(self, raw_name: bytes, fsid: bytes, handle: bytes, sink: Sink) -> None:
        """A directory outside every vfolder lost or gained an entry: maybe a vfolder root itself."""
        mount_fd = self._mount_fds.get(fsid)
        if mount_fd is None:
            return
        fd = _libc.open_by_handle_at(mount_fd, handle, os.O_PATH | os.O_CLOEXEC)
        if fd < 0:
            return
        try:
            parent, exact = _path_of(fd)
        finally:
            os.close(fd)
        if not exact:
            return  # a vfolder root is never deeper than PATH_MAX
        name = os.fsdecode(raw_name.split(b"\0", 1)[0])
        vf = self._vfolders.get(f"{parent}/{name}")
        if vf is not None:
            sink.lost(vf, "")

    async def run(self, sink: Sink) -> None:
        loop = asyncio.get_running_loop()
        self._sink = sink
        stopped = loop.create_future()
        loop.add_reader(self._fd, self._drain, sink)
        try:
            await stopped
        finally:
            loop.remove_reader(self._fd)

    def close(self) -> None:
        for fd in self._mount_fds.values():
            os.close(fd)
        self._mount_fds.clear()
        os.close(self._fd)
