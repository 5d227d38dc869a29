"""N aiohttp worker processes on one port: an inherited listening socket against SO_REUSEPORT (issue 21).

    .venv/bin/python bench/reuseport_bench.py [--seconds 1.5] [--rounds 3] [--workers 1,2] [--connections 32]

For each way of sharing the port and each N in --workers, starts N worker processes (this file with
``--worker``), each an aiohttp app with one trivial JSON handler that names its process:

    inherit     the parent binds and listens once; every worker gets the same socket (``pass_fds``) and
                accepts on it (what a supervisor that binds port 0 once would do)
    reuseport   every worker binds the same port itself with SO_REUSEPORT (what upstream's num-proc does);
                the parent keeps a bound, not listening, socket only to hold the port
    parent-reuseport  the parent binds N listening sockets on one port with SO_REUSEPORT and hands
                worker i socket i: the kernel's spread, sockets made before any privilege drop (a
                reuseport group only admits sockets of the same user) and kept by the parent across a
                worker's death (its queued connections wait for the replacement instead of being reset)

Then a load generator (a second process: one asyncio loop, --connections keep-alive connections, each
its own task sending the next request as soon as the last is answered, a minimal HTTP/1.1 client that
costs less CPU than aiohttp's) runs for --seconds. Every row runs --rounds times, interleaved with the
others. Printed per row: requests/s (median and range), p50/p99 (medians), the workers' CPU per request
(from /proc, all workers together) and the generator's own, and in each round how the connections spread
over the workers (each keep-alive connection stays on the worker that accepted it).

The load generator runs on the same cores as the workers: on this 2-core machine (shared with other
work) 2 workers plus the generator want more than 2 CPUs, so the 2-worker figure is a floor, not what
two free cores would give.

Then, per way of sharing, what a worker's death costs: with 2 workers, worker 1 stalls (SIGSTOP), 32 new
connections arrive (the kernel queues some on worker 1's socket), worker 1 is SIGKILLed and its
replacement starts --restart-delay later. Printed: how many were answered (and by the replacement), how
many failed and why, and the slowest answer.

Bounded: about a minute by default; each run is --seconds long, every child is killed if it overstays.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

MODES = ("inherit", "reuseport", "parent-reuseport")
TICK = os.sysconf("SC_CLK_TCK")
REQUEST = b"GET /j HTTP/1.1\r\nHost: bench\r\n\r\n"


# -- the worker ------------------------------------------------------------------------------------------


def worker(fd: int | None, port: int) -> None:
    from aiohttp import web

    pid = str(os.getpid())

    async def handler(_request: web.Request) -> web.Response:
        return web.json_response({"worker": pid}, headers={"X-Worker": pid})

    async def serve() -> None:
        app = web.Application()
        app.router.add_get("/j", handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        if fd is not None:
            site: web.BaseSite = web.SockSite(runner, socket.socket(fileno=fd))
        else:
            site = web.TCPSite(runner, "127.0.0.1", port, reuse_port=True)
        await site.start()
        print("ready", flush=True)
        await asyncio.Event().wait()  # until killed

    asyncio.run(serve())


# -- the load generator ----------------------------------------------------------------------------------


class Client(asyncio.Protocol):
    """One keep-alive connection, closed loop: the next request leaves when the last answer is complete.

    A bare Protocol (no streams, no HTTP library) so the generator spends as little CPU as it can."""

    def __init__(self, end: float, lat: list[float], by_worker: Counter[str], done: asyncio.Future[None]) -> None:
        self.end, self.lat, self.by_worker, self.done = end, lat, by_worker, done
        self.buf = b""
        self.first: str | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.send()

    def send(self) -> None:
        if time.time() >= self.end:
            self.transport.close()
            return
        self.began = time.perf_counter()
        self.transport.write(REQUEST)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        head_end = self.buf.find(b"\r\n\r\n")
        if head_end < 0:
            return
        head = self.buf[:head_end].lower()
        i = head.find(b"content-length:")
        length = int(head[i + 15 : head.find(b"\r\n", i)]) if i >= 0 else 0
        if len(self.buf) < head_end + 4 + length:
            return
        self.buf = self.buf[head_end + 4 + length :]
        i = head.find(b"x-worker:")
        who = head[i + 9 : head.find(b"\r\n", i)].strip().decode() if i >= 0 else "?"
        self.lat.append(time.perf_counter() - self.began)
        self.by_worker[who] += 1
        self.first = self.first or who
        self.send()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


async def one_connection(port: int, end: float, lat: list[float], by_worker: Counter[str]) -> str | None:
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    _, client = await loop.create_connection(lambda: Client(end, lat, by_worker, done), "127.0.0.1", port)
    await done
    return client.first


async def load(port: int, connections: int, seconds: float) -> None:
    lat: list[float] = []
    by_worker: Counter[str] = Counter()
    end = time.time() + seconds
    cpu = time.process_time()
    firsts = await asyncio.gather(*(one_connection(port, end, lat, by_worker) for _ in range(connections)))
    lat.sort()
    spread = Counter(f for f in firsts if f)
    cpu = time.process_time() - cpu
    print(json.dumps([len(lat), lat[len(lat) // 2], lat[int(len(lat) * 0.99)], spread, by_worker, cpu]), flush=True)


# -- the parent ------------------------------------------------------------------------------------------


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / TICK


class Pool:
    """The listening sockets of one way of sharing the port, and the worker processes on them."""

    def __init__(self, mode: str, n: int) -> None:
        self.mode, self.me = mode, str(Path(__file__).resolve())
        holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if mode != "inherit":
            holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        holder.bind(("127.0.0.1", 0))
        self.port = holder.getsockname()[1]
        self.socks = [holder]  # mode "parent-reuseport": one listening socket per worker, all bound here
        if mode == "parent-reuseport":
            for _ in range(n - 1):
                extra = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                extra.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                extra.bind(("127.0.0.1", self.port))
                self.socks.append(extra)
        if mode != "reuseport":
            for sock in self.socks:
                sock.listen(1024)
        self.workers: list[subprocess.Popen[str]] = []
        for i in range(n):
            self.workers.append(self.spawn(i))
        for proc in self.workers:
            self.wait_ready(proc)

    def spawn(self, i: int) -> subprocess.Popen[str]:
        """Worker ``i`` (a first one, or the replacement of a dead one): on socket i, or binding the port."""
        if self.mode == "reuseport":
            cmd = [sys.executable, self.me, "--worker", "--port", str(self.port)]
            return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        fd = self.socks[i if self.mode == "parent-reuseport" else 0].fileno()
        cmd = [sys.executable, self.me, "--worker", "--fd", str(fd)]
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, pass_fds=(fd,), text=True)

    @staticmethod
    def wait_ready(proc: subprocess.Popen[str]) -> None:
        if proc.stdout is None or proc.stdout.readline().strip() != "ready":
            raise RuntimeError("a worker did not start")

    def close(self) -> None:
        for proc in self.workers:
            proc.kill()
            proc.wait(30)
        for sock in self.socks:
            sock.close()


def run(mode: str, n: int, args: argparse.Namespace) -> dict[str, Any]:
    pool = Pool(mode, n)
    try:
        pids = [p.pid for p in pool.workers]
        gen = subprocess.Popen(
            [sys.executable, pool.me, "--load", str(pool.port), str(args.connections), str(args.seconds)],
            stdout=subprocess.PIPE,
            text=True,
        )
        cpu0 = cpu_seconds(pids)
        out, _ = gen.communicate(timeout=args.seconds + 60)
        cpu1 = cpu_seconds(pids)
        count, p50, p99, spread, _by_worker, gen_cpu = json.loads(out)
    finally:
        pool.close()
    order = [str(p) for p in pids]
    return {
        "rps": count / args.seconds,
        "p50": p50 * 1000,
        "p99": p99 * 1000,
        "conns": "/".join(str(spread.get(w, 0)) for w in order),
        "cpu": (cpu1 - cpu0) / max(count, 1) * 1e6,
        "gen": gen_cpu / max(count, 1) * 1e6,
    }


async def ask(port: int, timeout: float) -> tuple[str, float]:
    """One request on a new connection: who answered (or the error) and when, from now."""
    began = time.perf_counter()
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
        writer.write(REQUEST.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
        answer = await asyncio.wait_for(reader.read(), timeout)
        writer.close()
        if not answer.startswith(b"HTTP/1.1 200"):
            return "bad answer", time.perf_counter() - began
        i = answer.lower().find(b"x-worker:")
        return answer[i + 9 : answer.find(b"\r\n", i)].strip().decode(), time.perf_counter() - began
    except (OSError, TimeoutError) as e:
        return type(e).__name__, time.perf_counter() - began


def kill_one(mode: str, args: argparse.Namespace) -> dict[str, Any]:
    """Two workers; worker 1 stops accepting (SIGSTOP), connections arrive, it is SIGKILLed, and its
    replacement starts --restart-delay later (the supervisor's back-off): what becomes of the connections
    that arrived meanwhile (those the kernel put in worker 1's queue, and the rest)?"""
    pool = Pool(mode, 2)
    try:
        dead = pool.workers[1]
        os.kill(dead.pid, signal.SIGSTOP)

        async def scenario() -> tuple[list[tuple[str, float]], str]:
            asks = [asyncio.create_task(ask(pool.port, 30.0)) for _ in range(args.connections)]
            await asyncio.sleep(0.3)  # connected and queued (or answered by worker 0)
            dead.kill()
            dead.wait(30)
            await asyncio.sleep(args.restart_delay)
            pool.workers[1] = pool.spawn(1)
            await asyncio.to_thread(pool.wait_ready, pool.workers[1])
            return await asyncio.gather(*asks), str(pool.workers[1].pid)

        results, replacement = asyncio.run(scenario())
    finally:
        pool.close()
    failed = [who for who, _ in results if not who.isdigit()]
    return {
        "answered": len(results) - len(failed),
        "by replacement": sum(who == replacement for who, _ in results),
        "failed": len(failed),
        "why": ",".join(sorted(set(failed))) or "-",
        "slowest": max(t for _, t in results),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=1.5, help="length of each run")
    parser.add_argument("--rounds", type=int, default=3, help="every row is run this many times, interleaved")
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument(
        "--restart-delay", type=float, default=1.0, help="the kill experiment's back-off; negative: skip it"
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--fd", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--load", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.fd, args.port)
        return
    if args.load:
        port, connections, seconds = args.load
        asyncio.run(load(int(port), int(connections), float(seconds)))
        return
    counts = [int(x) for x in args.workers.split(",")]
    runs: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for _ in range(args.rounds):  # interleaved, so that a burst of other work hits every row alike
        for n in counts:
            for mode in MODES:
                runs.setdefault((mode, n), []).append(run(mode, n, args))
    print(
        f"\n{args.connections} keep-alive connections, closed loop, {args.seconds:g} s per run, {args.rounds} rounds"
        " interleaved, trivial JSON handler; medians (req/s: median and range), connections per worker in each round"
    )
    head = ("port shared by", "workers", "req/s", "range", "p50 ms", "p99 ms", "CPU µs/req", "gen µs/req")
    print(f"{head[0]:16}", *(f"{h:>11}" for h in head[1:]), "  conns/worker")
    for (mode, n), rs in runs.items():
        med = {k: statistics.median(r[k] for r in rs) for k in ("rps", "p50", "p99", "cpu", "gen")}
        span = f"{min(r['rps'] for r in rs) / 1000:.1f}-{max(r['rps'] for r in rs) / 1000:.1f}k"
        print(
            f"{mode:16} {n:11d} {med['rps']:11.0f} {span:>11} {med['p50']:11.2f} {med['p99']:11.2f}"
            f" {med['cpu']:11.0f} {med['gen']:11.0f}  ",
            " ".join(r["conns"] for r in rs),
        )
    if args.restart_delay >= 0:
        print(
            f"\na worker stalls, {args.connections} new connections arrive, it is SIGKILLed, its replacement starts"
            f" {args.restart_delay:g} s later (2 workers)"
        )
        print(
            f"{'port shared by':16}",
            *(f"{h:>14}" for h in ("answered", "by replacement", "failed", "slowest s")),
            " why",
        )
        for mode in MODES:
            k = kill_one(mode, args)
            print(
                f"{mode:16} {k['answered']:14d} {k['by replacement']:14d} {k['failed']:14d} {k['slowest']:14.2f}",
                "",
                k["why"],
            )
    print(
        f"\n{os.cpu_count()} CPUs, shared with other work (load average {os.getloadavg()[0]:.1f}); the load generator"
        "\nruns on them too, so 2 workers + generator want more CPUs than there are: the 2-worker req/s is a floor."
    )


if __name__ == "__main__":
    main()
