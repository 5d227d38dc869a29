"""Tests for backends.walk: both implementations against each other, a reference walk and GNU du."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from backends import walk
from backends.walk import TreeUsage

Impl = Callable[[Path], TreeUsage]

# Every way of running the walk; all must return identical results on a quiescent tree.
# max_open_dirs=1 forces the "re-open through the ancestor chain" path almost everywhere.
IMPLS: dict[str, Impl] = {
    "public": lambda p: walk.tree_usage(p),
    "c-1thread": lambda p: walk._tree_usage_c(p, threads=1),
    "c-4threads": lambda p: walk._tree_usage_c(p, threads=4),
    "c-8threads-cap1": lambda p: walk._tree_usage_c(p, threads=8, max_open_dirs=1),
    "py": lambda p: walk._tree_usage_py(p),
    "py-cap1": lambda p: walk._tree_usage_py(p, max_open_dirs=1),
}


def du(root: Path, *args: str) -> int:
    out = subprocess.run(["du", *args, os.fspath(root)], check=True, capture_output=True, text=True).stdout
    return int(out.split()[0])


def reference(root: Path) -> tuple[int, int, int]:
    """Naive path-based walk: (entries, size_bytes, allocated_bytes with du's hard-link rule)."""
    entries = size = 0
    rst = os.lstat(root)
    alloc = rst.st_blocks * 512
    seen: set[tuple[int, int]] = set()
    stack = [os.fsencode(root)]
    while stack:
        with os.scandir(stack.pop()) as it:
            for e in it:
                st = e.stat(follow_symlinks=False)
                entries += 1
                size += st.st_size
                is_dir = stat.S_ISDIR(st.st_mode)
                if not is_dir and st.st_nlink > 1:
                    if (st.st_dev, st.st_ino) in seen:
                        continue
                    seen.add((st.st_dev, st.st_ino))
                alloc += st.st_blocks * 512
                if is_dir:
                    stack.append(e.path)
    return entries, size, alloc


def check(root: Path) -> TreeUsage:
    """Assert every implementation agrees with the reference walk and with du; return the result."""
    results = {name: impl(root) for name, impl in IMPLS.items()}
    first = results["public"]
    for name, res in results.items():
        assert res == first, f"{name}: {res} != public: {first}"
    entries, size, alloc = reference(root)
    assert (first.entries, first.size_bytes, first.allocated_bytes, first.errors) == (entries, size, alloc, 0)
    assert first.allocated_bytes == du(root, "-s", "-B1")
    return first


def write(path: Path, nbytes: int) -> None:
    path.write_bytes(os.urandom(nbytes))


def test_c_extension_is_built() -> None:
    assert walk.IMPLEMENTATION == "c", "build it: .venv/bin/python setup.py build_ext --inplace (or pip install -e .)"


def test_empty_dir(tmp_path: Path) -> None:
    root = tmp_path / "empty"
    root.mkdir()
    res = check(root)
    assert res == TreeUsage(0, 0, os.lstat(root).st_blocks * 512, 0)
    assert res.allocated_bytes > 0  # the root directory's own block is counted, like du


def make_outside(tmp_path: Path) -> Path:
    """A directory outside the walked tree holding lots of apparent and allocated bytes."""
    out = tmp_path / "outside"
    out.mkdir()
    write(out / "big", 4 << 20)
    with open(out / "huge-sparse", "wb") as f:
        f.truncate(1 << 30)
    (out / "nested").mkdir()
    write(out / "nested" / "more", 1 << 20)
    return out


def test_nested_tree_symlinks_never_followed(tmp_path: Path) -> None:
    outside = make_outside(tmp_path)
    root = tmp_path / "tree"
    (root / "sub" / "deeper" / "deepest").mkdir(parents=True)
    (root / "empty1").mkdir()
    (root / "sub" / "empty2").mkdir()
    write(root / "a.txt", 10)
    write(root / "sub" / "b.bin", 5000)
    write(root / "sub" / "deeper" / "c.bin", 70_000)
    (root / "sub" / "deeper" / "zero").touch()
    os.symlink("a.txt", root / "link_file")
    os.symlink("sub", root / "link_dir")
    os.symlink(outside, root / "sub" / "link_out")
    os.symlink(outside / "big", root / "sub" / "link_out_file")
    os.symlink(".", root / "loop")
    os.symlink("missing-target", root / "dangling")
    with open(os.path.join(os.fsencode(root), b"non-utf8-\xff\xfe"), "wb") as f:
        f.write(b"12345")

    res = check(root)
    names = [
        "a.txt", "sub", "sub/deeper", "sub/deeper/deepest", "empty1", "sub/empty2", "sub/b.bin",
        "sub/deeper/c.bin", "sub/deeper/zero", "link_file", "link_dir", "sub/link_out", "sub/link_out_file",
        "loop", "dangling",
    ]  # fmt: skip
    expected_size = sum(os.lstat(root / n).st_size for n in names) + 5
    assert res.entries == len(names) + 1
    assert res.size_bytes == expected_size
    assert res.size_bytes == du(root, "-sb") - os.lstat(root).st_size  # du -b includes the root's st_size
    assert res.size_bytes < 200_000  # nothing of the outside GiB leaked in

    # Growing the outside directory must not change anything.
    write(outside / "big2", 2 << 20)
    with open(outside / "big", "ab") as f:
        f.write(os.urandom(1 << 20))
    assert check(root) == res


def test_hard_links_counted_once_for_allocation(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    write(root / "a" / "data", 256 * 1024)
    os.link(root / "a" / "data", root / "b" / "link1")
    os.link(root / "a" / "data", root / "link2")
    os.link(root / "a" / "data", tmp_path / "link-outside-tree")  # nlink 4, one link outside
    write(root / "single", 8192)

    res = check(root)
    data = os.lstat(root / "a" / "data")
    assert data.st_nlink == 4
    dirs = [root, root / "a", root / "b"]
    assert res.entries == 6
    assert res.size_bytes == 3 * 256 * 1024 + 8192 + sum(os.lstat(d).st_size for d in dirs[1:])
    assert res.allocated_bytes == 512 * (
        data.st_blocks + os.lstat(root / "single").st_blocks + sum(os.lstat(d).st_blocks for d in dirs)
    )


def test_sparse_file(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    root.mkdir()
    with open(root / "sparse", "wb") as f:
        f.truncate(100 << 20)
        f.seek(50 << 20)
        f.write(os.urandom(4096))
    res = check(root)
    assert res.size_bytes == 100 << 20
    assert res.allocated_bytes < 1 << 20  # a few blocks, not 100 MiB
    assert res.allocated_bytes >= 4096 + os.lstat(root).st_blocks * 512


def test_fifo_is_an_entry_and_never_opened(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    root.mkdir()
    os.mkfifo(root / "fifo")  # opening it for reading would block forever
    write(root / "f", 100)
    res = check(root)
    assert res.entries == 2
    assert res.size_bytes == 100


@pytest.mark.parametrize("name", list(IMPLS))
def test_root_symlink_is_refused(tmp_path: Path, name: str) -> None:
    real = tmp_path / "real"
    real.mkdir()
    write(real / "f", 100)
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(OSError) as info:
        IMPLS[name](tmp_path / "link")
    assert info.value.errno in (errno.ENOTDIR, errno.ELOOP)


@pytest.mark.parametrize("name", list(IMPLS))
def test_root_missing_or_not_a_directory(tmp_path: Path, name: str) -> None:
    with pytest.raises(FileNotFoundError):
        IMPLS[name](tmp_path / "missing")
    write(tmp_path / "file", 10)
    with pytest.raises(NotADirectoryError):
        IMPLS[name](tmp_path / "file")


def test_threads_argument(tmp_path: Path) -> None:
    write(tmp_path / "f", 10)
    with pytest.raises(ValueError):
        walk.tree_usage(tmp_path, threads=-1)
    assert walk.tree_usage(str(tmp_path), threads=1000) == walk.tree_usage(tmp_path, threads=1)


def make_deep(root: Path, depth: int, extra_dir: bool) -> tuple[int, int]:
    """Chain root/d/d/.../d (depth levels), a 1-byte file per level, optionally an empty dir per level.

    Built through directory fds: the full path of the bottom level is longer than PATH_MAX allows.
    Returns (entries, size_bytes) computed while building.
    """
    entries = size = 0
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir("d", dir_fd=fd)
            f = os.open("f", os.O_WRONLY | os.O_CREAT, dir_fd=fd)
            os.write(f, b"x")
            os.close(f)
            entries += 2
            size += 1 + os.stat("d", dir_fd=fd).st_size
            if extra_dir:
                os.mkdir("e", dir_fd=fd)
                entries += 1
                size += os.stat("e", dir_fd=fd).st_size
            nfd = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
    finally:
        os.close(fd)
    return entries, size


def remove_deep(root: Path) -> None:
    """Delete a make_deep chain iteratively (pytest's tmp cleanup, shutil.rmtree, recurses and would hit
    RecursionError): hoist each level's "d" up into root, then remove the emptied level."""
    rootfd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        cur: str | None = "d"
        hoisted = 0
        while cur is not None:
            fd = os.open(cur, os.O_RDONLY | os.O_DIRECTORY, dir_fd=rootfd)
            nxt = None
            try:
                for name in os.listdir(fd):
                    if name == "d":
                        nxt = f"hoisted{hoisted}"
                        hoisted += 1
                        os.rename(name, nxt, src_dir_fd=fd, dst_dir_fd=rootfd)
                    elif name == "e":
                        os.rmdir(name, dir_fd=fd)
                    else:
                        os.unlink(name, dir_fd=fd)
            finally:
                os.close(fd)
            os.rmdir(cur, dir_fd=rootfd)
            cur = nxt
    finally:
        os.close(rootfd)


def test_deep_tree_2000_levels(tmp_path: Path) -> None:
    root = tmp_path / "deep"
    root.mkdir()
    try:
        entries, size = make_deep(root, 2000, extra_dir=False)
        results = {name: impl(root) for name, impl in IMPLS.items()}
        assert len(set(results.values())) == 1, results
        res = results["public"]
        assert (res.entries, res.size_bytes, res.errors) == (entries, size, 0)
        assert res.allocated_bytes == du(root, "-s", "-B1")
        assert res.size_bytes == du(root, "-sb") - os.lstat(root).st_size
    finally:
        remove_deep(root)
    assert os.listdir(root) == ["f"]


def test_deep_and_bushy_with_fd_cap(tmp_path: Path) -> None:
    """Every level has a pending sibling, so parked fds pile up and the cap forces chain re-opens."""
    root = tmp_path / "deep"
    root.mkdir()
    entries, size = make_deep(root, 300, extra_dir=True)
    results = {name: impl(root) for name, impl in IMPLS.items()}
    results["c-cap2-2threads"] = walk._tree_usage_c(root, threads=2, max_open_dirs=2)
    results["py-cap3"] = walk._tree_usage_py(root, max_open_dirs=3)
    assert len(set(results.values())) == 1, results
    res = results["public"]
    assert (res.entries, res.size_bytes, res.errors) == (entries, size, 0)
    assert res.allocated_bytes == du(root, "-s", "-B1")


def make_binary(root: Path, depth: int) -> int:
    """Full binary tree of directories with a file in each; returns the number of directories below root."""
    level = [root]
    count = 0
    for _ in range(depth):
        nxt = []
        for d in level:
            for name in ("l", "r"):
                c = d / name
                c.mkdir()
                write(c / "f", 1 + count % 50)
                nxt.append(c)
                count += 1
        level = nxt
    return count


def test_fd_cap_forces_chain_reopens(tmp_path: Path) -> None:
    """In a full binary tree every directory on the DFS path has a pending sibling, whatever the inode order,
    so with max_open_dirs=1 children must be re-opened through the ancestor chain -- and still be exact."""
    root = tmp_path / "bin"
    root.mkdir()
    ndirs = make_binary(root, 10)
    res = check(root)
    assert res.entries == 2 * ndirs
    assert walk._fastwalk is not None
    *c_res, c_reopens = walk._fastwalk.tree_usage(os.fspath(root), 1, 1)
    assert TreeUsage(*c_res) == res and c_reopens > 100
    *_, c_default_reopens = walk._fastwalk.tree_usage(os.fspath(root), 1, 0)
    assert c_default_reopens == 0  # depth 10 never reaches the default cap
    stats: dict[str, int] = {}
    assert walk._tree_usage_py(root, max_open_dirs=1, stats=stats) == res
    assert stats["chain_reopens"] > 100


def test_wide_random_tree_all_thread_counts(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    root.mkdir()
    dirs = [root]
    for i in range(400):
        d = dirs[(i * 7) % len(dirs)] / f"d{i}"
        d.mkdir()
        dirs.append(d)
        for j in range(i % 9):
            write(d / f"f{j}", (i * 131 + j * 17) % 9000)
        if i % 50 == 7 and i % 9:  # d has an f0
            os.link(d / "f0", root / f"hl{i}")
    res = check(root)
    for threads in (1, 2, 3, 5, 16, 64):
        assert walk.tree_usage(root, threads=threads) == res


def test_race_dir_swapped_for_symlink_never_escapes(tmp_path: Path) -> None:
    """A directory repeatedly swapped for a symlink to a big outside dir: outside bytes never appear."""
    outside = make_outside(tmp_path)
    stash = tmp_path / "stash"  # where the real directory waits while the symlink is in place
    root = tmp_path / "tree"
    sub = root / "sub"
    (sub / "x" / "y").mkdir(parents=True)
    for d in (root, sub, sub / "x", sub / "x" / "y"):
        for j in range(20):
            write(d / f"f{j}", 100 + j)

    real_entries, real_size, real_alloc = reference(root)
    sub.rename(stash)
    sub.symlink_to(outside)
    link_entries, link_size, link_alloc = reference(root)
    sub.unlink()
    stash.rename(sub)
    outside_size = sum(os.lstat(p).st_size for p in outside.rglob("*"))
    outside_alloc = sum(os.lstat(p).st_blocks * 512 for p in outside.rglob("*"))
    assert real_size + link_size < outside_size and real_alloc + link_alloc < outside_alloc

    stop = threading.Event()
    swaps = 0

    def swapper() -> None:
        nonlocal swaps
        while not stop.is_set():
            sub.rename(stash)
            sub.symlink_to(outside)
            sub.unlink()
            stash.rename(sub)
            swaps += 1

    racers: list[Impl] = [
        lambda p: walk._tree_usage_c(p, threads=4),
        lambda p: walk._tree_usage_c(p, threads=3, max_open_dirs=1),
        lambda p: walk._tree_usage_py(p),
        lambda p: walk._tree_usage_py(p, max_open_dirs=1),
    ]
    t = threading.Thread(target=swapper, daemon=True)
    t.start()
    walks = 0
    deadline = time.monotonic() + 3.0
    try:
        while time.monotonic() < deadline:
            for impl in racers:
                res = impl(root)
                walks += 1
                assert res.entries <= real_entries + 1, res
                assert res.size_bytes <= real_size + link_size, res
                assert res.allocated_bytes <= real_alloc + link_alloc, res
    finally:
        stop.set()
        t.join()
    assert swaps > 10 and walks > 10
    assert sub.is_dir() and not sub.is_symlink()
    assert check(root).entries == real_entries  # quiescent again: exact
