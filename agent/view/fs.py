"""The pyfuse3 operations of the view: a read-only mirror of each vfolder plus catalogue-made directories.

Every entry inside a vfolder is found relative to the vfolder's root descriptor
with ``openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`` (the kernel refuses any
walk that leaves the root or crosses a symlink) and stat'ed with
``AT_SYMLINK_NOFOLLOW``; a symlink is shown as a link whose text never leads
out (:mod:`agent.view.links`). Inode numbers are the view's own, handed out per
(vfolder, path) and dropped when the kernel forgets them; a regular file with
more than one link gets one per (vfolder, st_dev, st_ino) instead, so that
``du`` and ``cp -a`` through the view see its names as one file.

Costs, per operation: the kernel asks with READDIRPLUS (pyfuse3 always enables
it), so ``ls -l`` and ``find`` get every entry's attributes with the listing and
send no LOOKUP per entry. A directory read is kept (:class:`Listing`: names,
prebuilt attributes, nodes) for :data:`TTL_REAL` seconds and reused while the
directory's own mtime/ctime are unchanged, so a repeated walk costs no ``stat``
per entry; attributes handed out from it carry only the time they have left, so
the kernel never holds one longer than :data:`TTL_REAL` after it was read. Files
are opened with ``keep_cache``: the kernel keeps their pages across opens and
drops them when a refreshed size or mtime differs (libfuse 3 asks for
``FUSE_CAP_AUTO_INVAL_DATA`` by default and pyfuse3 does not clear it).
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pyfuse3

from agent.config import ViewConfig
from agent.view.figures import dashed, scope_xattrs, usage_table, vfolder_xattrs
from agent.view.links import shown_target
from backends.ids import VFolderID
from backends.resolver import RESOLVE_BENEATH, RESOLVE_NO_SYMLINKS, VFolderRoot, openat2
from backends.safeopen import reopen_checked
from catalog.readonly import ReadOnlyCatalog
from catalog.store import QuotaScopeRow, VFolderRow

log = logging.getLogger(__name__)
T = TypeVar("T")

ROOT, VOLUME, SCOPE, USAGE, REAL = range(5)
USAGE_NAME = ".usage"
TTL_REAL = 5.0  # mirrored entries: `ls -lR` is answered from the kernel's cache for this long
TTL_VIRTUAL = 1.0  # catalogue-made directories: new scopes and vfolders show up within a poll plus this
BENEATH = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS
_BLOB_BASE = 1 << 40  # file handles of virtual files, above any file descriptor
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND | os.O_CREAT
LINK_NAMES = 8  # other names remembered per hard-linked file, tried when the last one seen is gone
LISTING_CACHE_ENTRIES = 250_000  # entries of directories read in the last TTL_REAL s kept (~0.4 KiB each)


class Node:
    """One inode of the view. ``key`` finds it again: (kind, volume, qsid, fid, relpath) for most nodes,
    (REAL, volume, qsid, fid, st_dev, st_ino) for a hard-linked regular file (``link``), whose ``relpath``
    is then the last name it was seen under and ``names`` the others it was seen under lately."""

    __slots__ = ("ino", "kind", "volume", "qsid", "fid", "relpath", "lookups", "key", "link", "names")

    def __init__(
        self, ino: int, kind: int, volume: str = "", qsid: str = "", fid: str = "", relpath: str = ".",
        key: tuple[object, ...] | None = None, link: tuple[int, int] | None = None,
    ) -> None:
        self.ino = ino
        self.kind = kind
        self.volume = volume
        self.qsid = qsid
        self.fid = fid
        self.relpath = relpath
        self.lookups = 0
        self.key = key if key is not None else (kind, volume, qsid, fid, relpath)
        self.link = link
        self.names: list[str] = []

    def child_relpath(self, name: str) -> str:
        return name if self.relpath == "." else f"{self.relpath}/{name}"

    def split(self) -> tuple[str, str]:
        """(parent relpath, name) of a mirrored entry below the vfolder root."""
        head, _, name = self.relpath.rpartition("/")
        return head or ".", name


@dataclass
class Snapshot:
    """What the catalogue says is there, re-read every poll; listings of virtual dirs come from here."""

    scopes: dict[str, dict[str, QuotaScopeRow]] = field(default_factory=dict)  # volume -> qsid -> row
    folders: dict[tuple[str, str], dict[str, VFolderRow]] = field(default_factory=dict)  # (vol, qsid) -> name -> row

    @classmethod
    def read(cls, catalog: ReadOnlyCatalog, volumes: dict[str, Path], view: ViewConfig) -> Snapshot:
        snap = cls({name: {} for name in volumes})
        for qs in catalog.quota_scopes():
            if qs.volume in volumes and view.shows(qs.qsid):
                snap.scopes[qs.volume][qs.qsid] = qs
                snap.folders[(qs.volume, qs.qsid)] = {}
        for vf in catalog.vfolders():
            folders = snap.folders.get((vf.volume, vf.qsid))
            if folders is not None:
                folders[dashed(vf.folder_id)] = vf
        return snap


class Listing:
    """A directory's entries as READDIRPLUS sends them: encoded names, prebuilt attributes, nodes.

    ``stamp`` is the directory's (st_dev, st_ino, st_mtime_ns, st_ctime_ns) taken before it was read, and
    ``expires`` the monotonic time until which it may be reused; a catalogue-made directory has no stamp
    and is built anew at each opendir.
    """

    __slots__ = ("stamp", "expires", "names", "attrs", "nodes")

    def __init__(self, stamp: tuple[int, ...] | None = None, expires: float = 0.0) -> None:
        self.stamp = stamp
        self.expires = expires
        self.names: list[bytes] = []
        self.attrs: list[pyfuse3.EntryAttributes] = []
        self.nodes: list[Node] = []


def _fail(err: int) -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(err)


def _os_error(e: OSError) -> pyfuse3.FUSEError:
    # ELOOP/EXDEV: a directory on the way was swapped for a symlink; to the view it is simply not there.
    return _fail(errno.ENOENT if e.errno in (errno.ELOOP, errno.EXDEV) else (e.errno or errno.EIO))


class ViewFS(pyfuse3.Operations):
    """Read-only: every operation that would change anything answers EROFS."""

    def __init__(self, catalog: ReadOnlyCatalog, volumes: dict[str, Path], view: ViewConfig) -> None:
        super().__init__()
        self.catalog = catalog
        self.volumes = volumes
        self.view = view
        self.snapshot = Snapshot({name: {} for name in volumes})
        self.started = time.time()
        self.nodes: dict[int, Node] = {}
        self.by_key: dict[tuple[object, ...], Node] = {}
        self.next_ino = pyfuse3.ROOT_INODE + 1
        self.roots: dict[tuple[str, str, str], VFolderRoot | None] = {}
        self.dirs: dict[int, Listing] = {}  # open directory handles
        self.listings: dict[int, Listing] = {}  # directory inode -> its last listing, oldest first
        self.listed = 0  # entries held in self.listings
        self.blobs: dict[int, bytes] = {}
        self.next_handle = _BLOB_BASE
        self._buf = bytearray(2**20)
        root = Node(pyfuse3.ROOT_INODE, ROOT)
        self.nodes[root.ino] = root
        self.by_key[root.key] = root

    # -- catalogue -------------------------------------------------------------

    def refresh(self) -> None:
        """Re-read the catalogue's scopes and vfolders; drop cached roots of vfolders that changed."""
        snap = Snapshot.read(self.catalog, self.volumes, self.view)
        def states(s: Snapshot) -> dict[tuple[str, str, str], tuple[str, float]]:
            return {
                (vf.volume, vf.qsid, vf.folder_id): (vf.state, vf.created_at)  # created_at: deleted and re-made
                for folders in s.folders.values()
                for vf in folders.values()
            }

        live, old = states(snap), states(self.snapshot)
        for key in list(self.roots):
            if self.roots[key] is None or live.get(key) != old.get(key) or key not in live:
                root = self.roots.pop(key)
                if root is not None:
                    root.close()
        self.snapshot = snap
        self._expire_listings()

    def close(self) -> None:
        for root in self.roots.values():
            if root is not None:
                root.close()
        self.roots.clear()

    def _vfolder(self, node: Node) -> VFolderRow | None:
        return self.snapshot.folders.get((node.volume, node.qsid), {}).get(dashed(node.fid))

    def _root(self, node: Node) -> VFolderRoot | None:
        """The vfolder's root descriptor (cached), or None when it is missing or cannot be opened."""
        key = (node.volume, node.qsid, node.fid)
        if key not in self.roots:
            vf = self._vfolder(node)
            root = None
            if vf is not None and vf.state != "missing":
                inner = VFolderID(node.qsid, uuid.UUID(hex=node.fid)).relpath
                try:
                    root = VFolderRoot.at(str(self.volumes[node.volume]), inner)
                except OSError as e:
                    log.info("vfolder %s/%s cannot be opened: %s", node.qsid, node.fid, e.strerror)
            self.roots[key] = root
        return self.roots[key]

    # -- nodes and attributes --------------------------------------------------

    def _node(self, kind: int, volume: str = "", qsid: str = "", fid: str = "", relpath: str = ".") -> Node:
        key = (kind, volume, qsid, fid, relpath)
        node = self.by_key.get(key)
        if node is None:
            node = Node(self.next_ino, kind, volume, qsid, fid, relpath, key)
            self.next_ino += 1
            self.nodes[node.ino] = node
            self.by_key[key] = node
        return node

    def _real(self, parent: Node, relpath: str, st: os.stat_result) -> Node:
        """The node of a mirrored entry, given its lstat: a regular file with several links is one node
        per (st_dev, st_ino) within its vfolder. Never a symlink: what a link's text may name depends on
        the directory it sits in, so each name of a hard-linked symlink keeps its own node."""
        if st.st_nlink > 1 and stat.S_ISREG(st.st_mode):
            link = (st.st_dev, st.st_ino)
            key: tuple[object, ...] = (REAL, parent.volume, parent.qsid, parent.fid, *link)
            node = self.by_key.get(key)
            if node is None:
                node = Node(self.next_ino, REAL, parent.volume, parent.qsid, parent.fid, relpath, key, link)
                self.next_ino += 1
                self.nodes[node.ino] = node
                self.by_key[key] = node
            if relpath != node.relpath:
                if node.relpath in node.names:
                    node.names.remove(node.relpath)
                node.names.append(node.relpath)
                del node.names[:-LINK_NAMES]
                node.relpath = relpath
            return node
        return self._node(REAL, parent.volume, parent.qsid, parent.fid, relpath)

    def _revive(self, node: Node) -> Node:
        """A node a kept listing holds but the kernel may have forgotten: the live node of its key."""
        live = self.by_key.get(node.key)
        if live is None:  # dropped, and nothing took its key since: bring it back with the same number
            self.nodes[node.ino] = node
            self.by_key[node.key] = node
            return node
        return live

    def _get(self, ino: int) -> Node:
        node = self.nodes.get(ino)
        if node is None:
            raise _fail(errno.ENOENT)
        return node

    def _drop(self, node: Node) -> None:
        if node.lookups <= 0 and node.kind == REAL and self.nodes.get(node.ino) is node:
            del self.nodes[node.ino]
            if self.by_key.get(node.key) is node:
                del self.by_key[node.key]
            self._forget_listing(node.ino)

    def _lstat(self, node: Node) -> os.stat_result | None:
        """lstat of a mirrored entry relative to its vfolder root; None for a missing vfolder's root."""
        root = self._root(node)
        if node.relpath == ".":
            if root is None:
                return None
            try:
                return os.stat(root.fd)
            except OSError:
                return None
        if root is None:
            raise _fail(errno.ENOENT)
        if node.link is not None:
            return self._linked(root, node)
        return _lstat_at(root, node.relpath)

    def _linked(self, root: VFolderRoot, node: Node) -> os.stat_result:
        """lstat of a hard-linked file under the last name it was seen under that still is that file."""
        for relpath in (node.relpath, *reversed(node.names)):
            try:
                st = _lstat_at(root, relpath)
            except pyfuse3.FUSEError:
                continue
            if (st.st_dev, st.st_ino) == node.link:
                node.relpath = relpath
                return st
        raise _fail(errno.ENOENT)

    def _attr(self, node: Node, st: os.stat_result | None = None) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = node.ino
        if node.kind == REAL:
            st = st if st is not None else self._lstat(node)  # None only for a missing vfolder's root
            if st is not None:
                return _fill(e, st)
        # made from the catalogue: read-only dirs owned by root, and the .usage file
        e.entry_timeout = e.attr_timeout = TTL_VIRTUAL
        stamp = self.started
        scope = self._scope(node) if node.kind == SCOPE else None
        if scope is not None:
            stamp = scope.created_at
        elif node.kind == REAL:
            vf = self._vfolder(node)
            stamp = vf.created_at if vf is not None else stamp
        if node.kind == USAGE:
            e.attr_timeout = 0
            e.st_mode = stat.S_IFREG | 0o444
            e.st_nlink = 1
            e.st_size = len(self._usage_doc(node))
        else:
            e.st_mode = stat.S_IFDIR | 0o555
            e.st_nlink = 2
        e.st_blksize = 4096
        ns = int(stamp * 1e9)
        e.st_atime_ns = e.st_mtime_ns = e.st_ctime_ns = ns
        return e

    def _scope(self, node: Node) -> QuotaScopeRow | None:
        return self.snapshot.scopes.get(node.volume, {}).get(node.qsid)

    def _usage_doc(self, node: Node) -> bytes:
        scope = self._scope(node)
        if scope is None:
            raise _fail(errno.ENOENT)
        folders = list(self.snapshot.folders.get((node.volume, node.qsid), {}).values())
        return usage_table(self.catalog, scope, folders)

    # -- lookups ---------------------------------------------------------------

    def _child(self, parent: Node, name: str) -> tuple[Node, os.stat_result | None]:
        if name in (".", "..") or "/" in name:
            raise _fail(errno.ENOENT)
        if parent.kind == ROOT:
            if name in self.snapshot.scopes:
                return self._node(VOLUME, name), None
        elif parent.kind == VOLUME:
            if name in self.snapshot.scopes.get(parent.volume, {}):
                return self._node(SCOPE, parent.volume, name), None
        elif parent.kind == SCOPE:
            if name == USAGE_NAME and self._scope(parent) is not None:
                return self._node(USAGE, parent.volume, parent.qsid), None
            vf = self.snapshot.folders.get((parent.volume, parent.qsid), {}).get(name)
            if vf is not None:
                node = self._node(REAL, parent.volume, parent.qsid, vf.folder_id)
                return node, self._lstat(node)
        elif parent.kind == REAL:
            root = self._root(parent)
            if root is None:
                raise _fail(errno.ENOENT)
            relpath = parent.child_relpath(name)
            st = _lstat_at(root, relpath)
            return self._real(parent, relpath, st), st
        raise _fail(errno.ENOENT)

    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node, st = self._child(self._get(parent_inode), os.fsdecode(name))
        attr = self._attr(node, st)
        node.lookups += 1
        return attr

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for ino, n in inode_list:
            node = self.nodes.get(ino)
            if node is not None:
                node.lookups -= n
                self._drop(node)

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attr(self._get(inode))

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        node = self._get(inode)
        if node.kind != REAL or node.relpath == ".":
            raise _fail(errno.EINVAL)
        root = self._root(node)
        if root is None:
            raise _fail(errno.ENOENT)
        head, name = node.split()
        try:
            pfd = openat2(root.fd, head, os.O_PATH | os.O_DIRECTORY, BENEATH)
            try:
                text = os.readlink(os.fsencode(name), dir_fd=pfd)
            finally:
                os.close(pfd)
        except OSError as e:
            raise _os_error(e) from None
        return os.fsencode(shown_target(os.fsdecode(text), depth=node.relpath.count("/")))

    # -- directories -----------------------------------------------------------

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        node = self._get(inode)
        listing = self._listing(node) if node.kind == REAL else self._virtual_listing(node)
        fh = self._handle()
        self.dirs[fh] = listing
        return fh

    def _virtual_listing(self, node: Node) -> Listing:
        children: list[tuple[str, Node]]
        if node.kind == ROOT:
            children = [(name, self._node(VOLUME, name)) for name in sorted(self.snapshot.scopes)]
        elif node.kind == VOLUME:
            scopes = sorted(self.snapshot.scopes.get(node.volume, {}))
            children = [(q, self._node(SCOPE, node.volume, q)) for q in scopes]
        elif node.kind == SCOPE:
            children = [(USAGE_NAME, self._node(USAGE, node.volume, node.qsid))]
            folders = self.snapshot.folders.get((node.volume, node.qsid), {})
            for name in sorted(folders):
                children.append((name, self._node(REAL, node.volume, node.qsid, folders[name].folder_id)))
        else:
            raise _fail(errno.ENOTDIR)
        listing = Listing()
        for name, child in children:
            try:
                attr = self._attr(child)
            except pyfuse3.FUSEError:
                self._drop(child)
                continue
            listing.names.append(os.fsencode(name))
            listing.attrs.append(attr)
            listing.nodes.append(child)
        return listing

    def _listing(self, node: Node) -> Listing:
        """A mirrored directory's entries: the kept listing while the directory is unchanged and it is fresh,
        else read anew (one lstat per entry)."""
        root = self._root(node)
        if root is None:
            if node.relpath == ".":
                return Listing()  # a missing vfolder is an empty directory (its xattrs say why)
            raise _fail(errno.ENOENT)
        try:
            fd = openat2(root.fd, node.relpath, os.O_RDONLY | os.O_DIRECTORY, BENEATH)
        except OSError as e:
            raise _os_error(e) from None
        try:
            now = time.monotonic()
            st = os.fstat(fd)  # before reading: a change while it is read shows as a new stamp next time
            stamp = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns)
            kept = self.listings.get(node.ino)
            if kept is not None:
                if kept.stamp == stamp and kept.expires > now:
                    return kept
                self._forget_listing(node.ino)
            # Read here, not in a worker thread: the hand-off costs more than listing a typical directory.
            listing = self._read_dir(node, fd, Listing(stamp, now + TTL_REAL))
        finally:
            os.close(fd)
        self._keep_listing(node.ino, listing)
        return listing

    def _read_dir(self, node: Node, fd: int, listing: Listing) -> Listing:
        names, attrs, nodes = listing.names, listing.attrs, listing.nodes
        prefix = "" if node.relpath == "." else node.relpath + "/"
        base = (REAL, node.volume, node.qsid, node.fid)
        by_key, new_attr, fill = self.by_key, pyfuse3.EntryAttributes, _fill
        with os.scandir(fd) as it:  # scandir works on a dup: fd stays ours to close
            for entry in it:
                name = entry.name
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue  # vanished since the directory was read
                relpath = prefix + name
                if st.st_nlink > 1 and stat.S_ISREG(st.st_mode):
                    child = self._real(node, relpath, st)
                else:
                    child = by_key.get(base + (relpath,)) or self._node(REAL, *base[1:], relpath)
                attr = fill(new_attr(), st)
                attr.st_ino = child.ino
                names.append(name.encode("utf-8", "surrogateescape"))
                attrs.append(attr)
                nodes.append(child)
        return listing

    def _keep_listing(self, ino: int, listing: Listing) -> None:
        self.listings[ino] = listing
        self.listed += len(listing.names)
        while self.listed > LISTING_CACHE_ENTRIES and self.listings:
            self._forget_listing(next(iter(self.listings)))

    def _forget_listing(self, ino: int) -> None:
        listing = self.listings.pop(ino, None)
        if listing is None:
            return
        self.listed -= len(listing.names)
        for node in listing.nodes:
            if node.lookups <= 0:
                self._drop(node)  # made for the listing, never handed to the kernel (or forgotten by it)

    def _expire_listings(self) -> None:
        now = time.monotonic()
        for ino in [ino for ino, listing in self.listings.items() if listing.expires <= now]:
            self._forget_listing(ino)

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        listing = self.dirs.get(fh)
        if listing is None:
            raise _fail(errno.EBADF)
        names, attrs, nodes = listing.names, listing.attrs, listing.nodes
        # Kept attributes carry only the time they have left: the kernel never holds them past TTL_REAL.
        left = max(listing.expires - time.monotonic(), 0.0) if listing.stamp is not None else None
        reply = pyfuse3.readdir_reply
        for i in range(max(start_id, 0), len(names)):
            child, attr = nodes[i], attrs[i]
            if child.lookups <= 0:  # new, or forgotten by the kernel since the listing was read
                live = self._revive(child)
                if live is not child:
                    nodes[i] = child = live
                    attr.st_ino = live.ino
            if left is not None:
                attr.attr_timeout = left
            if not reply(token, names[i], attr, i + 1):
                break
            child.lookups += 1

    async def releasedir(self, fh: int) -> None:
        self.dirs.pop(fh, None)

    # -- files -----------------------------------------------------------------

    def _handle(self) -> int:
        self.next_handle += 1
        return self.next_handle

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if flags & _WRITE_FLAGS:
            raise _fail(errno.EROFS)
        node = self._get(inode)
        if node.kind == USAGE:
            fh = self._handle()
            self.blobs[fh] = self._usage_doc(node)
            return pyfuse3.FileInfo(fh=fh, direct_io=True)
        if node.kind != REAL or node.relpath == ".":
            raise _fail(errno.EISDIR)
        root = self._root(node)
        if root is None:
            raise _fail(errno.ENOENT)
        if node.link is not None:
            self._linked(root, node)  # picks a name that still is this file
        try:
            # O_PATH + fstat + reopen (backends.safeopen): a FIFO swapped in cannot block the view's loop
            fd, _ = reopen_checked(openat2(root.fd, node.relpath, os.O_PATH, BENEATH))
        except OSError as e:
            raise _os_error(e) from None
        if node.link is not None:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != node.link:
                os.close(fd)
                raise _fail(errno.ENOENT)  # swapped for another file since _linked looked
        # keep_cache: the view is read-only, so pages the kernel already holds stay good until a refreshed
        # size or mtime says otherwise (auto_inval_data); a second read never reaches this process.
        return pyfuse3.FileInfo(fh=fd, keep_cache=True)

    async def read(self, fh: int, off: int, size: int) -> bytes | memoryview:  # type: ignore[override]
        # (pyfuse3 hands any buffer to the kernel; its stub says bytes, which would cost a copy per read)
        blob = self.blobs.get(fh)
        if blob is not None:
            return blob[off : off + size]
        # One reused buffer: pyfuse3 hands it to the kernel before any other request runs (no await here).
        if len(self._buf) < size:
            self._buf = bytearray(size)
        try:
            n = os.preadv(fh, [memoryview(self._buf)[:size]], off)
        except OSError as e:
            raise _os_error(e) from None
        return memoryview(self._buf)[:n]

    async def release(self, fh: int) -> None:
        if self.blobs.pop(fh, None) is None and fh < _BLOB_BASE:
            os.close(fh)

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        d = pyfuse3.StatvfsData()
        d.f_bsize = d.f_frsize = 4096
        d.f_namemax = 255
        for path in self.volumes.values():
            try:
                s = os.statvfs(path)
            except OSError:
                continue
            for name in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree", "f_favail"):
                setattr(d, name, getattr(s, name))
            d.f_namemax = s.f_namemax
            break
        return d

    # -- the catalogue's figures as xattrs -------------------------------------

    def _xattrs(self, node: Node) -> dict[str, bytes]:
        if node.kind == SCOPE:
            scope = self._scope(node)
            if scope is not None:
                n = len(self.snapshot.folders.get((node.volume, node.qsid), {}))
                return scope_xattrs(self.catalog, scope, n)
        elif node.kind == REAL and node.relpath == ".":
            vf = self._vfolder(node)
            if vf is not None:
                return vfolder_xattrs(self.catalog, vf, on_disk=self._root(node) is not None)
        return {}

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        if not name.startswith(b"user."):
            # security.selinux, system.posix_acl_*: not supported here. ENOTSUP (not ENODATA) lets `ls -l`
            # remember that per device instead of asking for every entry of a listing.
            raise _fail(errno.EOPNOTSUPP)
        value = self._xattrs(self._get(inode)).get(os.fsdecode(name))
        if value is None:
            raise _fail(errno.ENODATA)
        return value

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return [os.fsencode(k) for k in self._xattrs(self._get(inode))]

    # -- everything that would change something --------------------------------

    async def _read_only(self, *args: object, **kwargs: object) -> None:
        raise _fail(errno.EROFS)

    setattr = mknod = mkdir = unlink = rmdir = symlink = rename = link = create = write = _read_only  # type: ignore
    setxattr = removexattr = _read_only


def _guard(op: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """An unexpected exception in a handler would end pyfuse3's main loop (and the mount): answer EIO instead."""

    @functools.wraps(op)
    async def guarded(*args: object) -> T:
        try:
            return await op(*args)
        except pyfuse3.FUSEError:
            raise
        except Exception as e:  # noqa: BLE001 - logged, and the request still gets an answer
            log.error("view: %s failed: %s: %s", op.__name__, type(e).__name__, e)
            raise _fail(errno.EIO) from None

    return guarded


for _name in (
    "lookup", "getattr", "readlink", "opendir", "readdir", "releasedir", "open", "read", "release",
    "statfs", "getxattr", "listxattr",
):
    setattr(ViewFS, _name, _guard(getattr(ViewFS, _name)))


def _fill(e: pyfuse3.EntryAttributes, st: os.stat_result) -> pyfuse3.EntryAttributes:
    e.entry_timeout = e.attr_timeout = TTL_REAL
    e.st_mode = st.st_mode
    e.st_nlink = st.st_nlink
    e.st_uid = st.st_uid
    e.st_gid = st.st_gid
    e.st_rdev = st.st_rdev
    e.st_size = st.st_size
    e.st_blksize = st.st_blksize
    e.st_blocks = st.st_blocks
    e.st_atime_ns = st.st_atime_ns
    e.st_mtime_ns = st.st_mtime_ns
    e.st_ctime_ns = st.st_ctime_ns
    return e


def _lstat_at(root: VFolderRoot, relpath: str) -> os.stat_result:
    """lstat of ``relpath`` below a vfolder root, never crossing a symlink or leaving the root."""
    head, _, name = relpath.rpartition("/")
    try:
        if not head:
            return os.stat(name, dir_fd=root.fd, follow_symlinks=False)
        pfd = openat2(root.fd, head, os.O_PATH | os.O_DIRECTORY, BENEATH)
        try:
            return os.stat(name, dir_fd=pfd, follow_symlinks=False)
        finally:
            os.close(pfd)
    except OSError as e:
        raise _os_error(e) from None
