"""The FUSE view driven in-process with pytest-trio: a real mount of :class:`ViewFS` over a real catalogue.

Filesystem calls on the mount run in worker threads (the trio thread serves the FUSE requests).
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import stat
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pyfuse3 = pytest.importorskip("pyfuse3", reason="the view needs pyfuse3 (extra 'fuse')")
import trio  # noqa: E402

from agent.config import ViewConfig  # noqa: E402
from agent.view import fs as view_fs  # noqa: E402
from agent.view import mounts  # noqa: E402
from agent.view.fs import ViewFS  # noqa: E402
from agent.view.links import OUTSIDE, shown_target  # noqa: E402
from agent.view.process import mount_options  # noqa: E402
from backends.ids import VFolderID  # noqa: E402
from catalog import Catalog  # noqa: E402
from catalog.readonly import ReadOnlyCatalog  # noqa: E402

if not os.path.exists("/dev/fuse") or os.geteuid() != 0:
    pytest.skip("FUSE mounts need /dev/fuse and root", allow_module_level=True)

QS = "team-a"
READY = uuid.UUID("0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d")
MISSING = uuid.UUID("11111111-2222-4333-8444-555555555555")


def _run(coro_fn: Callable[[Catalog], Any], db: Path) -> Any:
    async def go() -> Any:
        cat = await Catalog.open(db)
        try:
            return await coro_fn(cat)
        finally:
            await cat.close()

    return asyncio.run(go())


@pytest.fixture
def world(tmp_path: Path) -> Iterator[dict[str, Any]]:
    volume = tmp_path / "volume"
    ready = volume / VFolderID(QS, READY).relpath
    ready.mkdir(parents=True)
    (volume / "version.txt").write_text("3\n")
    (ready / "small.txt").write_text("hello view\n")
    (ready / "data").mkdir()
    (ready / "data" / "blob.bin").write_bytes(os.urandom(300_000))
    (ready / "data" / "empty").write_bytes(b"")
    os.chmod(ready / "data" / "blob.bin", 0o640)
    os.utime(ready / "small.txt", ns=(1_600_000_000_123_456_789, 1_600_000_000_987_654_321))
    os.symlink("/etc/passwd", ready / "passwd-link")
    os.symlink("../small.txt", ready / "data" / "up-link")
    os.symlink("../../../../../../../../etc/passwd", ready / "data" / "climb")
    db = tmp_path / "catalog.db"

    async def fill(cat: Catalog) -> None:
        await cat.record_volume("local", "vfs", str(volume), "serving", None)
        await cat.add_quota_scope("local", QS, 10 * 2**30)
        await cat.add_vfolder("local", QS, READY.hex)
        await cat.add_vfolder("local", QS, MISSING.hex)
        await cat.mark_vfolder_missing("local", QS, MISSING.hex)
        await cat.put_usage(
            "local", QS, READY.hex, used_bytes=300_011, file_count=6, allocated_bytes=311_296, source="scan",
            measured_at=1_700_000_000.25,
        )

    _run(fill, db)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    yield {"volume": volume, "ready": ready, "db": db, "mnt": mnt}
    mounts.detach(mnt)  # whatever happened in the test, never leave a mount behind


async def _mounted(world: dict[str, Any], check: Callable[[ViewFS], None], view: ViewConfig | None = None) -> None:
    catalog = ReadOnlyCatalog(world["db"])
    fs = ViewFS(catalog, {"local": world["volume"]}, view or ViewConfig())
    fs.refresh()
    pyfuse3.init(fs, str(world["mnt"]), mount_options())
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pyfuse3.main)
            try:
                await trio.to_thread.run_sync(check, fs)
            finally:
                pyfuse3.terminate()
    finally:
        pyfuse3.close(unmount=True)
        fs.close()
        catalog.close()


def _tree(top: Path) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, n), top) for d, dirs, files in os.walk(top) for n in dirs + files)


@pytest.mark.trio
async def test_mirror_listing_stat_and_bytes(world: dict[str, Any]) -> None:
    def check(fs: ViewFS) -> None:
        mnt, ready = world["mnt"], world["ready"]
        assert os.listdir(mnt) == ["local"]
        assert os.listdir(mnt / "local") == [QS]
        assert sorted(os.listdir(mnt / "local" / QS)) == sorted([".usage", str(READY), str(MISSING)])
        view = mnt / "local" / QS / str(READY)
        assert sorted(os.listdir(view)) == sorted(os.listdir(ready))
        top, real_top = os.stat(view), os.stat(ready)  # the vfolder directory itself is the real one
        assert (top.st_mode, top.st_mtime_ns) == (real_top.st_mode, real_top.st_mtime_ns)
        for rel in ("small.txt", "data", "data/blob.bin", "data/empty", "passwd-link", "data/up-link"):
            real, shown = os.lstat(ready / rel), os.lstat(view / rel)
            assert stat.S_IFMT(shown.st_mode) == stat.S_IFMT(real.st_mode), rel
            assert (shown.st_mode, shown.st_size, shown.st_uid, shown.st_gid) == (
                real.st_mode, real.st_size, real.st_uid, real.st_gid
            ), rel
            assert shown.st_mtime_ns == real.st_mtime_ns, rel
        for rel in ("small.txt", "data/blob.bin", "data/empty"):
            assert (view / rel).read_bytes() == (ready / rel).read_bytes(), rel
        assert _tree(view) == _tree(ready)

    await _mounted(world, check)


@pytest.mark.trio
async def test_symlinks_stay_inside(world: dict[str, Any]) -> None:
    def check(fs: ViewFS) -> None:
        view = world["mnt"] / "local" / QS / str(READY)
        assert stat.S_ISLNK(os.lstat(view / "passwd-link").st_mode)
        assert os.readlink(view / "data" / "up-link") == "../small.txt"
        assert (view / "data" / "up-link").read_text() == "hello view\n"  # a link inside the vfolder works
        host = Path("/etc/passwd").read_bytes()
        for link in ("passwd-link", "data/climb"):
            text = os.readlink(view / link)
            assert OUTSIDE in text and text.endswith("etc/passwd"), text
            with pytest.raises(FileNotFoundError):
                (view / link).read_bytes()
            assert not os.path.exists(view / link)
        assert os.path.realpath(view / "passwd-link").startswith(str(world["mnt"]))
        assert host  # the host file exists and was never what the view returned

    await _mounted(world, check)


def test_shown_target_rules() -> None:
    assert shown_target("a/b", 0) == "a/b"
    assert shown_target("../x", 1) == "../x"
    assert shown_target("./a//b/", 0) == "a/b"
    assert shown_target("s/../../x", 1) == "../x"  # normalised: the kernel only walks down from an ancestor
    assert shown_target("../x", 0) == f"../{OUTSIDE}/../x"
    assert shown_target("/etc/passwd", 2) == f"../../../{OUTSIDE}/etc/passwd"
    assert shown_target("s/s/s/s/../../../../../etc", 0) == f"../{OUTSIDE}/s/s/s/s/../../../../../etc"


@pytest.mark.trio
async def test_every_write_is_erofs(world: dict[str, Any]) -> None:
    def check(fs: ViewFS) -> None:
        scope = world["mnt"] / "local" / QS
        view = scope / str(READY)
        attempts: dict[str, Callable[[], object]] = {
            "create": lambda: os.open(view / "new.txt", os.O_WRONLY | os.O_CREAT, 0o644),
            "write": lambda: os.open(view / "small.txt", os.O_RDWR),
            "append": lambda: os.open(view / "small.txt", os.O_WRONLY | os.O_APPEND),
            "truncate": lambda: os.truncate(view / "small.txt", 0),
            "mkdir": lambda: os.mkdir(view / "d"),
            "rmdir": lambda: os.rmdir(view / "data"),
            "unlink": lambda: os.unlink(view / "small.txt"),
            "rename": lambda: os.rename(view / "small.txt", view / "moved.txt"),
            "symlink": lambda: os.symlink("small.txt", view / "l2"),
            "link": lambda: os.link(view / "small.txt", view / "hard"),
            "chmod": lambda: os.chmod(view / "small.txt", 0o777),
            "chown": lambda: os.chown(view / "small.txt", 1, 1),
            "utime": lambda: os.utime(view / "small.txt", (0, 0)),
            "setxattr": lambda: os.setxattr(view, "user.storage_agent.state", b"x"),
            "removexattr": lambda: os.removexattr(view, "user.storage_agent.state"),
            "mknod": lambda: os.mkfifo(view / "fifo"),
            "usage-write": lambda: os.open(scope / ".usage", os.O_WRONLY | os.O_TRUNC),
            "scope-mkdir": lambda: os.mkdir(scope / "x"),
        }
        for what, attempt in attempts.items():
            with pytest.raises(OSError) as info:
                attempt()
            assert info.value.errno == errno.EROFS, what
        assert (world["ready"] / "small.txt").read_text() == "hello view\n"

    await _mounted(world, check)


@pytest.mark.trio
async def test_catalogue_figures_and_missing_vfolder(world: dict[str, Any]) -> None:
    def check(fs: ViewFS) -> None:
        scope = world["mnt"] / "local" / QS
        view = scope / str(READY)
        names = set(os.listxattr(view))
        assert {"user.storage_agent.used_bytes", "user.storage_agent.state"} <= names
        got = {n.rsplit(".", 1)[1]: os.getxattr(view, n).decode() for n in names}
        assert got["used_bytes"] == "300011" and got["file_count"] == "6" and got["allocated_bytes"] == "311296"
        assert got["source"] == "scan" and got["stale"] == "false" and float(got["measured_at"]) == 1_700_000_000.25
        assert got["state"] == "ready" and got["vfid"] == f"{QS}/{READY.hex}"
        missing = scope / str(MISSING)
        assert os.path.isdir(missing) and os.listdir(missing) == []
        assert os.getxattr(missing, "user.storage_agent.state") == b"missing"
        assert os.getxattr(scope, "user.storage_agent.limit_bytes") == str(10 * 2**30).encode()
        with pytest.raises(OSError) as info:
            os.getxattr(view / "small.txt", "user.storage_agent.state")
        assert info.value.errno == errno.ENODATA
        doc = json.loads((scope / ".usage").read_text())
        assert doc["quota_scope"] == QS and doc["limit_bytes"] == 10 * 2**30
        rows = {r["id"]: r for r in doc["vfolders"]}
        assert rows[str(READY)]["used_bytes"] == 300_011 and rows[str(READY)]["file_count"] == 6
        assert rows[str(MISSING)]["state"] == "missing" and rows[str(MISSING)]["used_bytes"] == -1
        assert doc["totals"]["missing"] == 1 and doc["totals"]["allocated_bytes"] == 311_296

    await _mounted(world, check)


@pytest.mark.trio
async def test_new_scopes_appear_and_scope_filter(world: dict[str, Any]) -> None:
    def check(fs: ViewFS) -> None:
        local = world["mnt"] / "local"
        assert os.listdir(local) == [QS]
        _run(lambda cat: cat.add_quota_scope("local", "team-b", None), world["db"])
        _run(lambda cat: cat.add_quota_scope("local", "hidden", None), world["db"])
        trio.from_thread.run_sync(fs.refresh)  # what the poller of `storage-agent view` does every 2 s
        assert sorted(os.listdir(local)) == sorted([QS, "team-b"])
        assert os.listdir(local / "team-b") == [".usage"]
        with pytest.raises(FileNotFoundError):
            os.stat(local / "hidden")

    await _mounted(world, check, ViewConfig.model_validate({"scopes": [QS, "team-b"]}))


def _sh(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=True).stdout


@pytest.mark.trio
async def test_hard_links_are_one_file(world: dict[str, Any]) -> None:
    ready = world["ready"]
    os.link(ready / "data" / "blob.bin", ready / "blob-again.bin")
    (ready / "sub").mkdir()
    os.link(ready / "data" / "blob.bin", ready / "sub" / "third.bin")

    def check(fs: ViewFS) -> None:
        view = world["mnt"] / "local" / QS / str(READY)
        # du and cp -a count a file by (st_dev, st_ino): through the view as on the volume
        assert _sh("du", "-sb", str(view)).split()[0] == _sh("du", "-sb", str(ready)).split()[0]
        assert _sh("du", "-s", "-B1", str(view)).split()[0] == _sh("du", "-s", "-B1", str(ready)).split()[0]
        names = ("data/blob.bin", "blob-again.bin", "sub/third.bin")
        seen = [os.lstat(view / n) for n in names]  # found by lookup (the listings above were READDIRPLUS)
        assert len({st.st_ino for st in seen}) == 1 and all(st.st_nlink == 3 for st in seen)
        listed = {e.name: e.inode() for e in os.scandir(view)}
        assert listed["blob-again.bin"] == seen[0].st_ino
        copy = world["mnt"].parent / "copied"
        _sh("cp", "-a", str(view), str(copy))
        assert os.stat(copy / "blob-again.bin").st_ino == os.stat(copy / "data" / "blob.bin").st_ino
        assert (copy / "sub" / "third.bin").read_bytes() == (ready / "data" / "blob.bin").read_bytes()
        # the name a linked file was last seen under goes away: it is still there under the others
        os.unlink(ready / "sub" / "third.bin")
        assert (view / "blob-again.bin").read_bytes() == (ready / "data" / "blob.bin").read_bytes()

    await _mounted(world, check)


@pytest.mark.trio
async def test_hard_linked_symlink_keeps_each_names_confinement(world: dict[str, Any]) -> None:
    ready = world["ready"]
    os.symlink("../small.txt", ready / "data" / "up2")
    os.link(ready / "data" / "up2", ready / "up2-at-root", follow_symlinks=False)  # the same inode, one level up

    def check(fs: ViewFS) -> None:
        view = world["mnt"] / "local" / QS / str(READY)
        assert os.readlink(view / "data" / "up2") == "../small.txt"
        assert (view / "data" / "up2").read_text() == "hello view\n"
        # from the vfolder root the same text would climb out: shown as a dead end, as any such link
        assert os.readlink(view / "up2-at-root") == f"../{OUTSIDE}/../small.txt"
        assert not os.path.exists(view / "up2-at-root")
        assert os.readlink(view / "data" / "up2") == "../small.txt"  # and the first name is unchanged

    await _mounted(world, check)


@pytest.mark.trio
async def test_changes_show_through_the_caches(world: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(view_fs, "TTL_REAL", 0.3)
    ready = world["ready"]

    def check(fs: ViewFS) -> None:
        view = world["mnt"] / "local" / QS / str(READY)
        small = view / "small.txt"
        assert small.read_text() == "hello view\n"
        before = sorted(os.listdir(view))
        assert sorted(os.listdir(view)) == before and fs.listings  # the second listing came from the kept one
        # a new or removed name shows at once: a kept listing serves only while its directory is unchanged
        time.sleep(0.02)  # past the directory's last change, for filesystems with coarse timestamps
        (ready / "new.txt").write_text("new\n")
        assert sorted(os.listdir(view)) == sorted([*before, "new.txt"])
        assert (view / "new.txt").read_text() == "new\n"
        time.sleep(0.02)
        os.unlink(ready / "new.txt")
        assert sorted(os.listdir(view)) == before
        # kept pages (keep_cache) are dropped once refreshed attributes show another size or mtime
        (ready / "small.txt").write_text("HELLO VIEW\n")  # same size, new mtime
        time.sleep(0.5)
        assert small.read_text() == "HELLO VIEW\n"
        (ready / "small.txt").write_text("hello view, now longer\n")
        time.sleep(0.5)
        assert small.read_text() == "hello view, now longer\n"
        assert os.stat(small).st_size == len("hello view, now longer\n")

    await _mounted(world, check)


@pytest.mark.trio
async def test_walks_with_a_tiny_listing_cache(world: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(view_fs, "LISTING_CACHE_ENTRIES", 3)  # every listing pushes the others out
    monkeypatch.setattr(view_fs, "TTL_REAL", 0.2)
    ready = world["ready"]
    for i in range(40):
        (ready / "data" / f"n{i:02d}").write_bytes(b"x" * i)

    def check(fs: ViewFS) -> None:
        view = world["mnt"] / "local" / QS / str(READY)
        for _ in range(3):
            assert _tree(view) == _tree(ready)
            for rel in _tree(ready):
                real, shown = os.lstat(ready / rel), os.lstat(view / rel)
                assert (shown.st_mode, shown.st_size, shown.st_mtime_ns) == (
                    real.st_mode, real.st_size, real.st_mtime_ns
                ), rel
            time.sleep(0.25)
        # read on the trio thread: a FORGET from the kernel may change the listings meanwhile
        listed, held = trio.from_thread.run_sync(lambda: (fs.listed, sum(len(x.names) for x in fs.listings.values())))
        assert listed <= 3 and listed == held

    await _mounted(world, check)
