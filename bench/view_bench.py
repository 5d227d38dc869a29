"""Benchmark the read-only FUSE view against direct access to the same files, as ratios.

Builds one vfolder holding a directory of --wide entries, a tree of --files files (1000 per directory)
and one file of --size-mib MiB, registers it in a fresh catalogue, mounts the view with a real
``storage-agent view`` process and times, through the view and directly on the volume:

- ``ls -l`` of the wide directory (target: view <= 3x direct),
- ``find <tree> | wc -l`` (target: view <= 3x direct),
- a sequential read of the big file in 1 MiB reads (target: view throughput >= 0.5x direct).

Direct figures are the median of --repeat warm runs. For the view, "first" is the first run after
mounting (neither the kernel nor the view has anything of it cached yet) and "warm" the median of the
following runs, back to back: within the view's listing lifetime (agent.view.fs.TTL_REAL), so a walk
reuses the listings the last one read. The "expired" rows wait longer than that before each view run:
every directory is read and every entry stat'ed again (the kernel still knows the entries).

Reads: "vol cached" drops the view's page cache of the file before each view run (POSIX_FADV_DONTNEED
on the view's file), so every byte goes through the view process while the volume's page cache stays
warm for both sides; "from disk" drops the volume's copy too, on both sides; "re-read" keeps the
view's page cache (the view opens files with keep_cache), as a second `cat` of the same file would.
The data is removed afterwards unless --keep.

    .venv/bin/python bench/view_bench.py [--wide 10000] [--files 100000] [--size-mib 1024] [--dir /var/tmp/x]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.view import mounts  # noqa: E402
from agent.view.fs import TTL_REAL  # noqa: E402
from backends.ids import VFolderID  # noqa: E402
from catalog import Catalog  # noqa: E402

QSID = "bench"


def build(volume: Path, wide: int, files: int, size_mib: int) -> tuple[uuid.UUID, Path]:
    folder = uuid.uuid4()
    vf = volume / VFolderID(QSID, folder).relpath
    (vf / "wide").mkdir(parents=True)
    (volume / "version.txt").write_text("3\n")
    for i in range(wide):
        (vf / "wide" / f"entry-{i:05d}").write_bytes(b"x" * (i % 200))
    for i in range(files):
        d = vf / "tree" / f"d{i // 1000:03d}"
        if i % 1000 == 0:
            d.mkdir(parents=True)
        (d / f"f{i}").touch()
    chunk = os.urandom(2**20)
    with open(vf / "big.bin", "wb") as f:
        for _ in range(size_mib):
            f.write(chunk)
    return folder, vf


async def register(db: Path, volume: Path, folder: uuid.UUID) -> None:
    cat = await Catalog.open(db)
    try:
        await cat.record_volume("local", "vfs", str(volume), "serving", None)
        await cat.add_quota_scope("local", QSID, None)
        await cat.add_vfolder("local", QSID, folder.hex)
    finally:
        await cat.close()


def config_toml(volume: Path, db: Path, mnt: Path) -> str:
    return f"""[storage-proxy]
secret = "bench-not-used"

[api.client]
service-addr = {{ host = "127.0.0.1", port = 0 }}

[api.manager]
service-addr = {{ host = "127.0.0.1", port = 0 }}
secret = "bench-not-used"

[volume.local]
backend = "vfs"
path = "{volume}"

[catalog]
path = "{db}"

[view]
enabled = true
mount-root = "{mnt}"

[logging]
level = "WARNING"
"""


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def ls_l(path: Path) -> None:
    subprocess.run(["ls", "-l", str(path)], check=True, stdout=subprocess.DEVNULL)


def find_count(path: Path) -> int:
    out = subprocess.run(f"find '{path}' | wc -l", shell=True, check=True, capture_output=True, text=True).stdout
    return int(out)


def drop_file_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read_all(path: Path, drop_cache: bool, cold: Path | None = None) -> int:
    if cold is not None:  # the volume's copy too: the read comes from the disk, on both sides
        drop_file_cache(cold)
    fd = os.open(path, os.O_RDONLY)
    try:
        if drop_cache:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        buf = bytearray(2**20)
        view = memoryview(buf)
        total = 0
        while n := os.readv(fd, [view]):
            total += n
        return total
    finally:
        os.close(fd)


def measure(
    direct: Callable[[], object], viewed: Callable[[], object], repeat: int, pause: float = 0.0
) -> list[float]:
    direct_runs = [timed(direct) for _ in range(repeat)]
    view_runs = []
    for _ in range(repeat + 1):
        time.sleep(pause)
        view_runs.append(timed(viewed))
    return [statistics.median(direct_runs), view_runs[0], statistics.median(view_runs[1:])]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--wide", type=int, default=10_000, help="entries in the directory listed with ls -l")
    ap.add_argument("--files", type=int, default=100_000, help="files in the tree walked with find")
    ap.add_argument("--size-mib", type=int, default=1024, help="size of the file read sequentially")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=None, help="where to build the data (default: a temp dir)")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()

    base = Path(tempfile.mkdtemp(prefix="view-bench-", dir=args.dir))
    volume, db, mnt = base / "volume", base / "catalog.db", base / "view"
    proc = None
    try:
        t0 = time.perf_counter()
        folder, vf = build(volume, args.wide, args.files, args.size_mib)
        asyncio.run(register(db, volume, folder))
        built = time.perf_counter() - t0
        print(f"built {args.wide} + {args.files} files and a {args.size_mib} MiB file in {built:.1f} s")
        (base / "agent.toml").write_text(config_toml(volume, db, mnt))
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "view", "--config", str(base / "agent.toml")], cwd=ROOT
        )
        deadline = time.monotonic() + 30
        while not mounts.is_view_mounted(mnt):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the view did not mount (exit status {proc.poll()})")
            time.sleep(0.05)
        seen = mnt / "local" / QSID / str(folder)
        read_all(vf / "big.bin", drop_cache=False)  # the volume's page cache warm for both sides

        size = (vf / "big.bin").stat().st_size
        big, seen_big = vf / "big.bin", seen / "big.bin"
        expired = TTL_REAL + 0.5
        ls_direct, ls_view = (lambda: ls_l(vf / "wide")), (lambda: ls_l(seen / "wide"))
        find_direct, find_view = (lambda: find_count(vf / "tree")), (lambda: find_count(seen / "tree"))
        rows = [
            (f"ls -l, {args.wide} entries", measure(ls_direct, ls_view, args.repeat), "<= 3x", False),
            (f"find | wc -l, {args.files} files", measure(find_direct, find_view, args.repeat), "<= 3x", False),
            ("ls -l, expired", measure(ls_direct, ls_view, args.repeat, expired), "<= 3x", False),
            ("find | wc -l, expired", measure(find_direct, find_view, args.repeat, expired), "<= 3x", False),
            (f"read {args.size_mib} MiB, vol cached",
             measure(lambda: read_all(big, False), lambda: read_all(seen_big, True), args.repeat), ">= 0.5x", True),
            (f"read {args.size_mib} MiB, from disk",
             measure(lambda: read_all(big, False, big), lambda: read_all(seen_big, True, big), args.repeat),
             ">= 0.5x", True),
            (f"re-read {args.size_mib} MiB",
             measure(lambda: read_all(big, False), lambda: read_all(seen_big, False), args.repeat), ">= 0.5x", True),
        ]
        assert find_view() == find_direct(), "find through the view saw another number of entries"
        print()
        print(f"{'test':<28} {'direct':>10} {'view first':>11} {'view warm':>10} {'ratio first':>12} "
              f"{'ratio warm':>11} {'target':>8}")
        for name, (direct, first, warm), target, throughput in rows:
            if throughput:  # ratio of throughputs (view / direct), shown with MiB/s
                mib = size / 2**20
                cells = (f"{mib / direct:7.0f}MB/s", f"{mib / first:7.0f}MB/s", f"{mib / warm:7.0f}MB/s")
                ratios = (direct / first, direct / warm)
            else:  # ratio of times (view / direct)
                cells = (f"{direct * 1000:8.1f}ms", f"{first * 1000:9.1f}ms", f"{warm * 1000:8.1f}ms")
                ratios = (first / direct, warm / direct)
            print(f"{name:<28} {cells[0]:>10} {cells[1]:>11} {cells[2]:>10} {ratios[0]:>11.2f}x "
                  f"{ratios[1]:>10.2f}x {target:>8}")
        print(f"\nexpired: view runs {expired:.1f} s apart (listings re-read); "
              "vol cached: the view's page cache dropped before each view run;\n"
              "re-read: the view's page cache kept (keep_cache); ratios: time view/direct, read speed view/direct")
        return 0
    finally:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        mounts.detach(mnt)
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
