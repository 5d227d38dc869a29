"""The one path resolver: nothing outside the vfolder is reachable, whatever the path or the race."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from backends import files
from backends.errors import FileOpError, InvalidPath
from backends.resolver import VFolderRoot

CANARY = b"OUTSIDE-CANARY"


@pytest.fixture
def layout(tmp_path: Path) -> tuple[Path, Path, Path]:
    volume = tmp_path / "volume"
    vf = volume / "qs" / "ab" / "cd" / "rest"
    vf.mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_bytes(CANARY)
    return volume, vf, outside


@pytest.fixture
def root(layout: tuple[Path, Path, Path]):  # noqa: ANN201
    volume, _, _ = layout
    with VFolderRoot.at(str(volume), "qs/ab/cd/rest") as r:
        yield r


def read(root: VFolderRoot, relpath: str) -> bytes:
    fd, _ = files.open_regular(root, relpath)
    try:
        return os.read(fd, 1 << 16)
    finally:
        os.close(fd)


@pytest.mark.parametrize("relpath", ["../../../../outside/secret.txt", "/etc/passwd", "a/../../x", "..", "../"])
def test_dotdot_and_absolute_paths_are_refused(root: VFolderRoot, layout, relpath: str) -> None:  # noqa: ANN001
    (layout[1] / "a").mkdir()
    with pytest.raises(InvalidPath):
        read(root, relpath)


def test_symlinks_inside_that_point_out_are_refused(root: VFolderRoot, layout) -> None:  # noqa: ANN001
    _, vf, outside = layout
    os.symlink(outside / "secret.txt", vf / "abs-link")
    os.symlink("../../../../outside/secret.txt", vf / "rel-link")
    os.symlink(outside, vf / "dir-link")
    (vf / "sub").mkdir()
    os.symlink("../rel-link", vf / "sub" / "chain")
    for relpath in ("abs-link", "rel-link", "dir-link/secret.txt", "sub/chain"):
        with pytest.raises((InvalidPath, FileOpError)):
            read(root, relpath)
    with pytest.raises(InvalidPath):
        files.mkdir(root, "dir-link/newdir", parents=True, exist_ok=False)
    with pytest.raises(InvalidPath):
        files.listdir(root, "dir-link", limit=10)
    assert sorted(os.listdir(outside)) == ["secret.txt"]


def test_symlinks_that_stay_inside_work(root: VFolderRoot, layout) -> None:  # noqa: ANN001
    _, vf, _ = layout
    (vf / "d").mkdir()
    (vf / "d" / "f.txt").write_bytes(b"inside")
    os.symlink("d/f.txt", vf / "link")
    os.symlink("../d", vf / "d" / "self-parent")
    assert read(root, "link") == b"inside"
    assert read(root, "d/self-parent/f.txt") == b"inside"


def test_operations_on_a_symlink_act_on_the_link(root: VFolderRoot, layout) -> None:  # noqa: ANN001
    _, vf, outside = layout
    os.symlink(outside / "secret.txt", vf / "out")
    os.symlink(outside, vf / "outdir")
    files.rename(root, "out", "renamed")
    assert os.readlink(vf / "renamed") == str(outside / "secret.txt")
    files.move(root, "renamed", "moved")
    files.delete(root, ["moved", "outdir"], recursive=True)
    assert not os.path.lexists(vf / "moved") and not os.path.lexists(vf / "outdir")
    assert (outside / "secret.txt").read_bytes() == CANARY


def test_rename_and_move_never_clobber(root: VFolderRoot, layout) -> None:  # noqa: ANN001
    _, vf, _ = layout
    (vf / "a").write_bytes(b"a")
    (vf / "b").write_bytes(b"b")
    with pytest.raises(FileOpError) as e:
        files.rename(root, "a", "b")
    assert e.value.errno == 17 and (vf / "b").read_bytes() == b"b"
    with pytest.raises(FileOpError):
        files.move(root, "a", "b")
    assert (vf / "a").read_bytes() == b"a"
    for bad in ("x/y", "..", ".", ""):
        with pytest.raises(InvalidPath):
            files.rename(root, "a", bad)


def test_fifo_is_refused_without_hanging(root: VFolderRoot, layout) -> None:  # noqa: ANN001
    _, vf, _ = layout
    os.mkfifo(vf / "pipe")
    with pytest.raises(FileOpError):
        read(root, "pipe")


def test_the_vfolder_root_itself_cannot_be_deleted_or_renamed(root: VFolderRoot) -> None:
    for relpath in (".", "", "sub/.."):
        with pytest.raises(InvalidPath):
            files.delete(root, [relpath], recursive=True)
    with pytest.raises(InvalidPath):
        files.rename(root, ".", "x")


def test_directory_swapped_for_a_symlink_never_leaks(root: VFolderRoot, layout) -> None:  # noqa: ANN001
    """A directory replaced by a symlink to outside between check and use: the kernel refuses each resolution."""
    _, vf, outside = layout
    (outside / "secret.txt").write_bytes(CANARY)
    real = vf / "d"
    real.mkdir()
    (real / "secret.txt").write_bytes(b"inside")
    stop = threading.Event()

    def swapper() -> None:
        link = vf / "d-link"
        parked = vf / "d-real"
        while not stop.is_set():
            os.symlink(outside, link)
            os.rename(real, parked)
            os.rename(link, real)  # now d -> outside
            os.rename(real, link)
            os.rename(parked, real)
            os.unlink(link)

    t = threading.Thread(target=swapper)
    t.start()
    seen_inside = 0
    try:
        for _ in range(3000):
            try:
                data = read(root, "d/secret.txt")
            except (InvalidPath, FileOpError):
                continue
            assert CANARY not in data
            seen_inside += 1
            try:
                names = [e.name for e in files.listdir(root, "d", limit=10)]
            except (InvalidPath, FileOpError):
                continue
            assert names == ["secret.txt"]
    finally:
        stop.set()
        t.join()
    assert seen_inside > 0
    assert (outside / "secret.txt").read_bytes() == CANARY


def test_deep_trees_are_deleted_without_recursion_limits(root: VFolderRoot, layout) -> None:  # noqa: ANN001
    """A user's tree thousands of levels deep: delete works (Python's rmtree would hit RecursionError)."""
    _, vf, outside = layout
    fd = os.open(vf, os.O_RDONLY | os.O_DIRECTORY)
    top = fd
    os.mkdir("deep", dir_fd=fd)
    fd = os.open("deep", os.O_RDONLY | os.O_DIRECTORY, dir_fd=top)
    for _ in range(3000):
        os.mkdir("d", dir_fd=fd)
        with open(os.open("f", os.O_WRONLY | os.O_CREAT, dir_fd=fd), "wb") as f:
            f.write(b"x")
        nxt = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = nxt
    os.symlink(outside, "link-out", dir_fd=fd)
    os.close(fd)
    os.close(top)
    files.delete(root, ["deep"], recursive=True)
    assert os.listdir(vf) == []
    assert (outside / "secret.txt").read_bytes() == CANARY
