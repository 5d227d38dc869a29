"""Benchmark of the live usage engine (issue 6, "Done when"): one run prints one table with ratios.

For each size and tree shape (``wide``: 1000 files per directory, ``deep``: 10 per directory), a vfolder
is filled on disk and a real agent is started over it. Measured in the same run:

* ``du -sb`` on the tree (the baseline: what a walking proxy pays per call), and the engine's full scan
  (the same scanner code, in this process) with warm caches, and cold when ``--cold`` drops the kernel's
  caches (global to the machine: off by default);
* ``GET /folder/usage`` median / p99 over one keep-alive connection, and the slowest answer (and any -1)
  with 8 concurrent callers, each on its own keep-alive connection: "8x worst" with each caller a process
  of its own, "8x 1proc" with the eight as coroutines of one process (on two cores, eight client
  processes beside the agent time the scheduler as much as the agent);
* freshness: time from a write to the answer that reflects it;
* the agent's RSS and the catalogue bytes per directory (``usage_dirs`` pages, via dbstat);
* watcher cost: agent CPU seconds while ``cp -r`` of the wide tree lands in a fresh vfolder, next to cp's own;
* restart: the agent is stopped and started again; the first ``GET /folder/usage`` of each tree right
  after the port opens (the last figure, served at once, flagged stale), then the time until every
  figure is fresh again (the start-up rescan, idle I/O class).

Run: ``.venv/bin/python bench/usage_bench.py [--sizes 10k,100k,1m] [--shapes wide,deep] [--cold]``.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import resource
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.engine.usage.policy import settle_window  # noqa: E402
from agent.engine.usage.scanner import scan  # noqa: E402
from backends import fstype  # noqa: E402
from tests.support import AUTH_HEADER, AgentProcess, make_agent  # noqa: E402

SIZES = {"10k": 10_000, "100k": 100_000, "1m": 1_000_000}
PER_DIR = {"wide": 1000, "deep": 10}


def vfolder_path(volume: Path, vfid: str) -> Path:
    qsid, h = vfid.split("/")
    return volume / qsid / h[:2] / h[2:4] / h[4:]


def build_tree(root: Path, files: int, per_dir: int) -> int:
    """``files`` small files, ``per_dir`` per directory, directories two levels deep; returns dirs made."""
    dirs = max(1, files // per_dir)
    fan = max(1, int(dirs**0.5))
    made = 0
    n = 0
    payload = os.urandom(4096)
    for d in range(dirs):
        sub = root / f"p{d // fan}" / f"d{d % fan}"
        sub.mkdir(parents=True, exist_ok=True)
        made += 1
        for i in range(per_dir):
            if n >= files:
                break
            fd = os.open(sub / f"f{i}", os.O_WRONLY | os.O_CREAT, 0o644)
            os.write(fd, payload[: (n * 37) % 4096])
            os.close(fd)
            n += 1
    return made


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def timed(fn, repeat: int = 3) -> float:  # noqa: ANN001 - any callable
    best = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best.append(time.perf_counter() - t)
    return statistics.median(best)


def du(path: Path) -> None:
    subprocess.run(["du", "-sb", str(path)], check=True, capture_output=True)


def engine_scan(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        scan(fd, "")
    finally:
        os.close(fd)


def usage(client: httpx.Client, vfid: str | None) -> dict:
    """GET /folder/usage; with vfid None, GET /status: the HTTP floor (auth, routing, JSON, no usage work)."""
    if vfid is None:
        client.get("/status")
        return {"used_bytes": 0}
    return client.request("GET", "/folder/usage", json={"volume": "local", "vfid": vfid}).json()


class LightClient:
    """A keep-alive connection through the standard library's http.client, for the timed calls.

    httpx costs about 0.5 ms of client CPU per call on this kind of machine, as much as the agent's own
    answer; with eight callers as processes on two cores that client work is what the timings would show.
    """

    def __init__(self, url: str, secret: str) -> None:
        host, _, port = url.partition("//")[2].partition(":")
        self.conn = http.client.HTTPConnection(host, int(port), timeout=60)
        self.headers = {AUTH_HEADER: secret, "Content-Type": "application/json"}

    def usage(self, vfid: str | None) -> dict:
        if vfid is None:
            self.conn.request("GET", "/status", headers=self.headers)
        else:
            body = json.dumps({"volume": "local", "vfid": vfid})
            self.conn.request("GET", "/folder/usage", body=body, headers=self.headers)
        r = self.conn.getresponse()
        data = r.read()
        if r.status != 200:
            raise RuntimeError(f"{r.status}: {data[:200]!r}")
        return json.loads(data) if vfid is not None else {"used_bytes": 0}

    def close(self) -> None:
        self.conn.close()


def latencies(agent: AgentProcess, vfid: str | None, calls: int) -> list[float]:
    out = []
    c = LightClient(agent.manager_url, agent.secret)
    try:
        c.usage(vfid)
        for _ in range(calls):
            t = time.perf_counter()
            c.usage(vfid)
            out.append(time.perf_counter() - t)
    finally:
        c.close()
    return sorted(out)


def _caller(url: str, secret: str, vfid: str | None, calls: int, start_at: float) -> tuple[float, int]:
    """One concurrent caller (a process of its own, so callers do not share a GIL)."""
    worst, unknown = 0.0, 0
    c = LightClient(url, secret)
    try:
        c.usage(vfid)
        time.sleep(max(0.0, start_at - time.time()))
        for _ in range(calls):
            t = time.perf_counter()
            body = c.usage(vfid)
            worst = max(worst, time.perf_counter() - t)
            unknown += body["used_bytes"] == -1
    finally:
        c.close()
    return worst, unknown


def concurrent(agent: AgentProcess, vfid: str | None, callers: int, calls: int) -> tuple[float, int]:
    start_at = time.time() + 1.0
    with ProcessPoolExecutor(callers) as pool:
        futures = [pool.submit(_caller, agent.manager_url, agent.secret, vfid, calls, start_at) for _ in range(callers)]
        results = [f.result() for f in futures]
    return max(w for w, _ in results), sum(u for _, u in results)


async def _async_callers(url: str, secret: str, vfid: str | None, callers: int, calls: int) -> tuple[float, int]:
    host, _, port = url.partition("//")[2].partition(":")
    if vfid is None:
        request = f"GET /status HTTP/1.1\r\nHost: {host}\r\n{AUTH_HEADER}: {secret}\r\n\r\n".encode()
    else:
        body = json.dumps({"volume": "local", "vfid": vfid}).encode()
        request = (
            f"GET /folder/usage HTTP/1.1\r\nHost: {host}\r\n{AUTH_HEADER}: {secret}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode() + body

    async def one() -> tuple[float, int]:
        reader, writer = await asyncio.open_connection(host, int(port))
        worst, unknown = 0.0, 0
        try:
            for i in range(calls + 1):
                t = time.perf_counter()
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                answer = await reader.readexactly(length)
                if i:  # the first call only opens the connection
                    worst = max(worst, time.perf_counter() - t)
                    unknown += vfid is not None and json.loads(answer)["used_bytes"] == -1
        finally:
            writer.close()
        return worst, unknown

    results = await asyncio.gather(*(one() for _ in range(callers)))
    return max(w for w, _ in results), sum(u for _, u in results)


def concurrent_async(agent: AgentProcess, vfid: str | None, callers: int, calls: int) -> tuple[float, int]:
    """The same callers as coroutines in one process on raw keep-alive connections: on two cores, eight
    client processes beside the agent measure the scheduler as much as the agent (see the floor line)."""
    return asyncio.run(_async_callers(agent.manager_url, agent.secret, vfid, callers, calls))


def freshness(agent: AgentProcess, path: Path, vfid: str, rounds: int) -> list[float]:
    out = []
    with agent.client() as c:
        for i in range(rounds):
            before = usage(c, vfid)["used_bytes"]
            t = time.perf_counter()
            (path / f"fresh-{i}").write_bytes(b"x" * (1000 + i))
            while usage(c, vfid)["used_bytes"] != before + 1000 + i:
                if time.perf_counter() - t > 30:
                    raise RuntimeError("the answer did not follow a write within 30 s")
                time.sleep(0.002)
            out.append(time.perf_counter() - t)
    return out


def wait_measured(agent: AgentProcess, vfids: list[str], timeout: float = 1800) -> float:
    t = time.perf_counter()
    with agent.client() as c:
        for vfid in vfids:
            while True:
                body = usage(c, vfid)
                if body["used_bytes"] != -1 and not body["stale"]:
                    break
                if time.perf_counter() - t > timeout:
                    raise RuntimeError(f"{vfid} not measured within {timeout} s")
                time.sleep(0.05)
    return time.perf_counter() - t


def restart_figures(agent: AgentProcess, cases: list[dict]) -> tuple[list[tuple[float, dict]], float]:
    """Stop and start the agent: each tree's first answer (time, body) and the time until all are fresh;
    the answers timed while the start-up rescan runs are printed too."""
    agent.stop()
    agent.start()
    first = []
    during: list[float] = []
    with agent.client() as c:
        for case in cases:
            t = time.perf_counter()
            body = usage(c, case["vfid"])
            first.append((time.perf_counter() - t, body))
        while len(during) < 2000:
            t = time.perf_counter()
            body = usage(c, cases[-1]["vfid"])
            if not body["stale"]:
                break
            during.append(time.perf_counter() - t)
    if during:
        during.sort()
        print(f"answers while the start-up rescan ran: {len(during)}, median {fmt_ms(statistics.median(during))}, "
              f"max {fmt_ms(during[-1])}", file=sys.stderr)
    return first, wait_measured(agent, [c["vfid"] for c in cases])


def restart_only(agent: AgentProcess, cases: list[dict]) -> int:
    agent.start()
    startup_scan = wait_measured(agent, [c["vfid"] for c in cases])
    first, settled = restart_figures(agent, cases)
    print(f"\nfirst start: every figure measured after {startup_scan:.2f} s")
    print(f"after a restart (first GET /folder/usage once the port opened; rescans done {settled:.2f} s later):")
    for c, (took, body) in zip(cases, first, strict=True):
        print(f"  {c['size'] + '/' + c['shape']:<12} {fmt_ms(took):>9}  stale: {str(body['stale']).lower()}, "
              f"file_count {body['file_count']}")
    return 0


def catalogue_bytes_per_dir(db: Path) -> float | None:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        pages = con.execute("SELECT SUM(pgsize) FROM dbstat WHERE name = 'usage_dirs'").fetchone()[0]
        rows = con.execute("SELECT COUNT(*) FROM usage_dirs").fetchone()[0]
    except sqlite3.OperationalError:
        return None
    finally:
        con.close()
    return pages / rows if rows else None


def fmt_ms(s: float) -> str:
    return f"{s * 1000:.2f} ms"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="10k,100k", help="comma list of 10k, 100k, 1m (default 10k,100k)")
    ap.add_argument("--shapes", default="wide,deep", help="comma list of wide (1000/dir), deep (10/dir)")
    ap.add_argument("--calls", type=int, default=2000, help="sequential calls for median/p99")
    ap.add_argument("--cold", action="store_true", help="also time cold-cache scans (drops the kernel caches)")
    ap.add_argument("--no-cp", action="store_true", help="skip the watcher-cost cp -r measurement")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--restart-only", action="store_true",
                    help="only the restart figures (e.g. --sizes 1m --shapes wide --restart-only)")
    args = ap.parse_args()
    sizes = [s.strip().lower() for s in args.sizes.split(",") if s.strip()]
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    work = args.workdir or Path(tempfile.mkdtemp(prefix="usage-bench-"))
    agent = make_agent(work / "agent", usage={"scan-concurrency": 1})
    volume = agent.volume_root()
    qsid = "bench"
    (volume / qsid).mkdir(exist_ok=True)
    cases = []
    try:
        for size in sizes:
            for shape in shapes:
                vfid = f"{qsid}/{uuid.uuid4().hex}"
                path = vfolder_path(volume, vfid)
                path.mkdir(parents=True)
                t = time.perf_counter()
                dirs = build_tree(path, SIZES[size], PER_DIR[shape])
                print(f"built {size}/{shape}: {dirs} dirs in {time.perf_counter() - t:.1f} s", file=sys.stderr)
                cases.append({"size": size, "shape": shape, "vfid": vfid, "path": path, "dirs": dirs})
        # the trees just built leave the kernel writing back millions of inodes for a while: let it finish
        # first, or that work competes for the 2 CPUs with whatever is measured next
        os.sync()
        # files written within the settle window of their filesystem may change allocation at writeback, so
        # a vfolder with very many of them answers ``pending`` until it passes (README, the live usage
        # engine): the start-up figure below times the scans, not that window
        window = settle_window(fstype.detect(volume).name)
        print(f"waiting {window:.0f} s: the allocation of the files just written settles", file=sys.stderr)
        time.sleep(window)
        if args.restart_only:
            return restart_only(agent, cases)
        for case in cases:
            case["du_warm"] = timed(lambda c=case: du(c["path"]))
            case["scan_warm"] = timed(lambda c=case: engine_scan(c["path"]))
            if args.cold:
                drop_caches()
                case["du_cold"] = timed(lambda c=case: du(c["path"]), repeat=1)
                drop_caches()
                case["scan_cold"] = timed(lambda c=case: engine_scan(c["path"]), repeat=1)
        agent.start()
        proc = psutil.Process(agent.proc.pid)
        startup_scan = wait_measured(agent, [c["vfid"] for c in cases])
        floor = latencies(agent, None, args.calls)
        floor_worst8, _ = concurrent(agent, None, 8, max(100, args.calls // 8))
        floor_worst8a, _ = concurrent_async(agent, None, 8, max(100, args.calls // 8))
        for case in cases:
            lat = latencies(agent, case["vfid"], args.calls)
            case["median"] = statistics.median(lat)
            case["p99"] = lat[int(len(lat) * 0.99) - 1]
            case["worst8"], case["unknown8"] = concurrent(agent, case["vfid"], 8, max(100, args.calls // 8))
            case["worst8a"], unknown = concurrent_async(agent, case["vfid"], 8, max(100, args.calls // 8))
            case["unknown8"] += unknown
            case["fresh"] = statistics.median(freshness(agent, case["path"], case["vfid"], 15))
        rss = proc.memory_info().rss
        per_dir = catalogue_bytes_per_dir(work / "agent" / "catalog.db")
        cp = None
        if not args.no_cp:
            src = next((c for c in cases if c["shape"] == "wide" and c["size"] == "100k"), cases[-1])
            with agent.client() as c:
                dst_vfid = f"{qsid}/{uuid.uuid4().hex}"
                assert c.post("/folder/create", json={"volume": "local", "vfid": dst_vfid}).status_code == 204
            dst = vfolder_path(volume, dst_vfid)
            wait_measured(agent, [dst_vfid])
            cpu0 = sum(proc.cpu_times()[:2])
            ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            t = time.perf_counter()
            subprocess.run(["cp", "-r", f"{src['path']}/.", str(dst)], check=True)
            cp_wall = time.perf_counter() - t
            ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            want = sum(1 for _ in dst.rglob("*"))
            with agent.client() as c:
                while usage(c, dst_vfid)["file_count"] != want:
                    time.sleep(0.05)
            settle = time.perf_counter() - t - cp_wall
            agent_cpu = sum(proc.cpu_times()[:2]) - cpu0
            cp_cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
            cp = (src, want, cp_wall, cp_cpu, agent_cpu, settle)
        restart = restart_figures(agent, cases)
        log = agent.log()
        watcher = "fanotify" if "watching with fanotify" in log else "inotify"
    finally:
        agent.stop()
        if args.restart_only:
            shutil.rmtree(work, ignore_errors=True)

    print(f"\nusage engine benchmark ({watcher}; {os.cpu_count()} CPUs; answers over loopback HTTP)\n")
    head = (
        f"{'tree':<12}{'dirs':>8}{'du -sb':>11}{'scan':>11}{'ratio':>7}"
        f"{'GET median':>12}{'p99':>10}{'du/median':>11}{'8x worst':>10}{'8x 1proc':>10}{'-1s':>5}{'fresh':>10}"
    )
    print(head)
    print("-" * len(head))
    for c in cases:
        print(
            f"{c['size'] + '/' + c['shape']:<12}{c['dirs']:>8}{fmt_ms(c['du_warm']):>11}{fmt_ms(c['scan_warm']):>11}"
            f"{c['scan_warm'] / c['du_warm']:>6.2f}x{fmt_ms(c['median']):>12}{fmt_ms(c['p99']):>10}"
            f"{c['du_warm'] / c['median']:>10.0f}x{fmt_ms(c['worst8']):>10}{fmt_ms(c['worst8a']):>10}{c['unknown8']:>5}"
            f"{fmt_ms(c['fresh']):>10}"
        )
    if args.cold:
        print("\ncold cache (kernel caches dropped before each):")
        for c in cases:
            print(
                f"  {c['size'] + '/' + c['shape']:<12} du -sb {fmt_ms(c['du_cold'])}  scan {fmt_ms(c['scan_cold'])}"
                f"  ratio {c['scan_cold'] / c['du_cold']:.2f}x"
            )
    total_dirs = sum(c["dirs"] for c in cases)
    print(
        f"\nHTTP floor (GET /status, same connection and callers): median {fmt_ms(statistics.median(floor))}, "
        f"p99 {fmt_ms(floor[int(len(floor) * 0.99) - 1])}, 8x worst {fmt_ms(floor_worst8)} "
        f"(8x 1proc {fmt_ms(floor_worst8a)}); "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    print(f"\nstart-up scans of all trees (agent start to every figure fresh): {startup_scan:.2f} s")
    print(f"agent RSS after scans: {rss / 2**20:.1f} MiB for {total_dirs} directories in {len(cases)} vfolders")
    if per_dir is not None:
        print(f"catalogue usage_dirs: {per_dir:.0f} bytes per directory")
    if cp is not None:
        src, want, cp_wall, cp_cpu, agent_cpu, settle = cp
        print(
            f"watcher cost: cp -r of {src['size']}/{src['shape']} ({want} entries) took {cp_wall:.2f} s wall, "
            f"{cp_cpu:.2f} s CPU; the agent spent {agent_cpu:.2f} s CPU ({agent_cpu / max(cp_cpu, 1e-9):.2f}x cp), "
            f"figure right {settle:.2f} s after cp ended"
        )
    first, settled = restart
    print(f"\nafter a restart (first GET /folder/usage once the port opened; rescans done {settled:.2f} s later):")
    for c, (took, body) in zip(cases, first, strict=True):
        print(f"  {c['size'] + '/' + c['shape']:<12} {fmt_ms(took):>9}  stale: {str(body['stale']).lower()}, "
              f"file_count {body['file_count']}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
