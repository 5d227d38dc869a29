"""The one path resolver: every path from a request or a token goes through here.

Paths are resolved by the kernel with ``openat2(2)`` and ``RESOLVE_BENEATH``
relative to a file descriptor of the vfolder root. The kernel refuses any
resolution — through ``..``, an absolute path or a symlink, including one that
already sits inside the vfolder — that would leave the root, and it does so
atomically: a directory swapped for a symlink between a check and a use cannot
redirect the walk, because there is no separate check.

Operations that act on an entry itself (delete, rename, move, mkdir) get the
entry's *parent* directory as a descriptor plus the final name, and then use
the ``*at`` system calls with that descriptor, so a symlink is acted on as a
link and never followed.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager

from backends.errors import FileOpError, InvalidPath

_SYS_OPENAT2 = 437  # the same number on every Linux architecture (unified syscall table)
_SYS_RENAMEAT2 = {"x86_64": 316, "aarch64": 276}.get(os.uname().machine)
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RENAME_NOREPLACE = 1

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def openat2(dir_fd: int, path: str, flags: int, resolve: int, mode: int = 0) -> int:
    """``openat2(2)``; raises OSError. EAGAIN (a concurrent rename) is retried."""
    how = _OpenHow(flags | os.O_CLOEXEC, mode, resolve)
    raw = os.fsencode(path)
    if b"\0" in raw:
        raise OSError(errno.EINVAL, "path contains a NUL byte")
    for _ in range(16):
        fd = _libc.syscall(_SYS_OPENAT2, ctypes.c_int(dir_fd), raw, ctypes.byref(how), ctypes.sizeof(how))
        if fd >= 0:
            return fd
        err = ctypes.get_errno()
        if err not in (errno.EAGAIN, errno.EINTR):
            raise OSError(err, os.strerror(err), path)
    raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN), path)


def rename_noreplace(src_dir_fd: int, src: str, dst_dir_fd: int, dst: str) -> None:
    """``renameat2(RENAME_NOREPLACE)``: never clobbers an existing destination."""
    if _SYS_RENAMEAT2 is None:  # pragma: no cover - other architectures
        if _exists(dst_dir_fd, dst):
            raise OSError(errno.EEXIST, os.strerror(errno.EEXIST), dst)
        os.rename(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)
        return
    rc = _libc.syscall(
        _SYS_RENAMEAT2, src_dir_fd, os.fsencode(src), dst_dir_fd, os.fsencode(dst), ctypes.c_uint(RENAME_NOREPLACE)
    )
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), dst)


def _exists(dir_fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def check_name(name: str) -> str:
    """A single path component for a new name (rename): no slash, not '.', '..' or empty."""
    if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\0" in name:
        raise InvalidPath(str(name), "must be a single file name")
    return name


def check_relpath(relpath: str) -> str:
    """Reject what can never be a path inside a vfolder (absolute, NUL), before any I/O."""
    return _clean(relpath)


def _clean(relpath: str) -> str:
    if not isinstance(relpath, str):
        raise InvalidPath(str(relpath), "must be a string")
    if "\0" in relpath:
        raise InvalidPath(relpath, "contains a NUL byte")
    if relpath.startswith("/"):
        raise InvalidPath(relpath, "must be relative to the vfolder")
    return relpath.rstrip("/") or "."


@contextmanager
def fs_errors(*relpaths: str) -> Iterator[None]:
    """Turn OSError into :class:`FileOpError` naming paths relative to the vfolder."""
    try:
        yield
    except FileOpError:
        raise
    except OSError as e:
        raise FileOpError(e.errno or errno.EIO, e.strerror or str(e), list(relpaths)) from None


class VFolderRoot:
    """An open vfolder root. Every path below it is resolved through this object.

    Use as a context manager; it owns an ``O_PATH`` descriptor of the root.
    """

    def __init__(self, fd: int, host_path: str) -> None:
        self.fd = fd
        self.host_path = host_path

    @classmethod
    def at(cls, volume_root: str, inner: str) -> VFolderRoot:
        """Open ``volume_root/inner`` with no symlink anywhere on the way."""
        base = os.open(volume_root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fd = openat2(base, inner, os.O_PATH | os.O_DIRECTORY, RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)
        finally:
            os.close(base)
        return cls(fd, os.path.join(volume_root, inner))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> VFolderRoot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- resolution ------------------------------------------------------------

    def open(self, relpath: str, flags: int = os.O_RDONLY, mode: int = 0) -> int:
        """Open ``relpath`` (symlinks followed, but only within the vfolder)."""
        path = _clean(relpath)
        try:
            return openat2(self.fd, path, flags, RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS, mode)
        except OSError as e:
            if e.errno == errno.EXDEV:
                raise InvalidPath(relpath, "resolves outside the vfolder") from None
            raise

    def open_dir(self, relpath: str) -> int:
        return self.open(relpath, os.O_RDONLY | os.O_DIRECTORY)

    @contextmanager
    def parent(self, relpath: str) -> Iterator[tuple[int, str]]:
        """Yield ``(parent_dir_fd, name)`` for acting on the entry ``relpath`` itself.

        The final component is never followed; it may not be '.' or '..'
        (the vfolder root itself cannot be renamed or deleted through a path).
        """
        path = _clean(relpath)
        head, _, name = path.rpartition("/")
        if name in (".", ".."):
            raise InvalidPath(relpath, "does not name an entry inside the vfolder")
        fd = self.open(head or ".", os.O_PATH | os.O_DIRECTORY)
        try:
            yield fd, name
        finally:
            os.close(fd)
