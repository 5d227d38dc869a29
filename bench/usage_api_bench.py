"""GET /folder/usage and /folder/used-bytes on a real agent, next to `du -sb` / `du -s -B1` on the same tree.

    .venv/bin/python bench/usage_api_bench.py [--sizes 10000,100000] [--repeat 5]

Builds one vfolder per size (1000 files per directory) through the manager
API, then times each answer (median of --repeat calls over one keep-alive
connection) and each `du` on the same tree in the same run, prints the ratio,
and checks that the answers agree exactly with `du` (and `file_count` with `find`; exit 1 otherwise).
It first waits until the agent's figure has settled (not stale, two equal answers).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support import make_agent  # noqa: E402


def populate(root: Path, files: int, per_dir: int = 1000) -> None:
    for i in range(files):
        d = root / f"d{i // per_dir:05d}"
        if i % per_dir == 0:
            d.mkdir()
        with open(d / f"f{i:07d}", "wb") as f:
            f.write(b"x" * (i % 7919))


def settle(api, body: dict, deadline: float = 300.0) -> None:  # noqa: ANN001
    """Wait until the usage engine has taken in the whole new tree: not stale, and two answers alike."""
    last, end = None, time.monotonic() + deadline
    while time.monotonic() < end:
        r = api.request("GET", "/folder/usage", json=body).json()
        now = (r["used_bytes"], r["file_count"])
        if not r.get("stale") and r["used_bytes"] != -1 and now == last:
            return
        last = now
        time.sleep(0.5)
    raise SystemExit(f"usage of {body['vfid']} did not settle in {deadline:.0f} s")


def entries(path: Path) -> int:
    out = subprocess.run(["find", str(path), "-mindepth", "1"], check=True, capture_output=True).stdout
    return out.count(b"\n")


def timed(fn, repeat: int) -> tuple[float, object]:  # noqa: ANN001
    samples, result = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        result = fn()
        samples.append(time.perf_counter() - t)
    return statistics.median(samples), result


def du(flag: list[str], path: Path) -> int:
    out = subprocess.run(["du", *flag, str(path)], check=True, capture_output=True, text=True).stdout
    return int(out.split()[0])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    ok = True
    rows = []
    with tempfile.TemporaryDirectory(prefix="sa-bench-") as tmp:
        agent = make_agent(Path(tmp) / "agent").start()
        try:
            with agent.client() as api:
                api.post("/quota-scope", json={"volume": "local", "qsid": "bench"})
                for files in (int(s) for s in args.sizes.split(",")):
                    fid = uuid.uuid4().hex
                    vfid = f"bench/{fid}"
                    api.post("/folder/create", json={"volume": "local", "vfid": vfid})
                    path = agent.volume_root() / "bench" / fid[:2] / fid[2:4] / fid[4:]
                    populate(path, files)
                    body = {"volume": "local", "vfid": vfid}
                    settle(api, body)  # the watcher has taken in every file; warm caches for both sides
                    t_usage, usage = timed(
                        lambda b=body: api.request("GET", "/folder/usage", json=b).json(), args.repeat
                    )
                    t_used, used = timed(
                        lambda b=body: api.request("GET", "/folder/used-bytes", json=b).json(), args.repeat
                    )
                    t_dusb, dusb = timed(lambda p=path: du(["-sb"], p), args.repeat)
                    t_dub1, dub1 = timed(lambda p=path: du(["-s", "-B1"], p), args.repeat)
                    # du -sb counts the root directory's own st_size; /folder/usage counts what is below it
                    match_usage = usage["used_bytes"] + os.lstat(path).st_size == dusb
                    match_usage &= usage["file_count"] == entries(path)
                    match_used = used["used_bytes"] == dub1
                    ok &= match_usage and match_used
                    rows.append((files, t_usage, t_dusb, match_usage, t_used, t_dub1, match_used, usage["source"]))
        finally:
            agent.stop()
    print(f"{'files':>8} | {'usage ms':>9} {'du -sb ms':>9} {'ratio':>6} {'exact':>5} | "
          f"{'used-bytes ms':>13} {'du -s -B1 ms':>12} {'ratio':>6} {'exact':>5} | source")
    for files, tu, td, mu, tb, tb1, mb, source in rows:
        print(f"{files:>8} | {tu * 1e3:>9.2f} {td * 1e3:>9.2f} {tu / td:>6.2f} {'yes' if mu else 'NO':>5} | "
              f"{tb * 1e3:>13.2f} {tb1 * 1e3:>12.2f} {tb / tb1:>6.2f} {'yes' if mb else 'NO':>5} | {source}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
