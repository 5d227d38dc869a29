"""Two ways for N worker processes to write the catalogue, measured side by side in one run (issue 21).

    .venv/bin/python bench/writer_paths_bench.py [--seconds 3] [--writers 1,2,4] [--concurrency 4]
                                                 [--read-rate 100] [--dir DIR]

A catalogue file is made by the project's own code (``Catalog.open``: schema, WAL, PRAGMAs) and seeded
with one volume, one quota scope, 200 vfolders with usage rows and one upload session per writing task.
Then, for each N in --writers, N client processes (each an asyncio loop with --concurrency tasks, like an
HTTP worker with requests in flight) loop for --seconds over the agent's typical small writes, in turn:

    upload offset     ``Catalog.update_upload_session`` (one row UPDATE, what every PATCH records)
    usage upsert      ``Catalog.put_usage`` (INSERT .. ON CONFLICT DO UPDATE of a vfolder's figure)
    vfolder create    ``Catalog.add_vfolder`` (SELECT + INSERT of a new vfolder row)

along one of three paths:

    (a) own lock      every process opens the catalogue writable itself: its own ``Database`` writer
                      thread (group commit among its own tasks), ``BEGIN IMMEDIATE`` against the other
                      processes, busy timeout 10 s, the project's PRAGMAs (WAL, synchronous=NORMAL)
    (b) one writer    the agent's own path (catalog/remote.py): every process opens the catalogue with
                      ``Catalog.open_remote`` and its ``@writes`` calls travel over a Unix socket to ONE
                      writer process running ``WriterHost`` on its ``Catalog`` (the same writer thread:
                      group commit across all of them)
    ipc bare          a round trip of the same size alone (a bench-made length-prefixed JSON server that
                      decodes and answers without SQLite): the floor of (b)'s hop

Latency is per operation as the caller sees it; CPU per op is the user+system time of every process of
the path (clients and writer, from /proc) in the measured window divided by the operations done in it;
ops/commit is how many writes shared one commit (group commit at work).

(c) the read path a worker uses: beside each (a)/(b) run (and once with no writer), one reader process
opens the catalogue read-only (``Catalog.open(readonly=True)``, WAL) and asks ``get_usage``
(``GET /folder/usage``'s query in a worker) --read-rate times a second, paced, not closed-loop, in turn
through the aiosqlite pool and through the catalogue's point reader (a plain read-only ``sqlite3``
connection on the event loop's thread, catalog/points.py: what ``Catalog`` uses now).

Bounded: the default run takes about a minute (10 runs of 3 s plus process start-ups); every child is
joined with a timeout and killed if it overstays.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import multiprocessing as mp
import os
import random
import signal
import socket
import sqlite3
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

VOLUME, QSID = "vol1", "qs1"
SEED_VFOLDERS = 200
BOOT = "bench-boot"
TICK = os.sysconf("SC_CLK_TCK")


# -- the typed messages of path (b) ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class UploadOffset:
    session_id: str
    received: int
    synced: int
    boot_id: str | None


@dataclasses.dataclass(frozen=True)
class UsagePut:
    volume: str
    qsid: str
    folder_id: str
    used_bytes: int
    file_count: int
    allocated_bytes: int
    source: str


@dataclasses.dataclass(frozen=True)
class VFolderAdd:
    volume: str
    qsid: str
    folder_id: str


@dataclasses.dataclass(frozen=True)
class Stats:
    """Not a write: the writer's commit count (for ops/commit)."""


MESSAGES: dict[str, type] = {c.__name__: c for c in (UploadOffset, UsagePut, VFolderAdd, Stats)}


def encode(obj: Any) -> bytes:
    body = json.dumps({"t": type(obj).__name__, **dataclasses.asdict(obj)}, separators=(",", ":")).encode()
    return len(body).to_bytes(4, "big") + body


def decode(body: bytes) -> Any:
    fields = json.loads(body)
    kind = MESSAGES[fields.pop("t")]  # KeyError / TypeError: a malformed message, answered as an error
    return kind(**fields)


def frame(reply: dict[str, Any]) -> bytes:
    body = json.dumps(reply, separators=(",", ":")).encode()
    return len(body).to_bytes(4, "big") + body


async def apply(catalog: Any, msg: Any) -> Any:
    """One message as a call on a catalogue (path (a): a writable one; (b): ``Catalog.open_remote``'s)."""
    if isinstance(msg, UploadOffset):
        return await catalog.update_upload_session(
            msg.session_id, received=msg.received, synced=msg.synced, boot_id=msg.boot_id
        )
    if isinstance(msg, UsagePut):
        return await catalog.put_usage(
            msg.volume,
            msg.qsid,
            msg.folder_id,
            used_bytes=msg.used_bytes,
            file_count=msg.file_count,
            allocated_bytes=msg.allocated_bytes,
            source=msg.source,
        )
    if isinstance(msg, VFolderAdd):
        return await catalog.add_vfolder(msg.volume, msg.qsid, msg.folder_id)
    raise TypeError(f"not a write: {type(msg).__name__}")


def commits() -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("storage_agent_catalog_commits_total") or 0.0


# -- the writer process of (b) ------------------------------------------------------------------------


def writer_main(db_path: str, sock_path: str, bare: bool, ready: Any) -> None:
    asyncio.run(_writer(db_path, sock_path, bare, ready))


async def _writer(db_path: str, sock_path: str, bare: bool, ready: Any) -> None:
    from catalog import Catalog
    from catalog.remote import WriterHost

    catalog = None if bare else await Catalog.open(db_path, check=False)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """The bare server (no SQLite) and the commit counter's."""
        try:
            while True:
                size = int.from_bytes(await reader.readexactly(4), "big")
                body = await reader.readexactly(size)
                try:
                    msg = decode(body)
                    reply: dict[str, Any] = {"ok": True, "result": commits() if isinstance(msg, Stats) else None}
                except Exception as e:  # the caller gets the error; the connection lives on
                    reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
                writer.write(frame(reply))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    stats = await asyncio.start_unix_server(handle, sock_path + ".stats")
    host = None
    if catalog is None:
        server = await asyncio.start_unix_server(handle, sock_path)
    else:
        host = WriterHost(catalog, sock_path)
        await host.start()
    ready.set()
    await stop.wait()
    stats.close()
    if host is not None:
        await host.stop()
    else:
        server.close()
    if catalog is not None:
        await catalog.close()


class Link:
    """One task's connection to the writer process: one request in flight at a time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, sock_path: str) -> Link:
        return cls(*await asyncio.open_unix_connection(sock_path))

    async def call(self, msg: Any) -> Any:
        self.writer.write(encode(msg))
        size = int.from_bytes(await self.reader.readexactly(4), "big")
        reply = json.loads(await self.reader.readexactly(size))
        if not reply["ok"]:
            raise RuntimeError(reply["error"])
        return reply["result"]


def writer_commits(sock_path: str) -> float:
    """The writer process's commit count, asked over its socket (from the parent, synchronously)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(sock_path)
        s.sendall(encode(Stats()))
        buf = b""
        while len(buf) < 4 or len(buf) < 4 + int.from_bytes(buf[:4], "big"):
            chunk = s.recv(65536)
            if not chunk:
                raise ConnectionError("writer closed the connection")
            buf += chunk
        return json.loads(buf[4:])["result"]


# -- the client (worker) processes ---------------------------------------------------------------------


def client_main(path: str, db_path: str, sock_path: str, sessions: list[str], folders: list[str], args: Any) -> None:
    asyncio.run(_client(path, db_path, sock_path, sessions, folders, *args))


async def _client(
    path: str,
    db_path: str,
    sock_path: str,
    sessions: list[str],
    folders: list[str],
    idx: int,
    seconds: float,
    ready_q: Any,
    go: Any,
    t0: Any,
    results: Any,
) -> None:
    from catalog import Catalog

    rng = random.Random(idx)
    catalog = None
    if path == "a":
        catalog = await Catalog.open(db_path, check=False)
    elif path == "b":
        catalog = await Catalog.open_remote(db_path, sock_path, wait=30.0)
    links = [await Link.open(sock_path) for _ in sessions] if path == "ipc" else []
    received = [0] * len(sessions)

    def message(task: int, i: int) -> Any:
        kind = i % 3
        if kind == 0:
            received[task] += 1 << 20
            return UploadOffset(sessions[task], received[task], received[task], BOOT)
        if kind == 1:
            n = rng.randrange(1 << 30)
            return UsagePut(VOLUME, QSID, rng.choice(folders), n, n >> 12, n + 4096, "watch")
        return VFolderAdd(VOLUME, QSID, uuid.uuid4().hex)

    async def one(task: int, i: int) -> None:
        msg = message(task, i)
        if catalog is not None:
            await apply(catalog, msg)
        else:
            await links[task].call(msg)

    for task in range(len(sessions)):  # warm up: connections open, statements compiled
        for i in range(3):
            await one(task, i)
    ready_q.put(idx)
    await asyncio.to_thread(go.wait)
    start, end = t0.value, t0.value + seconds
    await asyncio.sleep(max(0.0, start - time.time()))
    commits_before = commits()
    lat: list[float] = []
    errors: list[str] = []

    async def loop(task: int) -> None:
        i = task
        while time.time() < end:
            began = time.perf_counter()
            try:
                await one(task, i)
            except Exception as e:
                errors.append(f"{type(e).__name__}: {e}"[:200])
            else:
                lat.append(time.perf_counter() - began)
            i += 1

    await asyncio.gather(*(loop(t) for t in range(len(sessions))))
    results.put((idx, lat, errors, commits() - commits_before))
    for link in links:
        link.writer.close()
    if catalog is not None:
        await catalog.close()


# -- (c) the reader --------------------------------------------------------------------------------------


def reader_main(
    db_path: str, folders: list[str], seconds: float, rate: float, ready_q: Any, go: Any, t0: Any, results: Any
) -> None:
    asyncio.run(_reader(db_path, folders, seconds, rate, ready_q, go, t0, results))


async def _reader(
    db_path: str, folders: list[str], seconds: float, rate: float, ready_q: Any, go: Any, t0: Any, results: Any
) -> None:
    from catalog import Catalog

    rng = random.Random(7)
    catalog = await Catalog.open(db_path, readonly=True)
    points = catalog.points
    await catalog.get_usage(VOLUME, QSID, folders[0])
    ready_q.put(-1)
    await asyncio.to_thread(go.wait)
    start, end = t0.value, t0.value + seconds
    await asyncio.sleep(max(0.0, start - time.time()))
    lat_async: list[float] = []
    lat_plain: list[float] = []
    missing = 0
    i = 0
    while time.time() < end:
        folder = rng.choice(folders)
        catalog.points = None if i % 2 == 0 else points  # None: the aiosqlite pool
        began = time.perf_counter()
        row = await catalog.get_usage(VOLUME, QSID, folder)
        (lat_async if i % 2 == 0 else lat_plain).append(time.perf_counter() - began)
        missing += row is None
        i += 1
        await asyncio.sleep(max(0.0, start + i / rate - time.time()))
    results.put((-1, (lat_async, lat_plain), [f"{missing} rows missing"] if missing else [], 0.0))
    catalog.points = points
    await catalog.close()


# -- the parent ------------------------------------------------------------------------------------------


async def seed(db_path: Path, sessions: int) -> tuple[list[str], list[str]]:
    from catalog import Catalog

    catalog = await Catalog.open(db_path)
    try:
        await catalog.record_volume(VOLUME, "vfs", "/nonexistent", "serving", None)
        await catalog.add_quota_scope(VOLUME, QSID, None)
        folders = [uuid.uuid4().hex for _ in range(SEED_VFOLDERS)]
        for f in folders:
            await catalog.add_vfolder(VOLUME, QSID, f)
            await catalog.put_usage(VOLUME, QSID, f, used_bytes=1, file_count=1, allocated_bytes=4096, source="scan")
        ids = []
        for _ in range(sessions):
            row = await catalog.create_upload_session(VOLUME, QSID, folders[0], "up.bin", 1 << 40, time.time() + 3600)
            ids.append(row.session_id)
    finally:
        await catalog.close()
    with sqlite3.connect(db_path) as conn:
        mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
    if mode != "wal":
        raise RuntimeError(f"the catalogue is in journal mode {mode}, not WAL")
    return folders, ids


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / TICK


def table(head: tuple[str, ...], rows: list[tuple[Any, ...]]) -> None:
    print(f"{head[0]:27}", *(f"{h:>10}" for h in head[1:]))
    for row in rows:
        print(f"{row[0]:27}", *(f"{v:>10}" for v in row[1:]))


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] * 1000


@dataclasses.dataclass
class Row:
    path: str
    writers: int
    ops: int
    seconds: float
    lat: list[float]
    cpu: float
    commits: float
    errors: list[str]
    reads: tuple[list[float], list[float]] | None


def run_one(
    ctx: Any,
    path: str,
    n: int,
    db: Path,
    sock: str,
    sessions: list[str],
    folders: list[str],
    args: Any,
    with_reader: bool,
) -> Row:
    """One path with N writers (n = 0: no writer, the reader alone)."""
    ready_q, results = ctx.Queue(), ctx.Queue()
    go, t0 = ctx.Event(), ctx.Value("d", 0.0)
    procs = []
    writer = None
    if path in ("b", "ipc") and n:
        for stale in (sock, sock + ".stats"):
            if os.path.exists(stale):
                os.unlink(stale)
        up = ctx.Event()
        writer = ctx.Process(target=writer_main, args=(str(db), sock, path == "ipc", up), daemon=True)
        writer.start()
        if not up.wait(60):
            raise RuntimeError("the writer process did not start")
    c = args.concurrency
    for i in range(n):
        mine = sessions[i * c : (i + 1) * c]
        proc = ctx.Process(
            target=client_main,
            args=(path, str(db), sock, mine, folders, (i, args.seconds, ready_q, go, t0, results)),
            daemon=True,
        )
        proc.start()
        procs.append(proc)
    if with_reader:
        reader = ctx.Process(
            target=reader_main,
            args=(str(db), folders, args.seconds, args.read_rate, ready_q, go, t0, results),
            daemon=True,
        )
        reader.start()
        procs.append(reader)
    for _ in procs:
        ready_q.get(timeout=120)
    start = time.time() + 0.3
    t0.value = start
    go.set()
    pids = [p.pid for p in procs[:n]] + ([writer.pid] if writer else [])
    time.sleep(max(0.0, start - time.time()))
    cpu0 = cpu_seconds(pids)
    w0 = writer_commits(sock + ".stats") if path == "b" and n else 0.0
    time.sleep(max(0.0, start + args.seconds - time.time()))
    cpu1 = cpu_seconds(pids)
    w1 = writer_commits(sock + ".stats") if path == "b" and n else 0.0
    lat: list[float] = []
    errors: list[str] = []
    done_commits = w1 - w0
    reads = None
    for _ in procs:
        idx, got, errs, commits_done = results.get(timeout=60)
        errors += errs
        if idx == -1:
            reads = got
        else:
            lat += got
            done_commits += commits_done
    for p in procs:
        p.join(30)
        if p.is_alive():
            p.kill()
    if writer is not None:
        writer.terminate()
        writer.join(30)
        if writer.is_alive():
            writer.kill()
    return Row(path, n, len(lat), args.seconds, lat, cpu1 - cpu0, done_commits, errors, reads)


NAMES = {
    "a": "(a) own BEGIN IMMEDIATE",
    "b": "(b) WriterHost over IPC",
    "ipc": "ipc round trip, no SQLite",
    "-": "no writer",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="measured window of each run")
    parser.add_argument("--writers", default="1,2,4", help="comma list of writer process counts")
    parser.add_argument("--concurrency", type=int, default=4, help="tasks (requests in flight) per writer process")
    parser.add_argument("--read-rate", type=float, default=100.0, help="(c) reads per second, paced")
    parser.add_argument("--dir", help="where to make the catalogue (default: a temporary directory)")
    args = parser.parse_args()
    counts = [int(x) for x in args.writers.split(",")]
    ctx = mp.get_context("forkserver")  # children fork from one server that has imported these already
    ctx.set_forkserver_preload(["catalog", "catalog.remote", "sqlalchemy", "aiosqlite", "__main__"])
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="writer-paths-") as tmp:
        db = Path(tmp) / "catalog.sqlite"
        sock = str(Path(tmp) / "writer.sock")
        folders, sessions = asyncio.run(seed(db, max(counts) * args.concurrency))
        began = time.time()
        rows = [run_one(ctx, "-", 0, db, sock, sessions, folders, args, True)]
        for n in counts:
            for path in ("a", "b", "ipc"):
                rows.append(run_one(ctx, path, n, db, sock, sessions, folders, args, path != "ipc"))
        took = time.time() - began
    print(
        f"\nwriter paths: {args.seconds:g} s per run, {args.concurrency} tasks per writer process, "
        f"mix 1:1:1 upload offset / usage upsert / vfolder create ({took:.0f} s in all)"
    )
    table(
        ("path", "writers", "ops/s", "p50 ms", "p99 ms", "max ms", "CPU µs/op", "ops/commit", "errors"),
        [
            (
                NAMES[r.path],
                r.writers,
                f"{r.ops / r.seconds:.0f}",
                f"{pct(r.lat, 0.5):.2f}",
                f"{pct(r.lat, 0.99):.2f}",
                f"{max(r.lat, default=0) * 1000:.1f}",
                f"{r.cpu / max(r.ops, 1) * 1e6:.0f}",
                f"{r.ops / r.commits:.1f}" if r.commits and r.path != "ipc" else "-",
                len(r.errors),
            )
            for r in rows
            if r.path != "-"
        ],
    )
    print(f"\n(c) one vfolder's usage row read beside the writes, read-only WAL, {args.read_rate:g}/s paced")
    table(
        ("while", "writers", "aiosqlite p50", "p99 ms", "point p50", "p99 ms"),
        [
            (NAMES[r.path], r.writers, *(f"{pct(v, q):.2f}" for v in r.reads for q in (0.5, 0.99)))
            for r in rows
            if r.reads is not None
        ],
    )
    errors = sorted({e for r in rows for e in r.errors})
    if errors:
        print("\nerrors:", *errors[:5], sep="\n  ")
    print(
        f"\nThis machine: {os.cpu_count()} CPUs shared with other work (load average "
        f"{os.getloadavg()[0]:.1f} at the end). Clients, writer and reader all run on"
        "\nthe same cores, so with more processes than idle cores the figures include waiting for a"
        "\nCPU (p99 most of all) and ops/s cannot grow with N; compare the paths within one run,"
        "\nnot against another run."
    )


if __name__ == "__main__":
    main()
