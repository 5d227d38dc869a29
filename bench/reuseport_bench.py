"""N aiohttp worker processes on one port: an inherited listening socket against SO_REUSEPORT (issue 21).

    .venv/bin/python bench/reuseport_bench.py [--seconds 3] [--workers 1,2] [--connections 32]

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
costs less CPU than aiohttp's) runs for --seconds. Printed per run: requests/s, p50/p99, how the
connections spread over the workers (each connection stays on the worker that accepted it), the share of
requests each worker answered, the workers' CPU per request (from /proc, all workers together) and the
generator's own.

The load generator runs on the same cores as the workers: on this 2-core machine (shared with other
work) 2 workers plus the generator want more than 2 CPUs, so the 2-worker figure is a floor, not what
two free cores would give. Bounded: each run is --seconds long, every child is killed if it overstays.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
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


def run(mode: str, n: int, args: argparse.Namespace) -> tuple[Any, ...]:
    me = str(Path(__file__).resolve())
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if mode != "inherit":
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    holder.bind(("127.0.0.1", 0))
    port = holder.getsockname()[1]
    own = [holder]  # mode "parent-reuseport": one listening socket per worker, all bound here
    if mode == "parent-reuseport":
        for _ in range(n - 1):
            extra = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            extra.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            extra.bind(("127.0.0.1", port))
            own.append(extra)
    if mode != "reuseport":
        for sock in own:
            sock.listen(1024)
    workers = []
    try:
        for i in range(n):
            if mode != "reuseport":
                fd = own[i if mode == "parent-reuseport" else 0].fileno()
                cmd = [sys.executable, me, "--worker", "--fd", str(fd)]
                proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, pass_fds=(fd,), text=True)
            else:
                cmd = [sys.executable, me, "--worker", "--port", str(port)]
                proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
            workers.append(proc)
        for proc in workers:
            if proc.stdout.readline().strip() != "ready":
                raise RuntimeError("a worker did not start")
        pids = [p.pid for p in workers]
        gen = subprocess.Popen(
            [sys.executable, me, "--load", str(port), str(args.connections), str(args.seconds)],
            stdout=subprocess.PIPE,
            text=True,
        )
        cpu0 = cpu_seconds(pids)
        out, _ = gen.communicate(timeout=args.seconds + 60)
        cpu1 = cpu_seconds(pids)
        count, p50, p99, spread, by_worker, gen_cpu = json.loads(out)
    finally:
        for proc in workers:
            proc.kill()
            proc.wait(30)
        for sock in own:
            sock.close()
    order = [str(p) for p in pids]
    conns = "/".join(str(spread.get(w, 0)) for w in order)
    share = "/".join(f"{100 * by_worker.get(w, 0) / max(count, 1):.0f}" for w in order)
    return (
        mode,
        n,
        count / args.seconds,
        p50 * 1000,
        p99 * 1000,
        conns,
        share,
        (cpu1 - cpu0) / max(count, 1) * 1e6,
        gen_cpu / max(count, 1) * 1e6,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--connections", type=int, default=32)
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
    rows = [run(mode, n, args) for n in (int(x) for x in args.workers.split(",")) for mode in MODES]
    print(f"\n{args.connections} keep-alive connections, closed loop, {args.seconds:g} s per run, trivial JSON handler")
    head = (
        "port shared by",
        "workers",
        "req/s",
        "p50 ms",
        "p99 ms",
        "conns/worker",
        "% req/worker",
        "CPU µs/req",
        "gen µs/req",
    )
    print(f"{head[0]:16}", *(f"{h:>12}" for h in head[1:]))
    for mode, n, rps, p50, p99, conns, share, cpu, gen in rows:
        print(f"{mode:16} {n:12d} {rps:12.0f} {p50:12.2f} {p99:12.2f} {conns:>12} {share:>12} {cpu:12.0f} {gen:12.0f}")
    print(
        f"\n{os.cpu_count()} CPUs, shared with other work (load average {os.getloadavg()[0]:.1f}); the load generator"
        "\nruns on them too, so 2 workers + generator want more CPUs than there are: the 2-worker req/s is a floor."
    )


if __name__ == "__main__":
    main()
