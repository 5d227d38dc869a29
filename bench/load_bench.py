"""Load test: many concurrent keep-alive connections against a real agent, with a mixed workload, on loopback.

    .venv/bin/python bench/load_bench.py [--seconds 60] [--connections 200] [--think-ms 0] [--cpu-pin auto]
    .venv/bin/python bench/load_bench.py --think-ms 2000,1000,500,250     # usage latency against offered load
    .venv/bin/python bench/load_bench.py --num-proc 1,2 --think-ms 0,1000  # one process vs engine + 2 workers
    .venv/bin/python bench/load_bench.py --generator python               # the Python generator alone (old runs)

Starts an agent (temporary directory, vfs volume), prepares a few quota scopes and vfolders with some
files, then loads it for SECONDS with CONNECTIONS keep-alive connections mixing, by weight of operations:

    GET /folder/usage, GET /folder/used-bytes     most of the traffic
    POST /folder/file/list                        a directory of a vfolder
    mkdir / rename / delete                       of a directory of the task's own
    1 MiB tus upload                              POST /folder/file/upload, then PATCH /upload (client API)
    1 MiB download                                POST /folder/file/download, then GET /download (client API)

Two generators (``--generator``):

* ``wrk`` (the default; Debian package ``wrk``, installed by ``packaging/dev-deps.sh --test``): one wrk
  process per route of the first three lines (one thread each, the connections split by the mix's weights,
  every request body prepared once in Lua, a random vfolder per request), and beside them the Python
  generator below with --side-connections connections for the file operations and transfers, at a fixed low
  rate (--side-think-ms, whatever --think-ms says). wrk costs about 0.03-0.06 ms of CPU per request against
  0.55-0.65 ms for aiohttp's client, so on 2 cores the agent gets the CPU it can use and the ratios say
  something about the agent. wrk's Lua checks every answer (status 200 and a key a good answer holds: an
  error otherwise, with samples printed); its latencies count from the first request (no warm-up left out:
  wrk opens its connections at once, cheaply).
* ``python``: this file with ``--worker`` in a second process, one asyncio loop, aiohttp, a session per
  connection, sending the whole mix (the generator of the runs before wrk; keep it for comparisons).

Bounded in time (no new operation starts after SECONDS; each request has a timeout; a generator is killed
if it overstays) and in count (CONNECTIONS connections, at most --max-requests requests, shared out by
connections). The agent's RSS is sampled with psutil every 0.5 s. Prints requests/s, count, p50/p99/max
latency and errors per route, the RSS at 10 s and at the end, and the targets beside them: zero errors,
usage p99 < 10 ms, no RSS growth after the first 10 s (the trend of the samples within 0.1 MiB/min). An
error is any answer whose status is not the expected 2xx (or whose body lacks what a good one holds), any
exception (timeout, reset), or a download whose bytes differ. Exit status 1 when there were errors.

CPU per request, in every table: the agent's (psutil: user + system of all its processes, the commands they
ran included, per answered request; under num-proc split into workers and engine) and each generator's
(the kernel's rusage of the process, per request it sent), and the cores the generators and this driver
took from the machine (``gen cores``).

Beside the load, a manager-like poller in this process (one kept-alive http.client connection, not one of
the CONNECTIONS) asks ``GET /folder/usage`` every --probe-ms: the answer time a manager polling usage gets
while the load runs. Its row has the same target.

With no think time every connection sends its next request as soon as the last one is answered (a closed
loop), so the server is saturated and latency includes queueing (Little's law: in-flight / throughput).
The think time therefore sets the offered load; a comma list of think times runs each in turn against the
same agent and ends with one table: usage p50/p99 (and the poller's p99) against requests per second.

``--num-proc 1,2`` runs the whole list once per ``[storage-proxy] num-proc`` (a fresh agent each) and ends
with the rows side by side, the issue's two ratios (saturation throughput of 2 workers over 1 process, target
>= 1.6; usage p99 at the same offered load, target <= 1/3) and, for each num-proc >= 2 row, the target on
paper for a node of 8 cores (num-proc 6) at 2,000 requests/s of the mix, from the workers' CPU per request
measured (:func:`paper_target`: an M/M/1 queue per worker, target usage p99 < 10 ms).

What the rows mean on a 2-core machine (``--think-ms 1000,250,100,60,0``, wrk generator, 30 s per row, two
runs with nothing else on the machine, 2026-12-03; the README has the table):

* the generators take 0.06-0.28 cores (wrk 0.01-0.10 ms per request; the Python side ~0.9 ms per request of
  file operations and 1 MiB transfers), so ~1.7-1.9 cores are left to the agent;
* saturation: one process 3,788-4,846 req/s on its one loop (1.00 core), engine + 2 workers 9,840-10,126
  req/s (1.71 cores): 2.09-2.60x, target 1.6x met;
* usage p99 at a fixed offered load: two workers 1.1-3.1 ms at every load up to ~3,300 req/s; one process
  2.4-4.3 ms up to ~830 req/s, 4.2-11.0 ms at ~2,000 and 8.8-21.4 ms at ~3,100. The 1/3 ratio holds where
  one process queues (0.14-0.29 at ~3,100 req/s; 0.18 and 0.49 at ~2,000) and not below (0.38-0.54), where
  neither layout queues (0.51 with no file operations or transfers at all: 1.0 against 2.0 ms);
* on paper for 8 cores: workers 0.29-0.61 ms of CPU per request of the wrk mix, busy 10-20% each at 2,000
  req/s, usage p99 ~ 1.5-3.5 ms; with the whole mix of the Python generator (the transfers' bytes included)
  see the README. Runs with other engineers' tests on the machine (load average 4-10) measured 4-5x the
  CPU per request and p99 of up to 1.5 s in both layouts: a ready agent waiting for a CPU others held.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

RSS_TREND_NOISE = 0.1  # MiB/min: below this the RSS trend counts as flat
MiB = 1 << 20
AUTH_HEADER = "X-BackendAI-Storage-Auth-Token"
TUS = {"Tus-Resumable": "1.0.0", "Content-Type": "application/offset+octet-stream"}
USAGE_ROUTES = ("GET /folder/usage", "GET /folder/used-bytes")
ROUTES = (
    "GET /folder/usage",
    "GET /folder/used-bytes",
    "POST /folder/file/list",
    "POST /folder/file/mkdir",
    "POST /folder/file/rename",
    "POST /folder/file/delete",
    "POST /folder/file/upload",
    "PATCH /upload",
    "POST /folder/file/download",
    "GET /download",
)
# operation -> weight (operations, not requests: dirops is 3 requests, upload and download 2 each)
MIX = {"usage": 40, "used-bytes": 30, "list": 12, "dirops": 8, "upload": 5, "download": 5}
SAMPLE_INTERVAL = 0.5
WARMUP = 10.0
ERROR_SAMPLES = 30
SLOWEST = 5


# --------------------------------------------------------------------------------------------- worker


def payload_bytes() -> bytes:
    """The 1 MiB both sides agree on: the files prepared for download, and what each upload sends."""
    return random.Random(1234).randbytes(MiB)


class Stats:
    def __init__(self, t0: float, warmup: float = 0.0) -> None:
        self.t0 = t0
        self.warmup = warmup  # requests started this early (200 connections opening at once) are not timed
        self.latency: dict[str, list[float]] = {r: [] for r in ROUTES}
        self.warm: dict[str, int] = dict.fromkeys(ROUTES, 0)
        self.errors: dict[str, int] = dict.fromkeys(ROUTES, 0)
        self.samples: list[dict[str, Any]] = []
        self.slowest: dict[str, list[tuple[float, float]]] = {r: [] for r in ROUTES}
        self.requests = 0
        self.connections_opened = 0

    def ok(self, route: str, seconds: float, start: float) -> None:
        self.requests += 1
        if start - self.t0 < self.warmup:
            self.warm[route] += 1
        else:
            self.latency[route].append(seconds)
        slow = self.slowest[route]
        if len(slow) < SLOWEST or seconds > slow[-1][0]:
            slow.append((seconds, start - self.t0))
            slow.sort(reverse=True)
            del slow[SLOWEST:]

    def error(self, route: str, seconds: float, start: float, status: int | None, msg: str) -> None:
        self.ok(route, seconds, start)
        self.bad(route, start, status, msg)

    def bad(self, route: str, start: float, status: int | None, msg: str) -> None:
        """An error on a request already counted (e.g. a 200 whose body is wrong)."""
        self.errors[route] += 1
        if len(self.samples) < ERROR_SAMPLES:
            self.samples.append({"route": route, "status": status, "msg": msg[:400], "at_s": round(start - self.t0, 3)})


class Task:
    """One simulated client: its own session, so its own keep-alive connection to each listener."""

    def __init__(self, n: int, cfg: dict[str, Any], stats: Stats, session: Any, blob: bytes) -> None:
        self.n = n
        self.cfg = cfg
        self.stats = stats
        self.session = session
        self.blob = blob
        self.rng = random.Random(n)
        self.vfids: list[str] = cfg["vfids"]
        self.my_vfid = self.vfids[n % len(self.vfids)]
        self.seq = 0

    async def call(
        self,
        route: str,
        method: str,
        url: str,
        *,
        expect: tuple[int, ...] = (200, 204),
        read_all: bool = False,
        **kwargs: Any,
    ) -> tuple[bool, Any]:
        """One request; True and the JSON (or the bytes with read_all) if it answered as expected."""
        start = time.monotonic()
        try:
            async with self.session.request(method, url, **kwargs) as r:
                body = await r.read()
                elapsed = time.monotonic() - start
                if r.status not in expect:
                    msg = body.decode(errors="replace")
                    try:
                        msg = json.loads(msg).get("msg", msg)
                    except (ValueError, AttributeError):
                        pass
                    self.stats.error(route, elapsed, start, r.status, msg)
                    return False, None
                self.stats.ok(route, elapsed, start)
                if read_all:
                    return True, body
                return True, (json.loads(body) if body else None)
        except Exception as e:  # noqa: BLE001 - every exception is an error to report
            self.stats.error(route, time.monotonic() - start, start, None, f"{type(e).__name__}: {e}")
            return False, None

    def mgr(self, path: str) -> str:
        return self.cfg["manager_url"] + path

    def body(self, vfid: str | None = None, **extra: Any) -> dict[str, Any]:
        return {"volume": "local", "vfid": vfid or self.rng.choice(self.vfids), **extra}

    async def op_usage(self) -> None:
        await self.call(USAGE_ROUTES[0], "GET", self.mgr("/folder/usage"), json=self.body())

    async def op_used_bytes(self) -> None:
        await self.call(USAGE_ROUTES[1], "GET", self.mgr("/folder/used-bytes"), json=self.body())

    async def op_list(self) -> None:
        relpath = self.rng.choice(self.cfg["list_dirs"])
        start = time.monotonic()
        ok, ans = await self.call(
            "POST /folder/file/list", "POST", self.mgr("/folder/file/list"), json=self.body(relpath=relpath)
        )
        if ok and not (isinstance(ans, dict) and isinstance(ans.get("items"), list) and ans["items"]):
            self.stats.bad("POST /folder/file/list", start, 200, f"bad answer {ans!r}")

    async def op_dirops(self) -> None:
        self.seq += 1
        name = f"t{self.n}-{self.seq}"
        vf = self.my_vfid
        ok, _ = await self.call(
            "POST /folder/file/mkdir",
            "POST",
            self.mgr("/folder/file/mkdir"),
            json=self.body(vf, relpath=f"work/m-{name}", parents=True),
        )
        if not ok:
            return
        ok, _ = await self.call(
            "POST /folder/file/rename",
            "POST",
            self.mgr("/folder/file/rename"),
            json=self.body(vf, relpath=f"work/m-{name}", new_name=f"r-{name}", is_dir=True),
        )
        target = f"work/r-{name}" if ok else f"work/m-{name}"
        await self.call(
            "POST /folder/file/delete",
            "POST",
            self.mgr("/folder/file/delete"),
            json=self.body(vf, relpaths=[target], recursive=True),
        )

    async def op_upload(self) -> None:
        # each task overwrites its own file, so the disk use stays bounded
        ok, ans = await self.call(
            "POST /folder/file/upload",
            "POST",
            self.mgr("/folder/file/upload"),
            json=self.body(self.my_vfid, relpath=f"uploads/t{self.n}.bin", size=MiB),
        )
        if not ok:
            return
        await self.call(
            "PATCH /upload",
            "PATCH",
            self.cfg["client_url"] + "/upload",
            params={"token": ans["token"]},
            data=self.blob,
            headers={**TUS, "Upload-Offset": "0"},
            expect=(204,),
        )

    async def op_download(self) -> None:
        start = time.monotonic()
        ok, ans = await self.call(
            "POST /folder/file/download",
            "POST",
            self.mgr("/folder/file/download"),
            json=self.body(relpath="blob.bin"),
        )
        if not ok:
            return
        ok, data = await self.call(
            "GET /download",
            "GET",
            self.cfg["client_url"] + "/download",
            params={"token": ans["token"]},
            expect=(200,),
            read_all=True,
        )
        if ok and data != self.blob:
            self.stats.bad("GET /download", start, 200, f"body differs ({len(data)} bytes)")

    async def run(self, deadline: float, think: float, max_requests: int) -> None:
        ops = {
            "usage": self.op_usage,
            "used-bytes": self.op_used_bytes,
            "list": self.op_list,
            "dirops": self.op_dirops,
            "upload": self.op_upload,
            "download": self.op_download,
        }
        mix = self.cfg.get("mix") or MIX
        names, weights = list(mix), list(mix.values())
        # spread the first requests over a few ms so the tasks do not start in lock-step
        await asyncio.sleep(self.rng.random() * 0.05)
        while time.monotonic() < deadline and self.stats.requests < max_requests:
            await ops[self.rng.choices(names, weights)[0]]()
            if think:
                await asyncio.sleep(think * (0.5 + self.rng.random()))


async def worker_main(cfg: dict[str, Any]) -> dict[str, Any]:
    import aiohttp

    blob = payload_bytes()
    trace = aiohttp.TraceConfig()
    t0 = time.monotonic()
    stats = Stats(t0, cfg["warmup"])

    async def on_conn(_s: Any, _c: Any, _p: Any) -> None:
        stats.connections_opened += 1

    trace.on_connection_create_end.append(on_conn)
    timeout = aiohttp.ClientTimeout(total=cfg["request_timeout"])
    sessions = [
        aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=2, limit_per_host=1, keepalive_timeout=60),
            headers={AUTH_HEADER: cfg["secret"]},
            timeout=timeout,
            trace_configs=[trace],
        )
        for _ in range(cfg["connections"])
    ]
    stats.t0 = t0 = time.monotonic()
    cpu0 = time.process_time()
    deadline = t0 + cfg["seconds"]
    try:
        tasks = [Task(i, cfg, stats, s, blob) for i, s in enumerate(sessions)]
        await asyncio.gather(*(t.run(deadline, cfg["think_ms"] / 1e3, cfg["max_requests"]) for t in tasks))
        elapsed = time.monotonic() - t0
    finally:
        await asyncio.gather(*(s.close() for s in sessions))
    routes = {}
    for route in ROUTES:
        lat = sorted(stats.latency[route])
        routes[route] = {
            "count": len(lat) + stats.warm[route],
            "errors": stats.errors[route],
            "p50": pct(lat, 50),
            "p99": pct(lat, 99),
            "max": lat[-1] if lat else None,
            "slowest": stats.slowest[route],
        }
    return {
        "t0": t0,
        "elapsed": elapsed,
        "warmup": cfg["warmup"],
        "requests": stats.requests,
        "connections_opened": stats.connections_opened,
        "cpu_s": time.process_time() - cpu0,
        "routes": routes,
        "error_samples": stats.samples,
    }


def pct(sorted_values: list[float], p: float) -> float | None:
    if not sorted_values:
        return None
    k = min(len(sorted_values) - 1, max(0, round(p / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[k]


def worker(cfg_path: str, out_path: str) -> int:
    cfg = json.loads(Path(cfg_path).read_text())
    result = asyncio.run(worker_main(cfg))
    Path(out_path).write_text(json.dumps(result))
    return 0


# --------------------------------------------------------------------------------------------- wrk

# the part of the mix wrk sends: route -> (method and path, weight, a string every good answer holds)
WRK_ROUTES = {
    "GET /folder/usage": ("/folder/usage", MIX["usage"], '"used_bytes"'),
    "GET /folder/used-bytes": ("/folder/used-bytes", MIX["used-bytes"], '"used_bytes"'),
    "POST /folder/file/list": ("/folder/file/list", MIX["list"], '"name"'),  # a name: the listing is not empty
}
# what the Python generator still sends beside wrk (operations of several requests, each checked)
SIDE_MIX = {"dirops": MIX["dirops"], "upload": MIX["upload"], "download": MIX["download"]}

WRK_LUA = r"""-- written by bench/load_bench.py: one route of the mixed load, for wrk 4 (LuaJIT), one thread
local method, path, expect = "%(method)s", "%(path)s", %(expect)s
local think_ms, max_requests, seed = %(think_ms)s, %(max_requests)d, %(seed)d
local bodies = { %(bodies)s }
local reqs = {}
count, bad, samples = 0, 0, {}

function init(args)
  math.randomseed(seed)
  for i, body in ipairs(bodies) do
    local headers = { [%(auth)s] = %(secret)s, ["Content-Type"] = "application/json" }
    reqs[i] = wrk.format(method, path, headers, body)
  end
end

function request()
  return reqs[math.random(#reqs)]
end
%(delay)s
function response(status, headers, body)
  count = count + 1
  if status ~= 200 or not string.find(body, expect, 1, true) then
    bad = bad + 1
    if #samples < 5 then samples[#samples + 1] = status .. " " .. string.sub(body, 1, 300) end
  end
  if count >= max_requests then wrk.thread:stop() end
end

local threads = {}
function setup(thread) threads[#threads + 1] = thread end

function done(summary, latency, requests)
  local nbad = 0
  for _, t in ipairs(threads) do
    nbad = nbad + t:get("bad")
    for _, s in ipairs(t:get("samples")) do io.write("SAMPLE\t", (string.gsub(s, "%%c", " ")), "\n") end
  end
  local e = summary.errors
  io.write(string.format("RESULT\t%%d %%d %%d %%d %%d %%d %%d %%d %%d %%d %%d\n", summary.requests, nbad, e.connect,
    e.read, e.write, e.timeout, e.status, latency:percentile(50), latency:percentile(99), latency.max,
    summary.duration))
end
"""
WRK_DELAY = """
function delay()  -- the think time: the pause of a connection between its answer and its next request
  return think_ms * (0.5 + math.random())
end
"""


def lua_str(s: str) -> str:
    return json.dumps(s)  # a JSON string of ASCII is a valid Lua string literal


def wrk_script(route: str, cfg: dict[str, Any], seed: int, max_requests: int) -> str:
    """The Lua of one route: every request prepared once (one per vfolder, or per vfolder and directory)."""
    path, _, expect = WRK_ROUTES[route]
    if route == "POST /folder/file/list":
        bodies = [{"volume": "local", "vfid": v, "relpath": d} for v in cfg["vfids"] for d in cfg["list_dirs"]]
    else:
        bodies = [{"volume": "local", "vfid": v} for v in cfg["vfids"]]
    think = cfg["think_ms"]
    return WRK_LUA % {
        "method": route.split()[0],
        "path": path,
        "expect": lua_str(expect),
        "think_ms": repr(float(think)),
        "max_requests": max_requests,
        "seed": seed,
        "bodies": ", ".join(lua_str(json.dumps(b)) for b in bodies),
        "auth": lua_str(AUTH_HEADER),
        "secret": lua_str(cfg["secret"]),
        "delay": WRK_DELAY if think else "",
    }


def wrk_split(connections: int) -> dict[str, int]:
    """The wrk connections per route, in proportion to the mix's weights (at least one each)."""
    total = sum(w for _, w, _ in WRK_ROUTES.values())
    split = {r: max(1, round(connections * w / total)) for r, (_, w, _) in WRK_ROUTES.items()}
    first = next(iter(split))
    split[first] += connections - sum(split.values())
    return split


def wrk_result(route: str, out: str) -> dict[str, Any]:
    """One wrk process's RESULT line (and SAMPLE lines) as a route row of the report."""
    line = next((x for x in out.splitlines() if x.startswith("RESULT\t")), None)
    if line is None:
        raise SystemExit(f"wrk ({route}) printed no result:\n{out[-2000:]}")
    n, bad, connect, read, write, timeout, status, p50, p99, mx, duration = map(int, line.split("\t")[1].split())
    # status (>= 400) is inside bad, which also counts a 200 whose body lacks what a good answer holds
    errors = bad + connect + read + write + timeout
    samples = [
        {"route": route, "status": None, "msg": x.split("\t", 1)[1][:400], "at_s": "?"}
        for x in out.splitlines() if x.startswith("SAMPLE\t")
    ]
    if connect or read or write or timeout:
        samples.append({"route": route, "status": None, "at_s": "?",
                        "msg": f"socket errors: connect {connect}, read {read}, write {write}, timeout {timeout}"})
    return {
        "count": n, "errors": errors, "p50": p50 / 1e6 if n else None, "p99": p99 / 1e6 if n else None,
        "max": mx / 1e6 if n else None, "slowest": [], "duration": duration / 1e6, "samples": samples,
    }


def wait_rusage(proc: subprocess.Popen[bytes], deadline: float) -> tuple[int, float]:
    """Reap a generator process; its exit status and the CPU seconds it used (user + system, its threads
    included: the kernel's own count, read once the process has ended)."""
    while True:
        pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return proc.returncode, ru.ru_utime + ru.ru_stime
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise SystemExit(f"a load generator ({proc.args[0]}) overstayed its time and was killed")
        time.sleep(0.1)


# --------------------------------------------------------------------------------------------- driver


class Sampler:
    """RSS (and the agent's established TCP connections) every SAMPLE_INTERVAL s in a thread."""

    def __init__(self, pid: int, ports: tuple[int, int]) -> None:
        import psutil

        self.proc = psutil.Process(pid)
        self.ports = ports
        self.rss: list[tuple[float, int]] = []
        self.conns: list[tuple[float, int, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        n = 0
        while not self._stop.is_set():
            now = time.monotonic()
            try:
                rss = self.proc.memory_info().rss
                for child in self.proc.children(recursive=True):
                    rss += child.memory_info().rss
                self.rss.append((now, rss))
                if n % 4 == 0:  # every 2 s: counting sockets is dearer than reading the RSS
                    est = established(self.proc, psutil)
                    self.conns.append((now, *(sum(c.laddr.port == p for c in est) for p in self.ports)))
            except psutil.NoSuchProcess:
                return
            n += 1
            self._stop.wait(SAMPLE_INTERVAL)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def established(proc: Any, psutil: Any) -> list[Any]:
    """The agent's established TCP connections: its own and its children's (num-proc's workers hold them)."""
    out = []
    for p in (proc, *proc.children()):
        try:
            out += [c for c in p.net_connections("tcp") if c.status == psutil.CONN_ESTABLISHED]
        except psutil.NoSuchProcess:
            continue
    return out


class Probe:
    """The manager's own poller beside the load: one kept-alive connection (http.client, in a thread of this
    process, not the load generator's) asking ``GET /folder/usage`` of the vfolders in turn every
    INTERVAL s. It tells what a caller that is not itself one of the 200 busy connections gets."""

    def __init__(self, manager_url: str, secret: str, vfids: list[str], interval: float) -> None:
        self.url, self.secret, self.vfids, self.interval = manager_url, secret, vfids, interval
        self.latencies: list[float] = []
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self, delay: float) -> None:
        self._delay = delay
        self._thread.start()

    def _run(self) -> None:
        import http.client

        if self._stop.wait(self._delay):
            return
        host, port = self.url.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        headers = {AUTH_HEADER: self.secret, "Content-Type": "application/json"}
        i = 0
        while not self._stop.is_set():
            body = json.dumps({"volume": "local", "vfid": self.vfids[i % len(self.vfids)]})
            t = time.perf_counter()
            try:
                conn.request("GET", "/folder/usage", body=body, headers=headers)
                r = conn.getresponse()
                ok = r.status == 200 and json.loads(r.read()).get("used_bytes", -1) >= 0
            except (OSError, http.client.HTTPException, ValueError):
                conn.close()
                ok = False
            if ok:
                self.latencies.append(time.perf_counter() - t)
            else:
                self.errors += 1
            i += 1
            self._stop.wait(self.interval)
        conn.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def prepare(agent: Any, scopes: int, per_scope: int) -> tuple[list[str], list[str]]:
    """Quota scopes and vfolders, each with small files in a few directories and one 1 MiB blob.bin."""
    from tests.client_helpers import vfolder_path

    blob = payload_bytes()
    vfids: list[str] = []
    with agent.client() as api:
        for s in range(scopes):
            qsid = f"load{s}"
            r = api.post("/quota-scope", json={"volume": "local", "qsid": qsid})
            assert r.status_code == 204, r.text
            for _ in range(per_scope):
                vfid = f"{qsid}/{uuid.uuid4().hex}"
                r = api.post("/folder/create", json={"volume": "local", "vfid": vfid})
                assert r.status_code == 204, r.text
                root = vfolder_path(agent, vfid)
                for d in range(4):
                    (root / f"data{d}").mkdir()
                    for f in range(50):
                        (root / f"data{d}" / f"f{f:03d}.txt").write_bytes(b"x" * (f * 97 + d))
                (root / "work").mkdir()
                (root / "uploads").mkdir()
                (root / "blob.bin").write_bytes(blob)
                vfids.append(vfid)
        # let the usage engine take in the new trees, so the load measures answers, not the first scan
        deadline = time.monotonic() + 60
        for vfid in vfids:
            while time.monotonic() < deadline:
                u = api.request("GET", "/folder/usage", json={"volume": "local", "vfid": vfid}).json()
                if not u.get("stale") and u.get("file_count") == 4 * 50 + 4 + 3:
                    break
                time.sleep(0.2)
    return vfids, [".", "data0", "data1", "data2", "data3"]


def memory_figures(agent: Any) -> dict[str, float]:
    """The agent's own memory gauges from /metrics: which part of a growing RSS is SQLite's or Python's."""
    import re

    with agent.client() as api:
        text = api.get("/metrics").text
    names = ("storage_agent_sqlite_memory_bytes", "storage_agent_python_allocated_blocks")
    return {n: float(m.group(1)) for n in names if (m := re.search(rf"^{n} (\S+)$", text, re.M))}


def sampler_cpu(pid: int) -> dict[str, float]:
    """User + system CPU seconds of the agent so far per role: ``main`` (the one process, or num-proc's
    supervisor), ``engine``, ``workers``; the commands it ran and reaped count for the process that ran them."""
    import psutil

    from agent.runtime.spawn import ENGINE, WORKER

    def cpu(p: psutil.Process) -> float:
        try:
            t = p.cpu_times()
        except psutil.NoSuchProcess:
            return 0.0
        return t.user + t.system + t.children_user + t.children_system

    proc = psutil.Process(pid)
    total = {"main": cpu(proc), "engine": 0.0, "workers": 0.0}
    for child in proc.children():
        try:
            cmd = child.cmdline()
            tree = [child, *child.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        role = "engine" if ENGINE in cmd else "workers" if WORKER in cmd else "main"
        total[role] += sum(cpu(p) for p in tree)
    return total


def rss_at(samples: list[tuple[float, int]], t: float) -> int | None:
    before = [rss for ts, rss in samples if ts <= t]
    return before[-1] if before else None


def fmt_ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1e3:.1f}"


def report(
    result: dict[str, Any], sampler: Sampler, probe: Probe, agent: Any, connections: int, seconds: float
) -> dict[str, Any]:
    """Print one run's tables; return its summary row (for the sweep table) with ``errors``."""
    routes = result["routes"]
    errors = sum(r["errors"] for r in routes.values())
    elapsed = result["elapsed"]
    t0 = result["t0"]
    answered = result["requests"] + len(probe.latencies) + probe.errors
    cpu = cpu_figures(result, answered, elapsed)
    if result["generator"] == "wrk":
        split = ", ".join(f"{n} {route.split()[1]}" for route, n in result["wrk_connections"].items())
        how = (f"wrk {sum(result['wrk_connections'].values())} ({split}) + Python {result['python_connections']} "
               f"(file operations and transfers, fixed think time)")
    else:
        how = f"Python {connections}, {result['connections_opened']} TCP connections opened"
    print(f"\nload: {connections} connections: {how}; {seconds:g} s asked, {elapsed:.1f} s run, "
          f"{result['requests']} requests")
    roles = ", ".join(f"{role} {ms:.3f}" for role, ms in cpu["agent_roles_ms"].items() if ms)
    print(
        f"CPU during the run: agent {result['agent_cpu_s']:.1f} s ({cpu['agent_cores']:.2f} cores, "
        f"{cpu['agent_ms']:.3f} ms per answered request: {roles}); "
        + "; ".join(f"generator {g} {result['gen_cpu'][g]:.1f} s ({result['gen_cpu'][g] / elapsed:.2f} cores, "
                    f"{ms:.3f} ms per request it sent)" for g, ms in cpu["gen_ms"].items())
        + f"; this driver (poller, sampler) {result['driver_cpu_s']:.1f} s; the machine has {os.cpu_count()} cores"
    )
    if sampler.conns:
        mgr_max = max(c[1] for c in sampler.conns)
        cli_max = max(c[2] for c in sampler.conns)
        print(f"agent's established connections (max of samples): manager API {mgr_max}, client API {cli_max}")
    print(f"latencies: requests started after the first {result.get('warmup', 0):g} s (the connections opening)")
    print()
    print(f"{'route':<28} {'count':>8} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'errors':>6}  target")
    for route in ROUTES:
        r = routes[route]
        target = ""
        if route in USAGE_ROUTES:
            met = r["p99"] is not None and r["p99"] < 0.010
            target = f"p99 < 10 ms: {'yes' if met else 'NO'}"
        print(
            f"{route:<28} {r['count']:>8} {r['count'] / elapsed:>8.1f} {fmt_ms(r['p50']):>8} "
            f"{fmt_ms(r['p99']):>8} {fmt_ms(r['max']):>8} {r['errors']:>6}  {target}"
        )
    print(
        f"{'all':<28} {result['requests']:>8} {result['requests'] / elapsed:>8.1f} {'':>8} {'':>8} {'':>8} "
        f"{errors:>6}  zero errors: {'yes' if errors == 0 else 'NO'}"
    )
    lat = sorted(probe.latencies)
    if lat:
        met = "yes" if pct(lat, 99) < 0.010 else "NO"
        print(
            f"{'usage, manager-like poller':<28} {len(lat):>8} {len(lat) / elapsed:>8.1f} {fmt_ms(pct(lat, 50)):>8} "
            f"{fmt_ms(pct(lat, 99)):>8} {fmt_ms(lat[-1]):>8} {probe.errors:>6}  p99 < 10 ms: {met}"
        )
    errors += probe.errors

    during = [(ts - t0, rss) for ts, rss in sampler.rss if t0 <= ts <= t0 + elapsed]
    before = rss_at(sampler.rss, t0)
    at10 = rss_at(sampler.rss, t0 + WARMUP)
    end = during[-1][1] if during else None
    print()
    if at10 is None or end is None or elapsed < WARMUP:
        print(
            f"RSS: run shorter than {WARMUP:g} s, no growth figure "
            f"(before {before and before / MiB:.1f} MiB, end {end and end / MiB:.1f} MiB)"
        )
    else:
        after = [rss for t, rss in during if t >= WARMUP]
        growth = end - at10
        print(
            f"RSS: before load {before / MiB:.1f} MiB, at {WARMUP:g} s {at10 / MiB:.1f} MiB, "
            f"end {end / MiB:.1f} MiB, max after {WARMUP:g} s {max(after) / MiB:.1f} MiB, "
            f"growth after {WARMUP:g} s {growth / MiB:+.1f} MiB"
        )
        # a trend over every sample after the warm-up says more than two points of a noisy series: the verdict
        # is the trend's (a page or two of allocator noise between two samples is not growth)
        xs = [t for t, _ in during if t >= WARMUP]
        if len(xs) >= 4:
            mx, my = sum(xs) / len(xs), sum(after) / len(after)
            slope = sum((x - mx) * (y - my) for x, y in zip(xs, after, strict=True)) / sum((x - mx) ** 2 for x in xs)
            per_min = slope * 60 / MiB
            flat = "yes" if per_min <= RSS_TREND_NOISE else "NO"
            print(
                f"RSS trend after {WARMUP:g} s (least squares over {len(xs)} samples): {per_min:+.2f} MiB/min  "
                f"target no growth (trend <= {RSS_TREND_NOISE:g} MiB/min): {flat}"
            )
        before_m, after_m = result["memory"]
        sq, blocks = "storage_agent_sqlite_memory_bytes", "storage_agent_python_allocated_blocks"
        if sq in before_m and sq in after_m:
            print(f"  of which SQLite's heap: {before_m[sq] / MiB:.1f} -> {after_m[sq] / MiB:.1f} MiB", end="")
        if blocks in before_m and blocks in after_m:
            print(f"; Python's allocated blocks: {before_m[blocks]:.0f} -> {after_m[blocks]:.0f}", end="")
        print()
        if elapsed >= 120:  # a long run: does the growth level off? (allocator arenas and caches fill, then stop)
            marks = [rss_at(sampler.rss, t0 + m * 60) for m in range(1, int(elapsed // 60) + 1)]
            print("RSS at each minute: " + ", ".join(f"{m / MiB:.1f}" for m in marks if m is not None) + " MiB")

    print()
    slow = [(route, s, at) for route in ROUTES for s, at in routes[route]["slowest"]]
    slow.sort(key=lambda x: x[1], reverse=True)
    for route in USAGE_ROUTES:
        worst = routes[route]["slowest"]
        if worst:
            print(f"slowest {route}: " + ", ".join(f"{x * 1e3:.0f} ms at {at:.1f} s" for x, at in worst))
    if slow:
        top = ", ".join(f"{route} {s * 1e3:.0f} ms at {at:.1f} s" for route, s, at in slow[:5])
        print(f"slowest of all: {top}")
    if result["error_samples"]:
        print(f"\nerrors (first {len(result['error_samples'])}):")
        for e in result["error_samples"]:
            print(f"  {e.get('at_s', '?')} s  {e['route']}  status={e['status']}  msg={e['msg']!r}")
    log = agent.log().splitlines()
    bad = [line for line in log if any(w in line for w in ("Traceback", "ERROR", "error", " 500", "Exception"))]
    print(f"\nagent log: {len(log)} lines, {len(bad)} that look like errors")
    for line in bad[:20]:
        print("  " + line[:300])
    usage = routes[USAGE_ROUTES[0]]
    return {
        "req_s": answered / elapsed,
        **cpu,
        "usage_p50": usage["p50"],
        "usage_p99": usage["p99"],
        "poller_p99": pct(lat, 99),
        "errors": errors,
    }


def cpu_figures(result: dict[str, Any], answered: int, elapsed: float) -> dict[str, Any]:
    """CPU per request: the agent's (all its processes, per answered request, the poller's included) and each
    generator's (per request it sent), and the cores the generators and this driver took from the agent."""
    gens = result["gen_cpu"]
    return {
        "agent_cores": result["agent_cpu_s"] / elapsed,
        "agent_ms": 1e3 * result["agent_cpu_s"] / max(1, answered),
        "agent_roles_ms": {role: 1e3 * s / max(1, answered) for role, s in result["agent_cpu"].items()},
        "gen_ms": {g: 1e3 * gens[g] / max(1, result["gen_requests"].get(g, 0)) for g in gens},
        "gen_cores": (sum(gens.values()) + result["driver_cpu_s"]) / elapsed,
    }


CPU_COLUMNS = f"{'agent cores':>11} {'agent ms/req':>12} {'wrk ms/req':>10} {'py ms/req':>9} {'gen cores':>9}"


def cpu_cells(row: dict[str, Any]) -> str:
    """The CPU columns: the agent's cores and CPU per answered request; each generator's CPU per request it
    sent and the cores all of them (and this driver) took."""
    gen = row["gen_ms"]
    wrk = f"{gen['wrk']:.3f}" if "wrk" in gen else "-"
    py = f"{gen['python']:.3f}" if "python" in gen else "-"
    return f"{row['agent_cores']:>11.2f} {row['agent_ms']:>12.3f} {wrk:>10} {py:>9} {row['gen_cores']:>9.2f}"


def print_sweep(rows: list[tuple[float, dict[str, Any]]]) -> None:
    """Usage latency against offered load: where on this machine the p99 target holds."""
    print("\nsweep: usage latency against offered load (the think time sets the rate)")
    print(f"{'think ms':>9} {'req/s':>8} {CPU_COLUMNS} {'usage p50':>10} {'usage p99':>10} {'poller p99':>11} "
          f"{'errors':>7}  p99 < 10 ms")
    for think, row in rows:
        met = all(v is not None and v < 0.010 for v in (row["usage_p99"], row["poller_p99"]))
        print(
            f"{think:>9g} {row['req_s']:>8.1f} {cpu_cells(row)} {fmt_ms(row['usage_p50']):>10} "
            f"{fmt_ms(row['usage_p99']):>10} {fmt_ms(row['poller_p99']):>11} {row['errors']:>7}  "
            f"{'yes' if met else 'NO'}"
        )


def print_side_by_side(rows: list[tuple[int, float, dict[str, Any]]], generator: str) -> None:
    """The same loads against each num-proc, one row per (think time, num-proc), then the ratios of the
    issue's targets against the first num-proc."""
    cores = os.cpu_count() or 1
    print(f"\nnum-proc side by side (200-connection mixed load, generator {generator}; the load generator "
          f"shares this machine's {cores} CPUs with the agent: 'gen cores' is what it took)")
    print(f"{'think ms':>9} {'num-proc':>9} {'req/s':>8} {CPU_COLUMNS} {'workers ms':>10} {'engine ms':>9} "
          f"{'usage p50':>10} {'usage p99':>10} {'poller p99':>11} {'errors':>7}")
    thinks = list(dict.fromkeys(t for _, t, _ in rows))
    for think in thinks:
        for num_proc, t, row in rows:
            if t != think:
                continue
            roles = row["agent_roles_ms"]
            print(
                f"{think:>9g} {num_proc:>9} {row['req_s']:>8.1f} {cpu_cells(row)} {roles['workers']:>10.3f} "
                f"{roles['engine']:>9.3f} {fmt_ms(row['usage_p50']):>10} {fmt_ms(row['usage_p99']):>10} "
                f"{fmt_ms(row['poller_p99']):>11} {row['errors']:>7}"
            )
    base = rows[0][0]
    for think in thinks:
        one = next(r for n, t, r in rows if t == think and n == base)
        for num_proc, t, row in rows:
            if t != think or num_proc == base:
                continue
            if think == 0:
                ratio = row["req_s"] / one["req_s"]
                print(f"think 0 (saturation): throughput num-proc {num_proc} / {base} = {ratio:.2f} "
                      f"(target >= 1.6: {'yes' if ratio >= 1.6 else 'NO'}); CPU left to the agent by the "
                      f"generators: {cores - one['gen_cores']:.2f} / {cores - row['gen_cores']:.2f} cores")
            elif one["usage_p99"] and row["usage_p99"]:
                ratio = row["usage_p99"] / one["usage_p99"]
                print(f"think {think:g} ms: usage p99 num-proc {num_proc} / {base} = {ratio:.2f} at "
                      f"{row['req_s']:.0f} / {one['req_s']:.0f} req/s (target <= 0.33: "
                      f"{'yes' if ratio <= 1 / 3 else 'NO'})")
    for num_proc, think, row in rows:
        if num_proc > 1:
            print(f"think {think:g} ms, num-proc {num_proc}: {paper_target(row)}")


PAPER_CORES, PAPER_RATE, PAPER_P99 = 8, 2000.0, 0.010


def paper_target(row: dict[str, Any]) -> str:
    """The issue's target on paper for a node with PAPER_CORES cores, from the CPU per request measured here:
    num-proc = cores - 2 (one core for the engine, one for the kernel's network work and the rest), each
    worker an M/M/1 queue (Poisson arrivals, the kernel spreading connections evenly) with service time S =
    the workers' CPU per request: busy rho = rate * S / workers, p99 of the answer time ln(100) * S / (1 - rho).
    A model, not a measurement: it says whether the CPU cost measured leaves room, not what a node will see."""
    workers = PAPER_CORES - 2
    service = row["agent_roles_ms"]["workers"] / 1e3
    rho = PAPER_RATE * service / workers
    engine = PAPER_RATE * row["agent_roles_ms"]["engine"] / 1e3
    if rho >= 1:
        return (f"on paper, {PAPER_CORES} cores, num-proc {workers}: {PAPER_RATE:g} req/s needs "
                f"{PAPER_RATE * service:.1f} cores of workers: not met")
    p99 = math.log(100) * service / (1 - rho)
    return (f"on paper, {PAPER_CORES} cores, num-proc {workers}, {PAPER_RATE:g} req/s of this mix: workers "
            f"{service * 1e3:.2f} ms of CPU per request, each busy {rho:.0%}, usage p99 ~ {p99 * 1e3:.1f} ms "
            f"(M/M/1), engine {engine:.2f} cores; target < {PAPER_P99 * 1e3:g} ms: "
            f"{'yes' if p99 < PAPER_P99 else 'NO'}")


def run_load(agent: Any, args: argparse.Namespace, think: float, vfids: list[str], list_dirs: list[str],
             work: Path) -> dict[str, Any]:
    """One load run against the running agent; prints its tables and returns its summary row."""
    work.mkdir()
    cfg = {
        "manager_url": agent.manager_url,
        "client_url": agent.client_url,
        "secret": agent.secret,
        "vfids": vfids,
        "list_dirs": list_dirs,
        "connections": args.connections,
        "seconds": args.seconds,
        "think_ms": think,
        "max_requests": args.max_requests,
        "request_timeout": args.request_timeout,
        "warmup": args.warmup,
    }
    assert cfg["manager_url"].startswith("http://127.0.0.1:") and cfg["client_url"].startswith("http://127.0.0.1:")
    use_wrk = args.generator == "wrk"
    wrk_conns = wrk_split(args.connections - args.side_connections) if use_wrk else {}
    py_cfg = cfg
    if use_wrk:  # the rest of the mix at a low fixed rate, whatever the think time of wrk's connections
        py_cfg = {**cfg, "connections": args.side_connections, "think_ms": args.side_think_ms, "mix": SIDE_MIX,
                  "max_requests": max(1, args.max_requests * args.side_connections // args.connections)}
    cfg_path, out_path = work / "load.json", work / "result.json"
    cfg_path.write_text(json.dumps(py_cfg))
    ports = (int(agent.manager_url.rsplit(":", 1)[1]), int(agent.client_url.rsplit(":", 1)[1]))
    cpu_before = sampler_cpu(agent.proc.pid)
    memory_before = memory_figures(agent)
    probe = Probe(agent.manager_url, agent.secret, vfids, args.probe_ms / 1e3)
    procs: list[tuple[str, subprocess.Popen[bytes], Path | None]] = []
    gen_cpu: dict[str, float] = {}
    wrk_routes: dict[str, dict[str, Any]] = {}
    with Sampler(agent.proc.pid, ports) as sampler:
        driver_cpu = time.process_time()
        t_start = time.monotonic()
        try:
            if py_cfg["connections"]:
                procs.append(("python", subprocess.Popen(
                    [sys.executable, __file__, "--worker", str(cfg_path), str(out_path)], stdout=subprocess.DEVNULL
                ), None))
            for i, (route, n) in enumerate(wrk_conns.items()):
                script, out = work / f"wrk{i}.lua", work / f"wrk{i}.out"
                share = max(1, args.max_requests * n // args.connections)
                script.write_text(wrk_script(route, cfg, seed=i + 1, max_requests=share))
                with out.open("wb") as f:
                    procs.append((f"wrk:{route}", subprocess.Popen(
                        ["wrk", "-t1", f"-c{n}", f"-d{max(1, round(args.seconds))}s",
                         f"--timeout={max(1, round(args.request_timeout))}s", "-s", str(script), agent.manager_url],
                        stdout=f, stderr=subprocess.STDOUT,
                    ), out))
            probe.start(delay=args.warmup + 1.0)  # once the generators have opened their connections
            deadline = time.monotonic() + args.seconds + args.request_timeout + 60
            for name, proc, out in procs:
                rc, cpu = wait_rusage(proc, deadline)
                kind = name.split(":")[0]
                gen_cpu[kind] = gen_cpu.get(kind, 0.0) + cpu
                if rc != 0:
                    raise SystemExit(f"the load generator {name} failed (exit {rc})"
                                     + (f":\n{out.read_text()[-2000:]}" if out else ""))
                if out is not None:
                    wrk_routes[name.split(":", 1)[1]] = wrk_result(name, out.read_text())
        finally:
            for _, proc, _ in procs:
                if proc.returncode is None:
                    proc.kill()
                    proc.wait()
            probe.stop()
        wall = time.monotonic() - t_start
        driver_cpu = time.process_time() - driver_cpu
        time.sleep(SAMPLE_INTERVAL)
    if py_cfg["connections"]:
        if not out_path.exists():
            raise SystemExit("the Python load generator wrote no result")
        result = json.loads(out_path.read_text())
    else:
        empty = {"count": 0, "errors": 0, "p50": None, "p99": None, "max": None, "slowest": []}
        result = {"t0": t_start, "elapsed": 0.0, "warmup": 0.0, "requests": 0, "connections_opened": 0,
                  "routes": {r: dict(empty) for r in ROUTES}, "error_samples": []}
    result["gen_requests"] = {"python": result["requests"]} if py_cfg["connections"] else {}
    if wrk_routes:
        result["gen_requests"]["wrk"] = sum(r["count"] for r in wrk_routes.values())
        for route, row in wrk_routes.items():
            result["error_samples"] += row.pop("samples")
            result["elapsed"] = max(result["elapsed"], row.pop("duration"))
            result["routes"][route] = row
        result["requests"] = sum(result["gen_requests"].values())
        result["t0"] = t_start
    result["generator"] = args.generator
    result["wrk_connections"] = wrk_conns
    result["python_connections"] = py_cfg["connections"]
    result["gen_cpu"] = gen_cpu
    result["driver_cpu_s"] = driver_cpu
    result["wall"] = wall
    after = sampler_cpu(agent.proc.pid)
    result["agent_cpu"] = {role: after[role] - cpu_before[role] for role in after}
    result["agent_cpu_s"] = sum(result["agent_cpu"].values())
    result["memory"] = (memory_before, memory_figures(agent))
    return report(result, sampler, probe, agent, args.connections, args.seconds)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--connections", type=int, default=200)
    parser.add_argument(
        "--think-ms", default="0", help="mean pause of a task between operations; a comma list runs each in turn "
        "against the same agent and ends with a table of usage latency against offered load"
    )
    parser.add_argument("--cpu-pin", default="auto", help="the agent's [storage-proxy] cpu-pin")
    parser.add_argument("--num-proc", default="1", help="the agent's [storage-proxy] num-proc; a comma list runs "
                        "every think time against each and ends with them side by side")
    parser.add_argument("--generator", choices=("wrk", "python"), default="wrk",
                        help="wrk (default): wrk sends usage, used-bytes and listings, the Python generator the "
                        "file operations and transfers at a fixed low rate; python: the Python generator sends "
                        "the whole mix (the runs before wrk)")
    parser.add_argument("--side-connections", type=int, default=4,
                        help="with wrk: connections of the Python generator (file operations, transfers)")
    parser.add_argument("--side-think-ms", type=float, default=250.0,
                        help="with wrk: the Python generator's think time, whatever --think-ms says")
    parser.add_argument("--max-requests", type=int, default=5_000_000, help="stop once this many were sent")
    parser.add_argument("--scopes", type=int, default=4)
    parser.add_argument("--vfolders-per-scope", type=int, default=2)
    parser.add_argument("--request-timeout", type=float, default=30.0)
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds at the start left out of the latencies")
    parser.add_argument("--probe-ms", type=float, default=50.0, help="pause of the manager-like usage poller")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (agent log) and print it")
    parser.add_argument("--worker", nargs=2, metavar=("CONFIG", "RESULT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(*args.worker)

    if args.generator == "wrk" and shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (apt-get install wrk, or packaging/dev-deps.sh --test); "
                         "--generator python runs the Python generator alone")
    from tests.support import make_agent

    thinks = [float(t) for t in args.think_ms.split(",")]
    pin = int(args.cpu_pin) if args.cpu_pin.isdigit() else args.cpu_pin
    every: list[tuple[int, float, dict[str, Any]]] = []
    status = 0
    for num_proc in [int(n) for n in args.num_proc.split(",")]:
        tmp = tempfile.mkdtemp(prefix="sa-load-")
        agent = make_agent(Path(tmp) / "agent", storage_proxy={"cpu-pin": pin, "num-proc": num_proc}).start(120)
        print(f"\nagent: cpu-pin {args.cpu_pin}, num-proc {num_proc}")
        try:
            vfids, list_dirs = prepare(agent, args.scopes, args.vfolders_per_scope)
            rows = []
            for i, think in enumerate(thinks):
                if len(thinks) > 1:
                    print(f"\n=== think time {think:g} ms ===")
                rows.append((think, run_load(agent, args, think, vfids, list_dirs, Path(tmp) / f"run{i}")))
            if len(rows) > 1:
                print_sweep(rows)
            every += [(num_proc, think, row) for think, row in rows]
            status = status or (1 if any(row["errors"] for _, row in rows) else 0)
        finally:
            agent.stop()
            if args.keep:
                print(f"\nkept {tmp}")
            else:
                shutil.rmtree(tmp, ignore_errors=True)
    if len({n for n, _, _ in every}) > 1:
        print_side_by_side(every, args.generator)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
