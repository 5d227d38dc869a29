"""Benchmark backends.walk.tree_usage against GNU du, warm and cold cache, and check exact agreement.

Builds trees of N files in two shapes -- "flat" (1000 files per directory, all directories under the
root) and "bushy" (10 files per directory, directories nested as a 10-ary tree) -- then times
``du -sb``, ``du -s -B1`` and ``tree_usage``.  Warm numbers are the median of --repeat runs; cold runs
drop the page/dentry/inode caches before every measurement (needs root) and report the median of
--cold-repeat runs.  du times include spawning the process (~1 ms); tree_usage is timed in-process.
Exits 1 if any result disagrees with du.

    .venv/bin/python bench/usage_walk_bench.py [--sizes 10000,100000] [--dir /tmp/x] [--keep]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backends import walk  # noqa: E402

SHAPES = {"flat": 1000, "bushy": 10}  # files per directory


def build_tree(root: Path, nfiles: int, per_dir: int) -> int:
    """Create ``nfiles`` files of varied small sizes, ``per_dir`` per directory; return directory count."""
    ndirs = -(-nfiles // per_dir)
    dirs: list[Path] = []
    for i in range(ndirs):
        if per_dir >= 100:
            parent = root
        else:  # 10-ary tree: directory i lives inside directory (i - 1) // 10
            parent = root if i == 0 else dirs[(i - 1) // 10]
        d = parent / f"d{i}"
        d.mkdir()
        dirs.append(d)
    payload = b"x" * 4096
    for i in range(nfiles):
        size = (i * 7919) % 3000
        (dirs[i // per_dir] / f"f{i}").write_bytes(payload[:size])
    return ndirs


def du_bytes(args: list[str], root: Path) -> int:
    out = subprocess.run(["du", *args, str(root)], check=True, capture_output=True, text=True).stdout
    return int(out.split()[0])


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    t0 = time.perf_counter()
    result = fn()
    return time.perf_counter() - t0, result


def drop_caches() -> bool:
    """Drop page, dentry and inode caches; False when not permitted (not root / read-only /proc)."""
    if os.geteuid() != 0:
        return False
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        return False
    return True


def measure(root: Path, runs: int, threads: int, cold: bool) -> tuple[float, float, float, int, int, walk.TreeUsage]:
    """Median times over ``runs`` and the last answers: (t du -sb, t du -s -B1, t tree_usage, sb, b1, usage)."""
    t_sb: list[float] = []
    t_b1: list[float] = []
    t_tu: list[float] = []
    sb = b1 = 0
    usage = None
    for _ in range(runs):
        if cold:
            drop_caches()
        t, sb = timed(lambda: du_bytes(["-sb"], root))
        t_sb.append(t)
        if cold:
            drop_caches()
        t, b1 = timed(lambda: du_bytes(["-s", "-B1"], root))
        t_b1.append(t)
        if cold:
            drop_caches()
        t, usage = timed(lambda: walk.tree_usage(root, threads=threads))
        t_tu.append(t)
    assert isinstance(usage, walk.TreeUsage) and isinstance(sb, int) and isinstance(b1, int)
    med = statistics.median
    return med(t_sb), med(t_b1), med(t_tu), sb, b1, usage


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10000,100000", help="comma-separated file counts")
    ap.add_argument("--dir", help="base directory for the trees (default: a new temp dir under /tmp)")
    ap.add_argument("--repeat", type=int, default=5, help="warm runs per measurement (median is printed)")
    ap.add_argument("--threads", type=int, default=0, help="tree_usage threads (0 = default policy)")
    ap.add_argument("--cold-repeat", type=int, default=3, help="cold runs per measurement (median is printed)")
    ap.add_argument("--no-cold", action="store_true", help="skip the cold-cache rows")
    ap.add_argument("--keep", action="store_true", help="keep the generated trees")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s]

    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="usage-walk-bench-", dir="/tmp"))
    base.mkdir(parents=True, exist_ok=True)
    cold_ok = not args.no_cold and drop_caches()
    print(
        f"implementation={walk.IMPLEMENTATION} threads={args.threads or min(4, os.cpu_count() or 1)} "
        f"cpus={os.cpu_count()} base={base}"
    )
    if not args.no_cold and not cold_ok:
        print("cold: skipped (not root)")

    header = (
        f"{'files':>7} {'shape':>6} {'dirs':>6} {'cache':>5} {'du -sb':>8} {'du -B1':>8} {'tree_usage':>10} "
        f"{'ratio':>6}  check"
    )
    print(header)
    print("-" * len(header))
    failed = False
    runs = {"warm": args.repeat, "cold": args.cold_repeat}
    try:
        for nfiles in sizes:
            for shape, per_dir in SHAPES.items():
                root = base / f"{shape}-{nfiles}"
                if root.exists():
                    shutil.rmtree(root)
                root.mkdir()
                ndirs = build_tree(root, nfiles, per_dir)
                modes = ["warm", "cold"] if cold_ok else ["warm"]
                for mode in modes:
                    t_sb, t_b1, t_tu, sb, b1, u = measure(root, runs[mode], args.threads, mode == "cold")
                    ok = (
                        sb == u.size_bytes + os.lstat(root).st_size
                        and b1 == u.allocated_bytes
                        and u.entries == nfiles + ndirs
                        and u.errors == 0
                    )
                    failed |= not ok
                    verdict = "MATCH" if ok else f"MISMATCH du-sb={sb} du-B1={b1} {u}"
                    ratio = t_tu / min(t_sb, t_b1)
                    print(
                        f"{nfiles:>7} {shape:>6} {ndirs:>6} {mode:>5} {t_sb:>8.4f} {t_b1:>8.4f} {t_tu:>10.4f} "
                        f"{ratio:>6.2f}  {verdict}",
                        flush=True,
                    )
                if not args.keep:
                    shutil.rmtree(root)
    finally:
        if not args.keep and not args.dir:
            shutil.rmtree(base, ignore_errors=True)
    print("ratio = tree_usage time / faster du time (lower is better; < 1 means faster than du)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
