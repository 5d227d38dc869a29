"""Per-directory aggregates, the scanner and their catalogue rows, on real directories (no agent)."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

import pytest

from agent.engine.usage import aggregates
from agent.engine.usage.aggregates import VFolderTree, read_dir
from agent.engine.usage.scanner import ScanCancelled, scan
from catalog import Catalog
from catalog.usage_store import DirRow, Totals, UsageStore, VFolderChange
from tests.support import walk


def _tree(root: Path) -> None:
    (root / "a" / "b").mkdir(parents=True)
    (root / "empty").mkdir()
    (root / "f").write_bytes(os.urandom(12_345))
    (root / "a" / "g").write_bytes(os.urandom(70_001))
    (root / "a" / "b" / "h").write_bytes(b"")
    os.link(root / "a" / "g", root / "a" / "b" / "g-again")  # hard link across directories
    os.link(root / "f", root / "f-again")  # ... and within one
    os.symlink("a/g", root / "link")
    os.symlink("/etc", root / "a" / "out")
    os.mkfifo(root / "a" / "fifo")


def _scan_tree(root: Path, **kwargs: object) -> VFolderTree:
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        dirs = scan(fd, "", **kwargs)  # type: ignore[arg-type]
    finally:
        os.close(fd)
    tree = VFolderTree()
    for rel, agg in dirs.items():
        tree.put(rel, agg)
    return tree


def test_scan_totals_equal_a_walk_and_du(tmp_path: Path) -> None:
    _tree(tmp_path)
    for threads in (1, 2, 4):
        assert _scan_tree(tmp_path, threads=threads).totals() == walk(tmp_path)


def test_c_reader_and_python_reader_agree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if aggregates._dirread is None:
        pytest.skip("the C reader is not built (pip install -e . builds it)")
    _tree(tmp_path)
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        rels = ("", "a", "a/b", "empty")
        fast = {rel: read_dir(fd, rel) for rel in rels}  # one C call per directory
        opened = {rel: read_dir(fd, rel, on_open=lambda _rel, _fd: None) for rel in rels}  # C read of an open fd
        monkeypatch.setattr(aggregates, "_dirread", None)
        slow = {rel: read_dir(fd, rel) for rel in rels}
    finally:
        os.close(fd)
    for rel in rels:
        for a in (fast[rel], opened[rel]):
            b = slow[rel]
            assert a is not None and b is not None
            assert (a.ino, a.entries, a.size, a.alloc, a.own_alloc, a.own_size, a.subdirs) == (
                b.ino, b.entries, b.size, b.alloc, b.own_alloc, b.own_size, b.subdirs
            )
            assert sorted(a.links) == sorted(b.links)


def test_deltas_keep_totals_right(tmp_path: Path) -> None:
    _tree(tmp_path)
    tree = _scan_tree(tmp_path)
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with open(tmp_path / "a" / "b" / "g-again", "ab") as f:  # grown through the other name
            f.write(os.urandom(100_000))
        stale = tree.put("a/b", read_dir(fd, "a/b"))
        assert stale == {"a"}  # the directory holding the older name must be re-read
        tree.put("a", read_dir(fd, "a"))
        assert tree.totals() == walk(tmp_path)
        os.unlink(tmp_path / "f-again")
        tree.put("", read_dir(fd, ""))
        assert tree.totals() == walk(tmp_path)
        gone = tree.drop("a")  # a subtree leaves: everything below goes with it
        assert sorted(gone) == ["a", "a/b"]
        assert "a/b" not in tree.dirs
    finally:
        os.close(fd)


def test_read_dir_never_goes_through_a_symlink(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "x").write_bytes(b"x")
    os.symlink("real", tmp_path / "via-link")
    os.symlink("/etc", tmp_path / "etc-link")
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert read_dir(fd, "via-link") is None
        assert read_dir(fd, "etc-link") is None
        with pytest.raises(OSError) as e:
            read_dir(fd, "..")
        assert e.value.errno == 18  # EXDEV: openat2 RESOLVE_BENEATH refuses to climb out
    finally:
        os.close(fd)


def test_a_cancelled_scan_stops(tmp_path: Path) -> None:
    for i in range(50):
        (tmp_path / f"d{i}").mkdir()
    cancel = threading.Event()
    cancel.set()
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(ScanCancelled):
            scan(fd, "", cancel=cancel)
    finally:
        os.close(fd)


def test_catalogue_rows_replace_and_apply_deltas(tmp_path: Path) -> None:
    async def main() -> None:
        cat = await Catalog.open(tmp_path / "catalog.db")
        try:
            store = UsageStore(cat.db)
            key = ("local", "qs", "ab" * 16)
            rows = [DirRow(f"d{i}", i, 1, 10, 4096, 4096, None) for i in range(12_000)]  # > one chunk
            t = Totals(12_000, 120_000, 4096 * 12_000, "scan", False, 1.0)
            await store.apply([VFolderChange(key, t, rows, [], replace_all=True)])
            assert len(await store.dirs(key)) == 12_000
            t2 = Totals(2, 20, 8192, "watch", False, 2.0)
            await store.apply([VFolderChange(key, t2, [DirRow("d1", 1, 5, 50, 0, 0, "1:2:3:4:2")], ["d2"])])
            got = {r.relpath: r for r in await store.dirs(key)}
            assert len(got) == 11_999 and got["d1"].entries == 5 and got["d1"].links == "1:2:3:4:2"
            u = await cat.get_usage(*key)
            assert u is not None and (u.file_count, u.used_bytes, u.source) == (2, 20, "watch")
            await store.request_rescan(key)
            assert await store.take_rescan_requests() == [key]
            assert await store.take_rescan_requests() == []
            assert await store.forget_orphans() == 1  # the catalogue does not know this vfolder
            assert await store.dirs(key) == []
        finally:
            await cat.close()

    asyncio.run(main())


def test_a_scan_reads_every_directory_of_a_wide_tree(tmp_path: Path) -> None:
    """A full walk served as settled lacked 2,999 of 3,000 sibling directories (their entries uncounted):
    a reader queued the children of a wide directory before counting them, and another reader, taking the
    first child and its own child meanwhile, brought the count of directories left to zero and queued the
    ends; the children queued after the ends were never read, and the scan returned as complete."""
    for i in range(3000):
        (tmp_path / "wide" / f"w{i}" / "x").mkdir(parents=True)
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for attempt in range(30):
            dirs = scan(fd, "", threads=2 + attempt % 3)
            assert len(dirs) == 2 + 2 * 3000, (attempt, len(dirs))
            assert sum(agg.entries for agg in dirs.values()) == 1 + 2 * 3000, attempt
    finally:
        os.close(fd)
