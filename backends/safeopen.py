"""The one way to open a vfolder entry for reading: it cannot block and never opens a special file.

A user controls what sits in a vfolder and can swap entries at any moment
(``renameat2(RENAME_EXCHANGE)``), so a type seen by ``lstat`` proves nothing
about what a later ``open`` meets. A plain ``open(O_RDONLY)`` of a FIFO blocks
until a writer comes — a worker thread lost for good, and a bounded pool
emptied by a handful of planted FIFOs — and opening a device node can have
side effects (a watchdog armed, a tape rewound). So every read-open of a
vfolder entry goes through here:

1. the entry is opened with ``O_PATH`` (never blocks, never runs a driver's
   open; ``O_NOFOLLOW`` for a single name, the resolver's ``RESOLVE_BENEATH``
   for a path);
2. the type is taken with ``fstat`` on that descriptor (the inode is pinned);
3. only a regular file (or, where asked, a directory) is reopened for reading
   through ``/proc/self/fd`` — the same inode, so nothing swapped in meanwhile
   can be reached. Without procfs it falls back to ``O_NONBLOCK`` by name and
   checks that the inode is the one pinned.

Anything else raises :class:`NotRegular` (an OSError, ``EINVAL``); callers
decide to skip it (clone, zip) or refuse it (download, fetch: 400).
"""

from __future__ import annotations

import errno
import os
import stat
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from backends.resolver import VFolderRoot

_READ = os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY


class NotRegular(OSError):
    """The entry is not a regular file (nor an allowed directory): a FIFO, socket, device or symlink."""

    def __init__(self, st: os.stat_result) -> None:
        kind = stat.filemode(st.st_mode)[0]
        what = {"p": "a FIFO", "s": "a socket", "c": "a device", "b": "a device", "l": "a symlink", "d": "a directory"}
        super().__init__(errno.EINVAL, f"not a regular file ({what.get(kind, 'a special file')})")
        self.st = st


def _reopen(path_fd: int, flags: int, by_name: tuple[int, str] | None, st: os.stat_result) -> int:
    try:
        return os.open(f"/proc/self/fd/{path_fd}", flags)
    except FileNotFoundError:
        if by_name is None or os.path.isdir("/proc/self/fd"):
            raise  # procfs is there: the entry itself went (deleted while open is fine, this is not)
    dir_fd, name = by_name  # no procfs: by name, non-blocking, and only if it is still the pinned inode
    fd = os.open(name, flags | os.O_NONBLOCK | os.O_NOFOLLOW, dir_fd=dir_fd)
    now = os.fstat(fd)
    if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
        os.close(fd)
        raise OSError(errno.EAGAIN, "entry was replaced while it was opened", name)
    os.set_blocking(fd, True)
    return fd


def reopen_checked(
    path_fd: int, *, dirs: bool = False, by_name: tuple[int, str] | None = None
) -> tuple[int, os.stat_result]:
    """Turn an ``O_PATH`` descriptor (consumed: always closed) into a readable one of a regular file
    (or directory, with ``dirs``); raises :class:`NotRegular` for anything else."""
    try:
        st = os.fstat(path_fd)
        if stat.S_ISREG(st.st_mode):
            flags = _READ
        elif dirs and stat.S_ISDIR(st.st_mode):
            flags = _READ | os.O_DIRECTORY
        else:
            raise NotRegular(st)
        return _reopen(path_fd, flags, by_name, st), st
    finally:
        os.close(path_fd)


def open_entry_at(dir_fd: int, name: str, *, dirs: bool = False) -> tuple[int, os.stat_result]:
    """Open the single entry ``name`` of the directory ``dir_fd`` for reading; a symlink is not followed."""
    path_fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    return reopen_checked(path_fd, dirs=dirs, by_name=(dir_fd, name))


def open_in_root(root: VFolderRoot, relpath: str, *, dirs: bool = False) -> tuple[int, os.stat_result]:
    """Open ``relpath`` beneath a vfolder root for reading (links followed, within the vfolder only)."""
    return reopen_checked(root.open(relpath, os.O_PATH), dirs=dirs)
