"""Exact directory-tree usage (entries, apparent size, ``du``-style allocated bytes).

Quota reporting needs numbers that agree with ``du`` and a walk that cannot be tricked into counting or
reading data outside the volume, so every directory is opened relative to its parent's fd with
``O_NOFOLLOW`` and re-checked by (st_dev, st_ino); nothing is ever resolved by path.  The C extension
:mod:`backends._fastwalk` does this with a thread pool and the GIL released; when it is not built, the
pure-Python walk below gives identical results (same algorithm, single-threaded).
"""

from __future__ import annotations

import os
import resource
import stat
from dataclasses import dataclass

from backends import cpu_placement

try:
    from . import _fastwalk  # type: ignore[attr-defined]  # a C extension, no stub
except ImportError:  # extension not built: fall back to the pure-Python walk
    _fastwalk = None

__all__ = ["IMPLEMENTATION", "TreeUsage", "tree_usage"]

IMPLEMENTATION = "c" if _fastwalk is not None else "python"

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True)
class TreeUsage:
    """Usage of one directory tree; see :func:`tree_usage` for the exact semantics."""

    entries: int  # entries strictly below root: files, dirs, symlinks, others; symlinks never followed
    size_bytes: int  # sum of lstat st_size of those same entries (every hard link counted)
    allocated_bytes: int  # st_blocks*512 of root and every entry, each (st_dev, st_ino) once: `du -s -B1 root`
    errors: int  # entries/dirs that vanished or could not be opened/read during the walk (skipped)


def tree_usage(root: str | os.PathLike[str], *, threads: int = 0) -> TreeUsage:
    """Walk ``root`` and return its :class:`TreeUsage`.

    Blocking; meant to run in a worker thread (the C walk releases the GIL).  ``threads=0`` picks
    ``min(4, os.cpu_count())``.  Symlinks are never followed, mount points below root are crossed (like
    ``du`` without ``-x``).  Raises FileNotFoundError / NotADirectoryError when root is missing / not a
    directory; root is opened with O_NOFOLLOW, so a symlink root raises NotADirectoryError (Linux) or
    OSError(ELOOP).
    """
    if threads < 0:
        raise ValueError("threads must be >= 0")
    if threads == 0:
        threads = min(4, os.cpu_count() or 1)
    if _fastwalk is not None:
        return _tree_usage_c(root, threads=min(threads, 64))
    return _tree_usage_py(root)


def _tree_usage_c(root: str | os.PathLike[str], *, threads: int = 1, max_open_dirs: int = 0) -> TreeUsage:
    """C walk; ``max_open_dirs`` caps parked directory fds (0 = derived from RLIMIT_NOFILE)."""
    if _fastwalk is None:
        raise RuntimeError("backends._fastwalk is not built (pip install -e . or setup.py build_ext --inplace)")
    with cpu_placement.widened():  # the walk's pthreads inherit the calling thread's CPUs
        entries, size, alloc, errors, _chain_reopens = _fastwalk.tree_usage(os.fspath(root), threads, max_open_dirs)
    return TreeUsage(entries, size, alloc, errors)


def _default_max_open_dirs() -> int:
    """Same policy as the C module: a quarter of the soft fd limit, clamped to 16..1024."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1024
    return max(16, min(soft // 4, 1024))


class _Node:
    """A directory that was lstat'ed by its parent but not yet opened (mirrors ``node`` in the C file)."""

    __slots__ = ("parent", "name", "dev", "ino", "fd", "pending")

    def __init__(self, parent: _Node | None, name: str, dev: int, ino: int) -> None:
        self.parent = parent
        self.name = name
        self.dev = dev
        self.ino = ino
        self.fd = -1  # parked fd that children are opened from; -1 once closed
        self.pending = 0  # children not yet opened


def _open_verified(name: str, dir_fd: int, node: _Node) -> int:
    """openat(O_NOFOLLOW) + check it is the directory that was lstat'ed (not a swapped-in one)."""
    fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    try:
        st = os.fstat(fd)
    except OSError:
        os.close(fd)
        raise
    if st.st_dev != node.dev or st.st_ino != node.ino:
        os.close(fd)
        raise OSError(f"directory {name!r} was replaced during the walk")
    return fd


def _open_node(node: _Node, stats: dict[str, int]) -> int:
    """Open ``node`` from its parent's parked fd, or re-walk the chain from the nearest open ancestor."""
    parent = node.parent
    assert parent is not None
    if parent.fd >= 0:
        return _open_verified(node.name, parent.fd, node)
    stats["chain_reopens"] += 1
    chain: list[_Node] = []
    anc = parent
    while anc.fd < 0:  # the root's fd stays open for the whole walk
        chain.append(anc)
        assert anc.parent is not None
        anc = anc.parent
    cur = os.dup(anc.fd)
    try:
        for comp in reversed(chain):
            nxt = _open_verified(comp.name, cur, comp)
            os.close(cur)
            cur = nxt
        return _open_verified(node.name, cur, node)
    finally:
        os.close(cur)


def _tree_usage_py(
    root: str | os.PathLike[str], *, max_open_dirs: int = 0, stats: dict[str, int] | None = None
) -> TreeUsage:
    """Pure-Python walk with exactly the C module's semantics (and fd discipline).

    ``stats`` (tests) receives ``chain_reopens``: directories opened by re-walking from an ancestor.
    """
    if stats is None:
        stats = {}
    stats["chain_reopens"] = 0
    cap = max_open_dirs or _default_max_open_dirs()
    rootfd = os.open(root, _DIR_FLAGS)
    entries = size = alloc = errors = 0
    links: dict[tuple[int, int], int] = {}
    parked: set[_Node] = set()  # nodes holding an open fd for their children (root excluded)
    try:
        rst = os.fstat(rootfd)
        alloc = rst.st_blocks * 512
        root_node = _Node(None, "", rst.st_dev, rst.st_ino)
        root_node.fd = rootfd
        stack = [root_node]
        while stack:
            node = stack.pop()
            fd = -1
            try:
                fd = rootfd if node is root_node else _open_node(node, stats)
            except OSError:
                errors += 1
            children: list[_Node] = []
            if fd >= 0:
                try:
                    with os.scandir(fd) as it:
                        names = [e.name for e in it]
                except OSError:
                    errors += 1
                    names = []
                for name in names:
                    try:
                        st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                    except OSError:
                        errors += 1  # vanished or unreadable
                        continue
                    entries += 1
                    size += st.st_size
                    is_dir = stat.S_ISDIR(st.st_mode)
                    if not is_dir and st.st_nlink > 1:
                        links[(st.st_dev, st.st_ino)] = st.st_blocks * 512
                    else:
                        alloc += st.st_blocks * 512
                    if is_dir:
                        children.append(_Node(node, name, st.st_dev, st.st_ino))
            parent = node.parent
            if parent is not None:
                parent.pending -= 1
                if parent.pending == 0 and parent.fd >= 0 and parent is not root_node:
                    os.close(parent.fd)
                    parent.fd = -1
                    parked.discard(parent)
            if node is root_node:
                pass
            elif children and fd >= 0 and len(parked) < cap:
                node.fd = fd
                parked.add(node)
            elif fd >= 0:
                os.close(fd)  # no children, or over the cap: children re-walk the chain
            node.pending = len(children)
            stack.extend(children)
    finally:
        for node in parked:  # only non-empty after an exception (e.g. MemoryError)
            os.close(node.fd)
        os.close(rootfd)
    alloc += sum(links.values())
    return TreeUsage(entries, size, alloc, errors)
