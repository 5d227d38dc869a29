"""Remove a directory tree by descriptors, without recursion and without following links.

Python 3.11's ``shutil.rmtree`` recurses once per level, so a user's tree a
few thousand levels deep would make a delete fail with ``RecursionError``.
This walk keeps one descriptor per level on an explicit stack; a directory
swapped for a symlink while it runs is unlinked as a link, never entered.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _unlink(name: str, dir_fd: int) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass


def _scan(fd: int) -> list[str]:
    """Unlink every non-directory in ``fd``; return the subdirectory names."""
    subdirs = []
    with os.scandir(fd) as it:
        for entry in it:
            if entry.is_dir(follow_symlinks=False):
                subdirs.append(entry.name)
            else:
                _unlink(entry.name, fd)
    return subdirs


def remove_tree_at(dir_fd: int, name: str) -> None:
    """Remove ``name`` (a directory, or anything else) inside the directory ``dir_fd``."""
    try:
        top = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        return
    except OSError as e:
        if e.errno in (errno.ENOTDIR, errno.ELOOP):
            _unlink(name, dir_fd)
            return
        raise
    stack: list[tuple[int, int, str, list[str]]] = [(top, dir_fd, name, _scan_or_close(top))]
    try:
        while stack:
            fd, parent, nm, pending = stack[-1]
            if pending:
                child = pending.pop()
                try:
                    cfd = os.open(child, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    continue
                except OSError as e:
                    if e.errno in (errno.ENOTDIR, errno.ELOOP):  # swapped for a file or a link meanwhile
                        _unlink(child, fd)
                        continue
                    raise
                stack.append((cfd, fd, child, _scan_or_close(cfd)))
                continue
            stack.pop()
            os.close(fd)
            try:
                os.rmdir(nm, dir_fd=parent)
            except FileNotFoundError:
                pass
    finally:
        for fd, *_ in stack:
            os.close(fd)


def _scan_or_close(fd: int) -> list[str]:
    try:
        return _scan(fd)
    except BaseException:
        os.close(fd)
        raise


def remove_tree(path: Path, *, ignore_errors: bool = False) -> None:
    """Remove ``path`` (its last component is not followed if it is a link)."""
    try:
        parent = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            remove_tree_at(parent, path.name)
        finally:
            os.close(parent)
    except OSError:
        if not ignore_errors:
            raise
