"""Per-directory aggregates and the in-memory tree of one vfolder.

A directory's aggregate holds only its *own* entries (files, links, subdirectories, all lstat'ed, never
followed): their count, their ``st_size`` sum and their allocated bytes. A vfolder's figure is the sum over
its directories, so a change that an event names in one directory is applied as a delta: re-read that one
directory, subtract its old aggregate, add the new one. Hard-linked non-directories are kept out of the
plain allocated sum and counted once per vfolder through a reference-counted inode table, which gives
exactly what ``du -s -B1`` prints.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field

from backends.resolver import RESOLVE_BENEATH, RESOLVE_NO_SYMLINKS, openat2

try:
    from agent.engine.usage import _dirread  # type: ignore[attr-defined]  # a C extension, no stub
except ImportError:  # not built: the pure-Python loop below gives the same figures
    _dirread = None
if _dirread is not None and getattr(_dirread, "ABI", 1) < 2:  # built from an older _dirread.c (no ``newest``)
    _dirread = None

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

Link = tuple[int, int, int, int, int]  # (st_dev, st_ino, allocated bytes, st_size, st_nlink), nlink > 1
SubDir = tuple[int, int, int]  # (st_ino, st_size, allocated bytes) of a subdirectory, as its parent lstat'ed it


@dataclass(slots=True)
class DirAgg:
    """One directory's own entries (not its subdirectories' contents)."""

    ino: int  # the directory itself, to notice a directory replaced under the same name
    entries: int
    size: int
    alloc: int  # allocated bytes of the entries, hard-linked non-directories excluded (see ``links``)
    own_alloc: int  # the directory's own allocated bytes (only the vfolder root's is counted)
    own_size: int
    subdirs: dict[str, SubDir] = field(default_factory=dict)
    links: tuple[Link, ...] = ()
    # the latest st_ctime of its non-directories: a file written lately may still change its st_blocks
    # when the kernel writes it back (delayed allocation, extent-tree blocks, preallocation trimmed), which
    # no event reports; the engine reads such a directory again until that time is long past
    newest: float = 0.0


def join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


def split(relpath: str) -> tuple[str, str]:
    parent, _, name = relpath.rpartition("/")
    return parent, name


_CHUNK = 3000  # bytes of path per openat2 call: the kernel refuses paths of PATH_MAX (4096) or more


def open_dir(root_fd: int, relpath: str) -> int:
    """Open a directory of the vfolder by its relative path, never leaving the vfolder or following a link.

    Paths longer than the kernel takes in one call are opened a chunk at a time; each chunk is resolved
    beneath the directory the previous one opened (relpaths here never hold '..'), so confinement holds.
    """
    if not relpath:
        return os.open(".", _DIR_FLAGS, dir_fd=root_fd)
    raw = os.fsencode(relpath)
    if len(raw) <= _CHUNK:
        return openat2(root_fd, relpath, _DIR_FLAGS, RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)
    fd = root_fd
    try:
        while raw:
            cut = raw.rfind(b"/", 0, _CHUNK) if len(raw) > _CHUNK else len(raw)
            if cut <= 0:
                raise OSError(36, os.strerror(36), relpath)  # one name longer than a chunk: not a real name
            nxt = openat2(fd, os.fsdecode(raw[:cut]), _DIR_FLAGS, RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)
            if fd != root_fd:
                os.close(fd)
            fd = nxt
            raw = raw[cut + 1 :]
    except BaseException:
        if fd != root_fd:
            os.close(fd)
        raise
    return fd


def read_dir(root_fd: int, relpath: str, on_open: Callable[[str, int], None] | None = None) -> DirAgg | None:
    """One scandir + one lstat per entry; None when the directory is gone (or is no longer a directory).

    ``on_open(relpath, fd)`` runs after the directory is opened and before it is read, so a watch added
    there sees every change the read could miss.
    """
    if on_open is None and _dirread is not None and len(relpath) < _CHUNK:  # one C call: open, read, close
        got = _dirread.read_path(root_fd, os.fsencode(relpath))
        if got is None:
            return None
        ino, own_size, own_alloc, (entries, size, alloc, subs, links, newest) = got
        subdirs = {name: (d_ino, sz, al) for name, d_ino, sz, al in subs}
        return DirAgg(ino, entries, size, alloc, own_alloc, own_size, subdirs, tuple(links), newest)
    try:
        fd = open_dir(root_fd, relpath)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        if e.errno in (40, 20):  # ELOOP (a symlink now stands there), ENOTDIR
            return None
        raise
    try:
        if on_open is not None:
            on_open(relpath, fd)
        own = os.fstat(fd)
        if _dirread is not None:
            entries, size, alloc, subs, links, newest = _dirread.read(fd)
            return DirAgg(
                own.st_ino,
                entries,
                size,
                alloc,
                own.st_blocks * 512,
                own.st_size,
                {name: (ino, sz, al) for name, ino, sz, al in subs},
                tuple(links),
                newest,
            )
        return _read_py(fd, own)
    finally:
        os.close(fd)


def _read_py(fd: int, own: os.stat_result) -> DirAgg:
    """The same as ``_dirread.read``, in Python (used when the C reader is not built)."""
    entries = size = alloc = 0
    newest = 0.0
    subdirs: dict[str, SubDir] = {}
    links: list[Link] = []
    with os.scandir(fd) as it:
        for entry in it:
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue  # vanished between readdir and lstat: the event that follows will say so
            entries += 1
            size += st.st_size
            blocks = st.st_blocks * 512
            if stat.S_ISDIR(st.st_mode):
                subdirs[entry.name] = (st.st_ino, st.st_size, blocks)
                alloc += blocks
                continue
            sec, nsec = divmod(st.st_ctime_ns, 1_000_000_000)
            newest = max(newest, sec + nsec * 1e-9)  # the C reader's arithmetic, to the last bit
            if st.st_nlink > 1:
                links.append((st.st_dev, st.st_ino, blocks, st.st_size, st.st_nlink))
            else:
                alloc += blocks
    return DirAgg(own.st_ino, entries, size, alloc, own.st_blocks * 512, own.st_size, subdirs, tuple(links), newest)


@dataclass(slots=True)
class _LinkRef:
    alloc: int
    size: int
    holders: dict[str, int]  # relpath of a directory -> how many of its entries are this inode
    nlink: int = 0  # the inode's link count when last read: more than ``holders`` hold = names outside


class VFolderTree:
    """Every directory's aggregate of one vfolder, and the running totals derived from them."""

    def __init__(self) -> None:
        self.dirs: dict[str, DirAgg] = {}
        self.entries = 0
        self.size = 0
        self.plain_alloc = 0
        self.link_alloc = 0
        self.unplaced_links = False
        self.unplaced: set[tuple[int, int]] = set()  # the inodes that set :attr:`unplaced_links`
        self.by_ino: dict[int, str] = {}  # a directory's inode -> its relpath (where the tree has it)
        self._links: dict[tuple[int, int], _LinkRef] = {}
        self._links_changed = True
        self._escaping: set[str] = set()

    @property
    def root_alloc(self) -> int:
        root = self.dirs.get("")
        return root.own_alloc if root is not None else 0

    def totals(self) -> tuple[int, int, int]:
        """(file_count, used_bytes, allocated_bytes)."""
        return self.entries, self.size, self.root_alloc + self.plain_alloc + self.link_alloc

    def put(self, relpath: str, agg: DirAgg) -> set[str]:
        """Replace one directory's aggregate; returns other directories that hold a hard link whose
        size or allocation changed (their own aggregates now need a re-read).

        Sets :attr:`unplaced_links` when a hard link appeared to an inode whose other names are not in
        this directory: the kernel tells only the inode (not the directory holding the older name) that
        its link count grew, so that older name may still be counted as a plain file somewhere."""
        old = self.dirs.get(relpath)
        if old is not None:
            self._remove(relpath, old)
            had = {(lk[0], lk[1]) for lk in old.links}
        else:
            had = set()
        names: dict[tuple[int, int], int] = {}
        for lk in agg.links:
            names[(lk[0], lk[1])] = names.get((lk[0], lk[1]), 0) + 1
        self.dirs[relpath] = agg
        self.by_ino[agg.ino] = relpath
        self.entries += agg.entries
        self.size += agg.size
        self.plain_alloc += agg.alloc
        stale: set[str] = set()
        if agg.links or had:
            self._links_changed = True
        for dev, ino, alloc, size, nlink in agg.links:
            ref = self._links.get((dev, ino))
            if ref is None:
                self._links[(dev, ino)] = _LinkRef(alloc, size, {relpath: 1}, nlink)
                self.link_alloc += alloc
                if (dev, ino) not in had and nlink > names[(dev, ino)]:
                    self.unplaced_links = True
                    self.unplaced.add((dev, ino))
                continue
            ref.holders[relpath] = ref.holders.get(relpath, 0) + 1
            ref.nlink = nlink
            if ref.size != size:
                stale.update(h for h in ref.holders if h != relpath)
                ref.size = size
            if ref.alloc != alloc:
                self.link_alloc += alloc - ref.alloc
                ref.alloc = alloc
        return stale

    def linked(self) -> set[tuple[int, int]]:
        """The hard-linked inodes this tree holds."""
        return set(self._links)

    def escapes(self, key: tuple[int, int]) -> bool:
        """Whether this hard-linked inode has names outside the vfolder."""
        ref = self._links.get(key)
        return ref is not None and sum(ref.holders.values()) < ref.nlink

    def escaping(self) -> set[str]:
        """Directories holding a hard link whose inode also has names outside this vfolder (a write
        through such a name is seen by no event of this vfolder, so the engine re-reads them itself)."""
        if self._links_changed:
            self._escaping = {
                h for ref in self._links.values() if sum(ref.holders.values()) < ref.nlink for h in ref.holders
            }
            self._links_changed = False
        return self._escaping

    def _remove(self, relpath: str, agg: DirAgg) -> None:
        if agg.links:
            self._links_changed = True
        self.entries -= agg.entries
        self.size -= agg.size
        self.plain_alloc -= agg.alloc
        for dev, ino, *_ in agg.links:
            ref = self._links.get((dev, ino))
            if ref is None:
                continue
            left = ref.holders.get(relpath, 0) - 1
            if left > 0:
                ref.holders[relpath] = left
            else:
                ref.holders.pop(relpath, None)
            if not ref.holders:
                del self._links[(dev, ino)]
                self.link_alloc -= ref.alloc

    def subtree(self, relpath: str) -> list[tuple[str, int]]:
        """(relpath, inode) of a directory and of every directory below it, as the tree holds them."""
        out: list[tuple[str, int]] = []
        stack = [relpath]
        while stack:
            rel = stack.pop()
            agg = self.dirs.get(rel)
            if agg is not None:
                out.append((rel, agg.ino))
                stack.extend(join(rel, name) for name in agg.subdirs)
        return out

    def drop(self, relpath: str) -> list[str]:
        """Forget a directory and everything below it; returns the relpaths forgotten."""
        gone: list[str] = []
        stack = [relpath]
        while stack:
            rel = stack.pop()
            agg = self.dirs.pop(rel, None)
            if agg is None:
                continue
            if self.by_ino.get(agg.ino) == rel:
                del self.by_ino[agg.ino]
            self._remove(rel, agg)
            gone.append(rel)
            stack.extend(join(rel, name) for name in agg.subdirs)
        return gone

    def refresh_entry(self, relpath: str, agg: DirAgg) -> bool:
        """A directory's own size and blocks are counted in its parent: keep the parent's record in step
        (creating entries in a directory can grow it without any event reaching the parent).
        True when the parent's aggregate changed."""
        if not relpath:
            return False
        parent_rel, name = split(relpath)
        parent = self.dirs.get(parent_rel)
        if parent is None:
            return False
        rec = parent.subdirs.get(name)
        if rec is None or rec[0] != agg.ino:
            return False
        d_size, d_alloc = agg.own_size - rec[1], agg.own_alloc - rec[2]
        if d_size or d_alloc:
            parent.subdirs[name] = (agg.ino, agg.own_size, agg.own_alloc)
            parent.size += d_size
            parent.alloc += d_alloc
            self.size += d_size
            self.plain_alloc += d_alloc
            return True
        return False


def encode_links(links: tuple[Link, ...]) -> str | None:
    """Compact text for the catalogue (NULL for the usual directory without hard links)."""
    if not links:
        return None
    return ";".join(":".join(map(str, lk)) for lk in links)
