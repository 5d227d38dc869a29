"""Layout-2 -> 3 migration of N folders: `storage-agent migrate` against a plain `mv` loop, and a killed run.

Three identical old-layout volumes of N folders (default 10,000, one small file
each) are made in a temporary directory:
  1. a shell loop of `mkdir -p` + `mv` per folder (the baseline, no journal, no resume);
  2. `storage-agent migrate --mapping` (CSV), a full run;
  3. the same, SIGKILLed part-way, then run again to completion.
For 3 the script checks that the first run really died of SIGKILL before the
end (status -9, folders left, no version.txt), that every folder ends at its
new place with its original inode (renamed, never copied), that none is left in
the old layout, and that the two runs together renamed each folder exactly once.

    .venv/bin/python bench/migrate_bench.py [--folders 10000] [--kill-at 0.4]
"""

from __future__ import annotations

import argparse
import json
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support import make_agent, to_toml  # noqa: E402

SCOPES = ["qs-a", "qs-b", "qs-c", "qs-d"]


def make_volume(root: Path, ids: list[str]) -> dict[str, int]:
    """Old-layout folders; returns folder id -> inode of its directory."""
    inodes = {}
    for i, fid in enumerate(ids):
        folder = root / fid[0:2] / fid[2:4] / fid[4:]
        folder.mkdir(parents=True)
        (folder / "f").write_bytes(b"x" * (i % 512))
        inodes[fid] = folder.stat().st_ino
    return inodes


def mv_loop(root: Path, mapping: dict[str, str]) -> float:
    lines = ["set -e", f"cd {root}"]
    for fid, q in mapping.items():
        a, b, rest = fid[0:2], fid[2:4], fid[4:]
        lines.append(f"mkdir -p {q}/{a}/{b} && mv {a}/{b}/{rest} {q}/{a}/{b}/{rest}")
    script = root.parent / "mv.sh"
    script.write_text("\n".join(lines) + "\n")
    start = time.perf_counter()
    subprocess.run(["bash", str(script)], check=True)
    return time.perf_counter() - start


def migrate_cmd(config: Path, csv_path: Path) -> list[str]:
    return [sys.executable, "-m", "agent", "migrate", "-f", str(config), "--volume", "local",
            "--mapping", str(csv_path), "--json"]


def done_rows(db: Path) -> int:
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            return conn.execute("SELECT count(*) FROM layout_moves WHERE state = 'done'").fetchone()[0]
        finally:
            conn.close()
    except sqlite3.OperationalError:
        return 0


def setup_agent(base: Path, name: str, ids: list[str], mapping: dict[str, str]) -> tuple[Path, Path, dict[str, int]]:
    workdir = base / name
    root = workdir / "volume"
    agent = make_agent(workdir, volumes={"local": {"backend": "vfs", "path": str(root)}})
    agent.config_path.write_text(to_toml(agent.config))
    inodes = make_volume(root, ids)
    csv_path = workdir / "map.csv"
    csv_path.write_text("".join(f"{f},{q}\n" for f, q in mapping.items()))
    return agent.config_path, csv_path, inodes


def check(root: Path, mapping: dict[str, str], inodes: dict[str, int]) -> None:
    for fid, q in mapping.items():
        new = root / q / fid[0:2] / fid[2:4] / fid[4:]
        assert new.stat().st_ino == inodes[fid], f"{fid} was not renamed in place"
        assert not (root / fid[0:2] / fid[2:4] / fid[4:]).exists(), f"{fid} left in the old layout"
    assert (root / "version.txt").read_text() == "3\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folders", type=int, default=10_000)
    parser.add_argument("--kill-at", type=float, default=0.4, help="fraction of folders moved before SIGKILL")
    args = parser.parse_args()
    n = args.folders
    ids = [uuid.uuid4().hex for _ in range(n)]
    mapping = {fid: SCOPES[i % len(SCOPES)] for i, fid in enumerate(ids)}

    with tempfile.TemporaryDirectory(prefix="sa-migrate-bench-") as tmp:
        base = Path(tmp)
        # 1. baseline
        mv_root = base / "mv" / "volume"
        make_volume(mv_root, ids)
        t_mv = mv_loop(mv_root, mapping)

        # 2. a full migration
        config, csv_path, inodes = setup_agent(base, "full", ids, mapping)
        start = time.perf_counter()
        full = subprocess.run(migrate_cmd(config, csv_path), cwd=ROOT, capture_output=True, text=True)
        t_full = time.perf_counter() - start
        assert full.returncode == 0, full.stdout + full.stderr
        check(config.parent / "volume", mapping, inodes)

        # 3. killed part-way, then resumed
        config, csv_path, inodes = setup_agent(base, "killed", ids, mapping)
        db = config.parent / "catalog.db"
        start = time.perf_counter()
        proc = subprocess.Popen(migrate_cmd(config, csv_path), cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        while proc.poll() is None and done_rows(db) < n * args.kill_at:
            time.sleep(0.005)
        time.sleep(0.02)  # land inside a batch: some renames done, not yet recorded
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        t_killed = time.perf_counter() - start
        root = config.parent / "volume"
        on_new = sum((root / q / f[0:2] / f[2:4] / f[4:]).exists() for f, q in mapping.items())
        recorded = done_rows(db)
        # Really killed, and mid-run: by SIGKILL (not a finished or failed run), folders left to move, no version.txt.
        assert proc.returncode == -signal.SIGKILL, f"the killed run ended with status {proc.returncode}, not SIGKILL"
        assert 0 < on_new < n and not (root / "version.txt").exists(), f"not killed mid-run ({on_new}/{n} moved)"
        start = time.perf_counter()
        resumed = subprocess.run(migrate_cmd(config, csv_path), cwd=ROOT, capture_output=True, text=True)
        t_resumed = time.perf_counter() - start
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
        report = json.loads(resumed.stdout)
        check(root, mapping, inodes)
        # The resumed run renamed exactly the folders the killed run had not; none twice, none lost.
        assert report["moved"] == n - on_new and not report["failed"] and not report["conflicts"]
        assert done_rows(db) == n

    rows = [
        ("mv loop (mkdir -p + mv per folder)", t_mv, n),
        ("storage-agent migrate (full run)", t_full, n),
        (f"  killed run ({signal.Signals(-proc.returncode).name} after {on_new} moved, "
         f"{on_new - recorded} unjournaled)", t_killed, on_new),
        (f"  resumed run ({report['moved']} moved, {report['recovered']} confirmed)", t_resumed, report["moved"]),
        ("  killed + resumed", t_killed + t_resumed, n),
    ]
    print(f"\nlayout-2 -> 3 migration of {n} folders (renames only; same folders in every run)\n")
    print(f"{'run':<58} {'seconds':>8} {'folders/s':>10} {'vs mv loop':>11}")
    for name, secs, count in rows:
        print(f"{name:<58} {secs:>8.2f} {count / secs:>10.0f} {secs / t_mv:>10.2f}x")
    print(f"\nkilled + resumed: every one of the {n} folders moved exactly once (same inode at its new place, "
          "none left in the old layout, journal shows each done once)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
