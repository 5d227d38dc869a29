"""Copy a directory tree by file descriptors: links stay links, nothing is followed.

Used by clone. Every directory is opened with ``O_NOFOLLOW`` relative to its
parent's descriptor, so a user who swaps a directory for a symlink while the
copy runs gets an error, never a copy of something outside the vfolder.
Regular files are reflinked where the filesystem can (``FICLONE``: btrfs, XFS
with reflink), else copied in the kernel with ``copy_file_range``. Files are
opened through :mod:`backends.safeopen`, so a FIFO swapped in for a file
cannot block the copy. FIFOs, sockets and devices are not copied (the
upstream proxy copies them; an agent that recreates device nodes a user
planted would hand them to the next container).
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from backends.safeopen import NotRegular, open_entry_at

FICLONE = 0x40049409
CHUNK = 1 << 28  # bytes per copy_file_range call: a cancelled copy of a big file stops within one
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class DestinationLost(FileNotFoundError):
    """A directory of the copy's destination was removed while the copy ran (someone else's cleanup)."""


class CopyCancelled(Exception):
    """The copy's caller gave up on it (:meth:`CancelFlag.cancel`): the copy stopped, publishing nothing."""


class CancelFlag:
    """Set by the coroutine awaiting a copy in a thread when it is cancelled; the thread looks at it between
    entries and, under its lock, right before publishing, so a cancelled copy is either already published
    (:meth:`cancel` says so) or never will be: the caller's records can match the disk either way."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cancelled = threading.Event()
        self._published = False

    def cancel(self) -> bool:
        """Stop the copy; whether it had already published (then it stays published)."""
        with self._lock:
            self._cancelled.set()
            return self._published

    def check(self) -> None:
        if self._cancelled.is_set():
            raise CopyCancelled("the copy was cancelled")

    @contextmanager
    def publishing(self) -> Iterator[None]:
        """Around the publishing step: refused once cancelled; counted as published if it returns."""
        with self._lock:
            self.check()
            yield
            self._published = True


def _lost_if_unlinked(dfd: int) -> None:
    """Called on ENOENT from a write into ``dfd``: a removed directory has no links left."""
    if os.fstat(dfd).st_nlink == 0:
        raise DestinationLost(errno.ENOENT, "a directory of the copy was removed while it ran")


def _copy_file_data(src: int, dst: int, size: int, cancel: CancelFlag | None = None) -> None:
    try:
        fcntl.ioctl(dst, FICLONE, src)
        return
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL, errno.ENOTTY, errno.EBADF):
            raise
    remaining = size
    while remaining > 0:
        if cancel is not None:
            cancel.check()
        n = os.copy_file_range(src, dst, min(remaining, CHUNK))
        if n == 0:
            break  # the source shrank while copying
        remaining -= n


def _copy_meta(
    st: os.stat_result, *, fd: int | None = None, dir_fd: int | None = None, name: str | None = None
) -> None:
    if fd is not None:
        os.fchown(fd, st.st_uid, st.st_gid)
        os.fchmod(fd, stat.S_IMODE(st.st_mode))
        os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))
    else:  # a symlink: its own owner and times (its mode is meaningless on Linux)
        assert name is not None, "a symlink is named relative to dir_fd"
        os.chown(name, st.st_uid, st.st_gid, dir_fd=dir_fd, follow_symlinks=False)
        os.utime(name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=dir_fd, follow_symlinks=False)


def _copy_entries(sfd: int, dfd: int, stack: list[tuple], cancel: CancelFlag | None = None) -> int:
    """Copy the files and links of one directory; queue its subdirectories."""
    copied = 0
    with os.scandir(sfd) as it:
        names = [e.name for e in it]
    for name in names:
        if cancel is not None:
            cancel.check()
        try:
            st = os.stat(name, dir_fd=sfd, follow_symlinks=False)
        except FileNotFoundError:
            continue
        if stat.S_ISDIR(st.st_mode):
            stack.append(("enter", sfd, dfd, name, st))
            continue
        if stat.S_ISLNK(st.st_mode):
            target = os.readlink(name, dir_fd=sfd)
            try:
                os.symlink(target, name, dir_fd=dfd)
            except FileNotFoundError:
                _lost_if_unlinked(dfd)
                raise
            _copy_meta(st, dir_fd=dfd, name=name)
        elif stat.S_ISREG(st.st_mode):
            try:
                s, st = open_entry_at(sfd, name)
            except (FileNotFoundError, NotRegular):
                continue  # gone, or swapped for a special file or a link since the stat: skipped
            try:
                try:
                    d = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600, dir_fd=dfd)
                except FileNotFoundError:
                    _lost_if_unlinked(dfd)
                    raise
                try:
                    _copy_file_data(s, d, st.st_size, cancel)
                    _copy_meta(st, fd=d)
                finally:
                    os.close(d)
            finally:
                os.close(s)
        else:
            continue  # FIFOs, sockets and devices are not copied
        copied += 1
    return copied


def copy_tree(
    src_fd: int, dst_fd: int, *, progress: Callable[[int], None] | None = None, cancel: CancelFlag | None = None
) -> int:
    """Copy the contents of directory ``src_fd`` into the empty directory ``dst_fd``.

    Returns the number of entries copied. Depth-first with an explicit stack;
    a directory's mode and times are set once its whole subtree is written, and
    only the descriptors along the current path are open (two per level). ``cancel``: looked at between
    entries (CopyCancelled; the caller removes what was written).
    """
    copied = 0
    stack: list[tuple] = [("exit", src_fd, dst_fd, os.fstat(src_fd), False)]
    try:
        copied += _copy_entries(src_fd, dst_fd, stack, cancel)
        while stack:
            item = stack.pop()
            if item[0] == "exit":
                _, sfd, dfd, st, owned = item
                try:
                    _copy_meta(st, fd=dfd)
                finally:
                    if owned:
                        os.close(sfd)
                        os.close(dfd)
                continue
            _, psfd, pdfd, name, st = item
            try:
                os.mkdir(name, 0o700, dir_fd=pdfd)
            except FileNotFoundError:
                _lost_if_unlinked(pdfd)
                raise
            csfd = os.open(name, _DIR_FLAGS, dir_fd=psfd)
            try:
                cdfd = os.open(name, _DIR_FLAGS, dir_fd=pdfd)
            except FileNotFoundError:
                os.close(csfd)
                raise DestinationLost(errno.ENOENT, "a directory of the copy was removed while it ran") from None
            except BaseException:
                os.close(csfd)
                raise
            stack.append(("exit", csfd, cdfd, st, True))
            copied += 1 + _copy_entries(csfd, cdfd, stack, cancel)
            if progress is not None:
                progress(copied)
    except BaseException:
        for item in stack:
            if item[0] == "exit" and item[4]:
                os.close(item[1])
                os.close(item[2])
        raise
    return copied


def count_entries(fd: int) -> int:
    """Entries strictly below the directory ``fd`` (directories, files, links, others), by descriptors, links
    never followed: what :func:`copy_tree` returned if nothing changed the copy meanwhile."""
    count = 0
    # a fresh open, not a dup: btrfs fixes a directory description's end at open, so one opened before the copy
    # wrote its entries (the held staging directory) lists none of them until rewound
    stack = [os.open(".", _DIR_FLAGS, dir_fd=fd)]
    try:
        while stack:
            dfd = stack.pop()
            try:
                with os.scandir(dfd) as it:
                    subdirs = []
                    for entry in it:
                        count += 1
                        if entry.is_dir(follow_symlinks=False):
                            subdirs.append(entry.name)
                for name in subdirs:
                    try:
                        stack.append(os.open(name, _DIR_FLAGS, dir_fd=dfd))
                    except FileNotFoundError:
                        count -= 1  # gone since the listing
            finally:
                os.close(dfd)
    finally:
        for dfd in stack:
            os.close(dfd)
    return count
