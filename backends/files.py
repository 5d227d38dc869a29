"""File operations inside one vfolder, for every backend with a mounted filesystem.

All functions here are blocking (the agent runs them in worker threads) and
take a :class:`~backends.resolver.VFolderRoot`; paths are always relative to
it and resolved by it, never joined onto host paths.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass

from backends.errors import FileOpError
from backends.resolver import VFolderRoot, check_name, check_relpath, fs_errors, rename_noreplace
from backends.rmtree import remove_tree_at
from backends.safeopen import NotRegular, open_in_root


@dataclass(frozen=True)
class EntryInfo:
    name: str
    type: str  # FILE | DIRECTORY | SYMLINK
    mode: int
    size: int
    ctime: float
    mtime: float
    symlink_target: str


def _type_of(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "SYMLINK"
    if stat.S_ISDIR(mode):
        return "DIRECTORY"
    return "FILE"


def _parts(relpath: str) -> list[str]:
    """The components of a relpath, refused (absolute, NUL) by the same check every route's resolve uses."""
    return [p for p in check_relpath(relpath).split("/") if p not in ("", ".")]


def mkdir(root: VFolderRoot, relpath: str, *, parents: bool, exist_ok: bool) -> None:
    parts = _parts(relpath)
    if not parts:
        if exist_ok:
            return
        raise FileOpError(errno.EEXIST, os.strerror(errno.EEXIST), [relpath])
    steps = range(1, len(parts) + 1) if parents else [len(parts)]
    with fs_errors(relpath):
        for i in steps:
            sub = "/".join(parts[:i])
            if parts[i - 1] == "..":
                continue
            last = i == len(parts)
            with root.parent(sub) as (fd, name):
                try:
                    os.mkdir(name, 0o755, dir_fd=fd)
                except FileExistsError:
                    # lstat: a link's target is never looked at here (it may be outside the vfolder); an
                    # intermediate link is left to the next step, which resolves it beneath the root
                    mode = os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode
                    if last and (not exist_ok or not stat.S_ISDIR(mode)):
                        raise
                    if not last and not (stat.S_ISDIR(mode) or stat.S_ISLNK(mode)):
                        raise


def require(root: VFolderRoot, relpath: str) -> None:
    """Raise :class:`FileOpError` unless ``relpath`` exists inside the vfolder."""
    with fs_errors(relpath):
        os.close(root.open(relpath, os.O_PATH))


def listdir(root: VFolderRoot, relpath: str, *, limit: int) -> list[EntryInfo]:
    """Direct children of a directory, links described not followed, at most ``limit`` (0: all, as upstream's
    ``scandir-limit = 0``)."""
    items: list[EntryInfo] = []
    with fs_errors(relpath):
        fd = root.open_dir(relpath)
        try:
            with os.scandir(fd) as it:
                for entry in it:
                    if limit and len(items) >= limit:
                        break
                    try:
                        st = entry.stat(follow_symlinks=False)
                        target = os.readlink(entry.name, dir_fd=fd) if stat.S_ISLNK(st.st_mode) else ""
                    except FileNotFoundError:
                        continue  # removed while listing
                    items.append(
                        EntryInfo(
                            entry.name, _type_of(st.st_mode), st.st_mode, st.st_size, st.st_ctime, st.st_mtime, target
                        )
                    )
        finally:
            os.close(fd)
    return items


def rename(root: VFolderRoot, relpath: str, new_name: str) -> None:
    check_name(new_name)
    with fs_errors(relpath), root.parent(relpath) as (fd, name):
        rename_noreplace(fd, name, fd, new_name)


def move(root: VFolderRoot, src: str, dst: str) -> None:
    """Like ``mv``: into ``dst`` when it is an existing directory, else to ``dst``. Never overwrites."""
    with fs_errors(src, dst), root.parent(src) as (sfd, sname):
        os.stat(sname, dir_fd=sfd, follow_symlinks=False)  # ENOENT names the source first
        try:
            into = root.open(dst, os.O_PATH | os.O_DIRECTORY)
        except (FileNotFoundError, NotADirectoryError):
            into = None
        if into is not None:
            try:
                rename_noreplace(sfd, sname, into, sname)
            finally:
                os.close(into)
            return
        with root.parent(dst) as (dfd, dname):
            rename_noreplace(sfd, sname, dfd, dname)


def delete(root: VFolderRoot, relpaths: list[str], *, recursive: bool) -> None:
    """Delete entries; a symlink is removed as a link. Directories need ``recursive`` unless empty."""
    for relpath in relpaths:
        with fs_errors(relpath), root.parent(relpath) as (fd, name):
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            if not stat.S_ISDIR(st.st_mode):
                os.unlink(name, dir_fd=fd)
            elif recursive:
                remove_tree_at(fd, name)
            else:
                os.rmdir(name, dir_fd=fd)


def open_regular(root: VFolderRoot, relpath: str) -> tuple[int, os.stat_result]:
    """Open a regular file for reading (links followed within the vfolder); never blocks (see safeopen)."""
    with fs_errors(relpath):
        try:
            return open_in_root(root, relpath)
        except NotRegular as e:
            if stat.S_ISDIR(e.st.st_mode):
                raise OSError(errno.EISDIR, os.strerror(errno.EISDIR)) from None
            raise OSError(errno.EINVAL, e.strerror) from None
