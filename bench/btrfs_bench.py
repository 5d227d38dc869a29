"""btrfs backend on a loop-mounted btrfs image: reflink clone vs a plain copy, qgroup usage vs a walk.

1. Clone a vfolder of --clone-gib GiB (files of 128 MiB) through ``BtrfsVolume.clone_vfolder`` (FICLONE
   reflinks) and, as the baseline, copy the same tree with plain read/write (what a filesystem without
   reflinks costs; ``copy_file_range`` is no baseline on btrfs, the kernel turns it into a reflink
   there). Both timings include ``sync``, so dirty data is on disk in both cases. The clone's shared
   extents are checked with ``btrfs filesystem du``.
2. A quota scope of --files files (small, 1000 per directory): the time to answer its usage from the
   qgroup (``BtrfsQuotaModel.describe``: ``btrfs qgroup show --sync``) vs an exact walk
   (``backends.walk.tree_usage``, warm cache); medians of --repeat runs. After ``btrfs quota rescan -w``
   the qgroup's referenced bytes are compared with the walk.

Needs root (loop mount). Prints one table with ratios against the baselines measured in the same run.

    .venv/bin/python bench/btrfs_bench.py [--clone-gib 2] [--files 100000] [--dir /var/tmp]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backends.btrfs import BtrfsVolume  # noqa: E402
from backends.ids import VFolderID  # noqa: E402
from backends.walk import tree_usage  # noqa: E402
from tests.loopfs import loop_mount, volume_root, why_no_loop  # noqa: E402

MiB = 2**20
CHUNK = 128 * MiB


def fill(path: Path, total: int) -> None:
    block = os.urandom(MiB)
    for i in range(-(-total // CHUNK)):
        with open(path / f"part{i:03d}.bin", "wb") as f:
            for _ in range(min(CHUNK, total - i * CHUNK) // MiB):
                f.write(block)


def plain_copy(src: Path, dst: Path) -> None:
    """Read/write copy of a tree of regular files (no reflink, no copy_file_range)."""
    dst.mkdir(parents=True)
    for entry in os.scandir(src):
        if entry.is_dir(follow_symlinks=False):
            plain_copy(Path(entry.path), dst / entry.name)
            continue
        with open(entry.path, "rb") as r, open(dst / entry.name, "wb") as w:
            while chunk := r.read(8 * MiB):
                w.write(chunk)


def many_files(path: Path, n: int) -> None:
    for d in range(-(-n // 1000)):
        sub = path / f"d{d:04d}"
        sub.mkdir()
        for i in range(min(1000, n - d * 1000)):
            (sub / f"f{i}").write_bytes(b"x" * (100 + (i * 7919) % 3000))


def timed(fn) -> float:  # noqa: ANN001
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def btrfs_du_exclusive(path: Path) -> tuple[int, int]:
    out = subprocess.run(["btrfs", "filesystem", "du", "-s", "--raw", str(path)], check=True, capture_output=True,
                         text=True).stdout.splitlines()[-1].split()
    return int(out[0]), int(out[1])


async def bench(root: Path, clone_gib: float, nfiles: int, repeat: int) -> list[tuple[str, str, float, str, float]]:
    vol = BtrfsVolume("bench", root, {})
    await vol.init()
    rows = []

    # -- 1. clone ------------------------------------------------------------------------------------
    await vol.quota.create("src", None)
    await vol.quota.create("dst", None)
    src = VFolderID("src", uuid.uuid4())
    await vol.create_vfolder(src)
    size = int(clone_gib * 1024) * MiB
    print(f"writing a {clone_gib:g} GiB vfolder ...", flush=True)
    fill(vol.vfolder_path(src), size)
    os.sync()
    dst = VFolderID("dst", uuid.uuid4())
    t0 = time.perf_counter()
    await vol.clone_vfolder(src, dst)
    os.sync()
    t_clone = time.perf_counter() - t0
    total, exclusive = btrfs_du_exclusive(vol.vfolder_path(dst))
    assert total >= size and exclusive == 0, f"clone does not share its extents: total {total}, exclusive {exclusive}"
    print(f"reflink clone: {t_clone:.3f} s ({total} bytes, {exclusive} exclusive)", flush=True)
    plain = root / "dst" / "plain-copy"
    t_copy = timed(lambda: (plain_copy(vol.vfolder_path(src), plain), os.sync()))
    total_p, exclusive_p = btrfs_du_exclusive(plain)
    print(f"plain copy:    {t_copy:.3f} s ({total_p} bytes, {exclusive_p} exclusive)", flush=True)
    rows.append((f"clone {clone_gib:g} GiB vfolder", "plain read/write copy", t_copy, "reflink clone", t_clone))
    await vol.delete_vfolder(dst)
    await asyncio.to_thread(subprocess.run, ["rm", "-rf", str(plain)], check=True)
    await vol.delete_vfolder(src)

    # -- 2. scope usage at many files -----------------------------------------------------------------
    await vol.quota.create("many", None)
    vf = VFolderID("many", uuid.uuid4())
    await vol.create_vfolder(vf)
    print(f"creating {nfiles} files ...", flush=True)
    t_make = timed(lambda: many_files(vol.vfolder_path(vf), nfiles))
    print(f"  ({t_make:.1f} s)", flush=True)
    os.sync()
    scope = vol.scope_path("many")
    walks = [timed(lambda: tree_usage(scope)) for _ in range(repeat)]
    answers = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        await vol.quota.describe("many")
        answers.append(time.perf_counter() - t0)
    rows.append((f"scope usage, {nfiles} files", "walk (warm cache)", statistics.median(walks),
                 "qgroup (btrfs qgroup show --sync)", statistics.median(answers)))
    await vol.btrfs("quota", "rescan", "-w", str(root), timeout=600)
    used = (await vol.quota.describe("many")).used_bytes
    walk = tree_usage(scope)
    print(f"after rescan: qgroup referenced {used} bytes, walk {walk.allocated_bytes} bytes allocated (du): "
          "files under 2 KiB are inline in metadata, which the qgroup counts by tree block and du as "
          "one 4 KiB block per file (tests/test_backend_btrfs.py checks the exact match for extent files)",
          flush=True)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clone-gib", type=float, default=2.0)
    p.add_argument("--files", type=int, default=100_000)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--dir", default=None, help="where the sparse image goes (default: the temp dir)")
    args = p.parse_args()
    if reason := why_no_loop("btrfs"):
        print(f"btrfs_bench: cannot run: {reason}", file=sys.stderr)
        return 2
    image_gib = int(args.clone_gib * 2 + 3)
    with tempfile.TemporaryDirectory(prefix="btrfs-bench-", dir=args.dir) as tmp, \
            loop_mount(Path(tmp), "btrfs", f"{image_gib}G") as mnt:
        root = volume_root(mnt)
        rows = asyncio.run(bench(root, args.clone_gib, args.files, args.repeat))
    print()
    print(f"{'measure':<30} {'baseline':<24} {'time':>10}  {'btrfs backend':<34} {'time':>10}  {'speed-up':>9}")
    print("-" * 124)
    for name, base, t_base, ours, t_ours in rows:
        print(f"{name:<30} {base:<24} {t_base * 1000:>8.1f}ms  {ours:<34} {t_ours * 1000:>8.1f}ms  "
              f"{t_base / t_ours:>8.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
