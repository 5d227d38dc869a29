"""Catalogue writes from other processes (issue 21): WriterHost in one process, Catalog.open_remote in others.

Real processes (tests/catalog_peers.py), a real SQLite file in WAL mode and a real Unix socket.
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import json
import os
import random
import signal
import socket
import sqlite3
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from catalog import Catalog, CatalogError, WriterUnavailable
from catalog.usage_store import UsageStore
from catalog.wire import MAX_FRAME, WriteRefused
from catalog.writes import REMOTE_WRITES, ArgumentError, conform
from tests.support import ROOT

VOLUME, QSID = "vol1", "qs1"
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def run(coro):  # noqa: ANN001, ANN201 - tiny helper for async tests without a plugin
    return asyncio.run(coro)


class Host:
    """The engine side: ``python -m tests.catalog_peers host`` on a real catalogue and socket."""

    def __init__(self, db: Path, sock: Path) -> None:
        self.db, self.sock = db, sock
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> Host:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.catalog_peers", "host", str(self.db), str(self.sock)],
            stdout=subprocess.PIPE, text=True, env=ENV, cwd=ROOT,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # blocks until the host listens (or dies)
        assert line.strip() == "ready", f"host did not start: {line!r}, exit {self.proc.poll()}"
        return self

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(30)

    def stop(self) -> dict[str, int]:
        """SIGTERM: the host finishes what is in flight and reports its counters."""
        assert self.proc is not None and self.proc.stdout is not None
        self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=60)
        assert self.proc.returncode == 0, out
        return json.loads(out.strip().splitlines()[-1])

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    h = Host(tmp_path / "catalog.sqlite", tmp_path / "run" / "writer.sock").start()
    yield h
    if h.alive():
        h.kill()


def rows(db: Path, sql: str) -> list[tuple[Any, ...]]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


# -- raw frames, as a buggy or hostile peer would send them ----------------------------------------------------


class Raw:
    def __init__(self, sock: Path) -> None:
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.settimeout(30)
        self.s.connect(str(sock))

    def send(self, payload: bytes) -> None:
        self.s.sendall(struct.pack(">I", len(payload)) + payload)

    def call(self, message: object) -> dict[str, Any]:
        self.send(json.dumps(message).encode())
        return self.reply()

    def reply(self) -> dict[str, Any]:
        head = self._exact(4)
        return json.loads(self._exact(struct.unpack(">I", head)[0]))

    def _exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.s.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("closed by the host")
            buf += chunk
        return buf

    def closed_by_host(self) -> bool:
        try:
            return self.s.recv(1) == b""
        except ConnectionError:
            return True

    def close(self) -> None:
        self.s.close()


def good_call(folder: str) -> dict[str, Any]:
    return {"call": "Catalog.add_vfolder", "args": {"volume": VOLUME, "qsid": QSID, "folder_id": folder}}


# -- the tests ---------------------------------------------------------------------------------------------------


def test_two_writer_processes_interleaved(host: Host) -> None:
    """Two worker processes write at once through one host: every row lands, every call gets its own result,
    and each worker reads its own writes back at once from its read-only file."""
    count = 60
    writers = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.catalog_peers", "writer", str(host.db), str(host.sock), name, str(count)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT,
        )
        for name in ("w1", "w2")
    ]
    outs = []
    for w in writers:
        out, err = w.communicate(timeout=240)
        assert w.returncode == 0, err
        outs.append(json.loads(out))
    for name, out in zip(("w1", "w2"), outs, strict=True):
        assert out["added"] == [True] * count
        assert out["seen"] == [i + 1 for i in range(count)]  # the usage row it had just written
        sessions = dict(rows(host.db, "SELECT session_id, relpath FROM upload_sessions"))
        assert [sessions[s] for s in out["sessions"]] == [f"{name}/{i}" for i in range(count)]
    folders = {r[0] for r in rows(host.db, f"SELECT folder_id FROM vfolders WHERE state = 'ready' AND qsid = '{QSID}'")}
    assert folders == {f"{n}-{i:04d}" for n in ("w1", "w2") for i in range(count)}
    assert len(rows(host.db, "SELECT 1 FROM vfolder_usage")) == 2 * count
    assert len(rows(host.db, "SELECT 1 FROM vfolder_metadata")) == 2 * count
    assert len(rows(host.db, "SELECT 1 FROM usage_vfolders WHERE rescan_requested IS NOT NULL")) == 2 * count
    stats = host.stop()
    assert stats == {"calls": 2 * count * 5, "refused": 0, "hooked": 2 * count * 5}


def test_refusals_keep_the_host_serving(host: Host) -> None:
    """Names that are not remote writes and arguments that do not fit the signature are refused with an error
    frame and run nothing; the connection goes on. An unreadable frame closes that connection only."""
    raw = Raw(host.sock)
    refusals: list[dict[str, Any]] = [
        {"call": "Catalog.close", "args": {}},
        {"call": "Catalog.open", "args": {"path": "/tmp/x"}},
        {"call": "Catalog.get_vfolder", "args": {"volume": VOLUME, "qsid": QSID, "folder_id": "f"}},
        {"call": "UsageStore.apply", "args": {"changes": []}},
        {"call": "UsageStore.take_rescan_requests", "args": {}},
        {"call": "Database.run_write", "args": {"fn": "os.system"}},
        {"call": "os.system", "args": {"command": "touch /tmp/pwned"}},
        {"call": "Catalog.__init__", "args": {}},
        {"call": 7, "args": {}},
        {"args": {}},
        [1, 2, 3],
        "Catalog.add_vfolder",
        {"call": "Catalog.add_vfolder", "args": [VOLUME, QSID, "f"]},
        {"call": "Catalog.add_vfolder", "args": {"volume": VOLUME, "qsid": QSID}},  # folder_id missing
        {"call": "Catalog.add_vfolder", "args": {"volume": VOLUME, "qsid": QSID, "folder_id": 5}},
        {"call": "Catalog.add_vfolder", "args": {"volume": VOLUME, "qsid": QSID, "folder_id": "f", "adopted": 1}},
        {"call": "Catalog.add_vfolder", "args": {"volume": VOLUME, "qsid": QSID, "folder_id": "f", "evil": True}},
        {"call": "Catalog.set_quota_limit", "args": {"volume": VOLUME, "qsid": QSID, "limit_bytes": True}},
        {"call": "Catalog.set_quota_limit", "args": {"volume": VOLUME, "qsid": QSID, "limit_bytes": 1.5}},
        {"call": "Catalog.set_quota_limit", "args": {"volume": VOLUME, "qsid": QSID, "limit_bytes": "1"}},
        {"call": "UsageStore.request_rescan", "args": {"key": [VOLUME, QSID]}},
        {"call": "UsageStore.request_rescan", "args": {"key": [VOLUME, QSID, None]}},
        {"call": "Catalog.start_job", "args": {"kind": "k", "volume": VOLUME, "params": [1]}},
    ]
    for message in refusals:
        reply = raw.call(message)
        assert reply["ok"] is False and reply["kind"] == "WriteRefused", (message, reply)
        assert reply["msg"]
    assert raw.call(good_call("after-refusals")) == {"ok": True, "result": True}  # same connection
    assert rows(host.db, "SELECT folder_id FROM vfolders") == [("after-refusals",)]
    assert not Path("/tmp/pwned").exists()

    for bad in (b"not json", b"\xff\xfe", b'{"call": "Catalog.add_vfolder", "args": {"volume": NaN}}', b"[" * 100_000):
        raw = Raw(host.sock)
        raw.send(bad)
        reply = raw.reply()
        assert reply["ok"] is False and reply["kind"] == "WriteRefused", (bad[:40], reply)
        assert raw.closed_by_host()
        raw.close()

    big = Raw(host.sock)
    big.s.sendall(struct.pack(">I", MAX_FRAME + 1))  # the length alone: refused before any body is read
    assert big.reply()["kind"] == "WriteRefused"
    assert big.closed_by_host()
    cut = Raw(host.sock)
    cut.s.sendall(struct.pack(">I", 100) + b"{")  # a frame cut short by a dying peer
    cut.close()

    survivor = Raw(host.sock)
    assert survivor.call(good_call("after-garbage")) == {"ok": True, "result": True}
    stats = host.stop()
    assert stats["calls"] == 2 and stats["refused"] == len(refusals) + 5


def _mutate(rng: random.Random, value: Any) -> Any:
    """A JSON value of another kind than ``value``'s."""
    options: list[Any] = [None, True, 3, -1.5, "x", [], {}, [1, "a"], {"k": 1}]
    return rng.choice([o for o in options if type(o) is not type(value) and not (value is None and o is None)])


def test_frame_search_never_runs_what_does_not_fit(host: Host) -> None:
    """Seeded search: every remote write with one argument replaced by a value of the wrong kind, dropped or
    renamed, plus random bytes. Each is refused (never run: the catalogue keeps its rows), the host stays up,
    and a good call still works afterwards."""
    seed = int(os.environ.get("FRAME_SEED", random.randrange(2**32)))
    print(f"FRAME_SEED={seed}")
    rng = random.Random(seed)
    sample: dict[str, Any] = {
        "volume": VOLUME, "qsid": QSID, "folder_id": "f", "limit_bytes": 5, "payload": "{}", "used_bytes": 1,
        "file_count": 1, "allocated_bytes": 1, "source": "scan", "measured_at": 1.0, "stale": False, "relpath": "a",
        "size": 1, "expires_at": 1.0, "incarnation": None, "session_id": "s", "received": 1, "synced": 1,
        "boot_id": None, "state": "open", "kind": "k", "params": {}, "total": None, "job_id": "j", "done": 1,
        "error": None, "name": "v", "backend": "vfs", "path": "/", "state_info": None, "adopted": False,
        "key": [VOLUME, QSID, "f"], "keys": [[VOLUME, QSID, "f"]],
        "totals": {"file_count": 1, "used_bytes": 1, "allocated_bytes": 1, "source": "scan", "stale": False,
                   "measured_at": 1.0},
    }
    before = rows(host.db, "SELECT * FROM quota_scopes")
    raw = Raw(host.sock)
    for _ in range(300):
        spec = REMOTE_WRITES[rng.choice(sorted(REMOTE_WRITES))]
        params = spec.parameters()
        args = {p.name: sample[p.name] for p in params}
        victim = rng.choice(params)
        how = rng.choice(["type", "drop", "rename"])
        if how == "drop" and victim.default is inspect.Parameter.empty:
            del args[victim.name]
        elif how == "rename":
            args[victim.name + "_"] = args.pop(victim.name)
        else:
            args[victim.name] = _mutate(rng, args[victim.name])
        try:  # the mutation may still fit (e.g. None for an optional); those are not what this test is about
            spec.check(json.loads(json.dumps(args)))
        except ArgumentError:
            reply = raw.call({"call": spec.name, "args": args})
            assert reply["ok"] is False and reply["kind"] == "WriteRefused", (spec.name, args, reply)
        if rng.random() < 0.05:
            junk = Raw(host.sock)
            junk.s.sendall(rng.randbytes(rng.randrange(1, 64)))
            junk.close()
    assert rows(host.db, "SELECT * FROM quota_scopes") == before
    assert rows(host.db, "SELECT * FROM vfolders") == []
    assert raw.call(good_call("after-search")) == {"ok": True, "result": True}
    assert host.alive()


def test_host_down_then_restarted(host: Host) -> None:
    """No host: a write waits ``wait`` seconds and raises WriterUnavailable naming the engine; reads still
    answer from the file. The host comes back (its stale socket file replaced): the same catalogue reconnects."""

    async def scenario() -> None:
        catalog = await Catalog.open_remote(host.db, host.sock, wait=1.0)
        try:
            assert await catalog.add_vfolder(VOLUME, QSID, "before") is True
            host.kill()  # SIGKILL: the socket file stays behind
            assert host.sock.exists()
            began = time.monotonic()
            with pytest.raises(WriterUnavailable, match="storage-agent engine process is not answering"):
                await catalog.add_vfolder(VOLUME, QSID, "while-down")
            assert time.monotonic() - began >= 1.0  # it did wait for the engine
            assert isinstance(WriterUnavailable("x"), CatalogError)
            assert (await catalog.get_vfolder(VOLUME, QSID, "before")) is not None  # reads go on
            scope = await catalog.get_quota_scope(VOLUME, QSID)
            assert scope is not None and scope.state == "active"
            await asyncio.to_thread(host.start)
            assert await catalog.add_vfolder(VOLUME, QSID, "after") is True
            assert {v.folder_id for v in await catalog.vfolders(VOLUME)} == {"before", "after"}
        finally:
            await catalog.close()

    run(scenario())


def test_socket_is_private_and_taken_once(host: Host, tmp_path: Path) -> None:
    """The socket is the agent user's alone (0600); a second host on a live socket, or a path that is not a
    socket, is refused instead of stealing it."""
    from catalog.remote import WriterHost

    assert stat.S_IMODE(host.sock.stat().st_mode) == 0o600 and stat.S_ISSOCK(host.sock.stat().st_mode)
    not_a_socket = tmp_path / "plain"
    not_a_socket.write_text("keep me")

    async def scenario() -> None:
        catalog = await Catalog.open(host.db, check=False)
        try:
            second = WriterHost(catalog, host.sock)
            with pytest.raises(CatalogError, match="another catalogue writer host is listening"):
                await second.start()
            await second.stop()  # a failed start's clean-up leaves the live host's socket alone
            with pytest.raises(CatalogError, match="not a socket"):
                await WriterHost(catalog, not_a_socket).start()
        finally:
            await catalog.close()

    run(scenario())
    assert not_a_socket.read_text() == "keep me"
    assert Raw(host.sock).call(good_call("still-served")) == {"ok": True, "result": True}


def test_stalled_host_is_unavailable_after_reply_wait(host: Host) -> None:
    """A host that accepts but does not answer (SIGSTOP: a stalled engine) is WriterUnavailable after
    ``reply_wait``; once it runs again the next write goes through on a fresh connection."""
    assert host.proc is not None

    async def scenario() -> None:
        catalog = await Catalog.open_remote(host.db, host.sock, wait=1.0, reply_wait=1.0)
        try:
            assert await catalog.add_vfolder(VOLUME, QSID, "before") is True
            os.kill(host.proc.pid, signal.SIGSTOP)
            try:
                with pytest.raises(WriterUnavailable, match="no answer to Catalog.add_vfolder within 1 s"):
                    await catalog.add_vfolder(VOLUME, QSID, "stalled")
            finally:
                os.kill(host.proc.pid, signal.SIGCONT)
            assert await catalog.add_vfolder(VOLUME, QSID, "after") is True
        finally:
            await catalog.close()

    run(scenario())


def test_write_waits_for_a_host_that_starts_late(tmp_path: Path) -> None:
    """A worker may start before the engine listens: a write within ``wait`` goes through once it is up."""
    h = Host(tmp_path / "catalog.sqlite", tmp_path / "writer.sock")

    async def scenario() -> None:
        await asyncio.to_thread(h.db.touch)  # not a catalogue yet: open_remote waits for the engine to make it
        opening = asyncio.create_task(Catalog.open_remote(h.db, h.sock, wait=60.0))
        await asyncio.sleep(0.3)
        assert not opening.done()
        await asyncio.to_thread(h.start)
        catalog = await opening
        try:
            assert await catalog.add_vfolder(VOLUME, QSID, "late") is True
        finally:
            await catalog.close()

    h.db.unlink(missing_ok=True)
    try:
        run(scenario())
    finally:
        if h.alive():
            h.kill()


def test_errors_come_back_as_the_same_kind(host: Host) -> None:
    """An exception of the host's call is raised in the worker as the same kind a local call raises."""
    import sqlalchemy as sa

    con = sqlite3.connect(host.db, timeout=30)  # a constraint only SQLite knows: a trigger that refuses a name
    con.execute(
        "CREATE TRIGGER no_conflict BEFORE INSERT ON vfolders WHEN NEW.folder_id = 'conflict' "
        "BEGIN SELECT RAISE(ABORT, 'refused by a trigger'); END"
    )
    con.commit()
    con.close()

    async def scenario() -> None:
        local = await Catalog.open(host.db, check=False)
        catalog = await Catalog.open_remote(host.db, host.sock, wait=5.0)
        try:
            with pytest.raises(sa.exc.IntegrityError) as here:
                await local.add_vfolder(VOLUME, QSID, "conflict")
            with pytest.raises(sa.exc.IntegrityError, match="refused by a trigger") as there:
                await catalog.add_vfolder(VOLUME, QSID, "conflict")
            assert type(there.value.orig) is type(here.value.orig) is sqlite3.IntegrityError
            assert await catalog.add_vfolder(VOLUME, QSID, "fine") is True  # the connection goes on
            with pytest.raises(CatalogError, match="read-only"):  # not a remote write: the read-only file refuses
                await UsageStore(catalog.db).forget_orphans()
        finally:
            await catalog.close()
            await local.close()

    run(scenario())


def test_reads_see_commits_at_once(host: Host) -> None:
    """A worker's read right after another process's write returns sees it (WAL, no cache in between)."""

    async def scenario() -> None:
        a = await Catalog.open_remote(host.db, host.sock)
        b = await Catalog.open_remote(host.db, host.sock)
        try:
            for i in range(50):
                folder = f"f{i}"
                await a.add_vfolder(VOLUME, QSID, folder)
                await a.put_usage(VOLUME, QSID, folder, used_bytes=i, file_count=i, allocated_bytes=i, source="scan")
                got = await b.get_usage(VOLUME, QSID, folder)
                assert got is not None and got.used_bytes == i
                await b.set_metadata(VOLUME, QSID, folder, str(i))
                assert await a.get_metadata(VOLUME, QSID, folder) == str(i)
            assert await b.scope_used_bytes(VOLUME, QSID) == sum(range(50))
        finally:
            await a.close()
            await b.close()

    run(scenario())


def test_many_calls_in_flight_and_a_stop_midway(host: Host) -> None:
    """Hundreds of concurrent writes from one worker (more than its connection cap) all get their own answer;
    then the host is stopped (SIGTERM) under such a burst: every call that reported success has its row, and
    every other one failed with WriterUnavailable (never a silent loss, never another error)."""

    async def scenario() -> None:
        catalog = await Catalog.open_remote(host.db, host.sock, wait=0.5)
        try:
            results = await asyncio.gather(*(catalog.add_vfolder(VOLUME, QSID, f"a{i}") for i in range(300)))
            assert results == [True] * 300
            burst = [asyncio.create_task(catalog.add_vfolder(VOLUME, QSID, f"b{i}")) for i in range(300)]
            await asyncio.sleep(0.05)
            await asyncio.to_thread(host.stop)
            done = await asyncio.gather(*burst, return_exceptions=True)
        finally:
            await catalog.close()
        present = {r[0] for r in rows(host.db, "SELECT folder_id FROM vfolders")}
        for i, outcome in enumerate(done):
            if outcome is True:
                assert f"b{i}" in present
            else:
                assert isinstance(outcome, WriterUnavailable), outcome
        assert {f"a{i}" for i in range(300)} <= present

    run(scenario())


def test_point_reads_match_the_pool(tmp_path: Path) -> None:
    """Seeded: the plain-sqlite3 point reads and the aiosqlite path answer the same rows (one query each)."""
    seed = int(os.environ.get("POINT_SEED", random.randrange(2**32)))
    print(f"POINT_SEED={seed}")
    rng = random.Random(seed)

    async def scenario() -> None:
        catalog = await Catalog.open(tmp_path / "c.sqlite")
        try:
            folders = [f"f{i}" for i in range(20)]
            sessions = []
            for f in folders:
                qsid = rng.choice(["q1", "q2"])
                await catalog.add_quota_scope(VOLUME, qsid, rng.choice([None, rng.randrange(2**40)]))
                await catalog.add_vfolder(VOLUME, qsid, f)
                if rng.random() < 0.7:
                    n = rng.randrange(2**40)
                    await catalog.put_usage(VOLUME, qsid, f, used_bytes=n, file_count=n % 999, allocated_bytes=n + 1,
                                            source="scan", stale=rng.random() < 0.5)
                if rng.random() < 0.5:
                    await catalog.set_metadata(VOLUME, qsid, f, rng.choice(["", "{}", "é\x00"]))
                relpath = rng.choice(["r", "d/é", os.fsdecode(b"not-utf8-\xff")])  # a BLOB in the FsName column
                sessions.append((await catalog.create_upload_session(VOLUME, qsid, f, relpath, 1, 2.5)).session_id)
            points = catalog.points

            async def both(coro_fn: Any, *args: Any) -> None:
                catalog.points = points
                fast = await coro_fn(*args)
                catalog.points = None
                pooled = await coro_fn(*args)
                assert repr(fast) == repr(pooled), (coro_fn.__name__, args)  # types too: 0 is not False

            for _ in range(100):
                qsid, f = rng.choice(["q1", "q2", "q3"]), rng.choice([*folders, "nope"])
                await both(catalog.get_vfolder, VOLUME, qsid, f)
                await both(catalog.get_usage, VOLUME, qsid, f)
                await both(catalog.get_metadata, VOLUME, qsid, f)
                await both(catalog.get_quota_scope, VOLUME, qsid)
                await both(catalog.scope_used_bytes, VOLUME, qsid)
                await both(catalog.get_upload_session, rng.choice([*sessions, "nope"]))
            catalog.points = points
        finally:
            await catalog.close()

    run(scenario())


@pytest.mark.filterwarnings("ignore::aiohttp.web.NotAppKeyWarning")  # the middleware's request key, as in the agent
def test_unavailable_engine_is_a_503_naming_it(tmp_path: Path) -> None:
    """The one error mapper answers WriterUnavailable with a 503 whose msg names the engine (no traceback)."""
    from agent.http.errors import error_middleware

    h = Host(tmp_path / "catalog.sqlite", tmp_path / "writer.sock").start()

    async def scenario() -> None:
        catalog = await Catalog.open_remote(h.db, h.sock, wait=0.5)
        h.stop()

        async def handler(_request: web.Request) -> web.Response:
            await catalog.add_vfolder(VOLUME, QSID, "f")
            return web.json_response({})

        app = web.Application(middlewares=[error_middleware])
        app.router.add_post("/folder", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        try:
            async with aiohttp.ClientSession() as s, s.post(f"http://127.0.0.1:{port}/folder") as r:
                body = await r.json()
                assert r.status == 503, body
                assert "storage-agent engine process is not answering" in body["msg"]
        finally:
            await runner.cleanup()
            await catalog.close()

    run(scenario())


# -- which methods are remote writes ----------------------------------------------------------------------------

ENGINE_ONLY = {
    "Catalog.forget_finished_jobs",  # agent/engine/orphans.py
    "UsageStore.apply",
    "UsageStore.forget_orphans",
    "UsageStore.take_rescan_requests",
}


def _writers() -> Iterator[tuple[str, bool]]:
    """(Class.method, marked @writes) for every method of Catalog and UsageStore that writes."""
    for module in ("catalog/store.py", "catalog/usage_store.py"):
        tree = ast.parse((ROOT / module).read_text())
        for cls in (n for n in tree.body if isinstance(n, ast.ClassDef) and n.name in ("Catalog", "UsageStore")):
            for fn in (n for n in cls.body if isinstance(n, ast.AsyncFunctionDef)):
                calls = {
                    n.func.attr for n in ast.walk(fn) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
                }
                if calls & {"run_write", "execute_write"}:
                    marked = any(isinstance(d, ast.Name) and d.id == "writes" for d in fn.decorator_list)
                    yield f"{cls.name}.{fn.name}", marked


def test_every_write_is_marked_or_engine_only() -> None:
    """A new write method must be either a remote write or named here as the engine's own."""
    writers = dict(_writers())
    assert {name for name, marked in writers.items() if not marked} == ENGINE_ONLY
    assert {name for name, marked in writers.items() if marked} == set(REMOTE_WRITES)


def test_http_side_writes_are_all_remote() -> None:
    """Every catalogue write the HTTP side calls is a remote write (a worker would fail on it otherwise)."""
    writers = dict(_writers())
    called = set()
    for path in (ROOT / "agent" / "http").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Attribute)
                and node.value.attr == "catalog"
                and f"Catalog.{node.attr}" in writers
            ):
                called.add(f"Catalog.{node.attr}")
    assert called, "the HTTP side makes catalogue writes"
    assert called <= set(REMOTE_WRITES)


def test_conform_is_strict() -> None:
    """bool is not an int, an int is a float, a tuple travels as an array of the right length."""
    assert conform(3, float, "x") == 3.0 and isinstance(conform(3, float, "x"), float)
    for value, hint in ((True, int), (1, bool), (1.0, int), ("1", int), ([1, 2], tuple[int, int, int]), (None, str)):
        with pytest.raises(ArgumentError):
            conform(value, hint, "x")
    assert conform(["a", "b", "c"], tuple[str, str, str], "x") == ("a", "b", "c")
    assert issubclass(WriteRefused, CatalogError)


def _strategy(hint: Any) -> Any:
    """Values of a remote write's parameter type (hypothesis), JSON-able ones only."""
    import dataclasses
    import types
    import typing

    from hypothesis import strategies as st

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return st.recursive(st.none() | st.booleans() | st.integers() | st.text(), lambda x: st.lists(x, max_size=3))
    if hint is type(None):
        return st.none()
    if origin in (typing.Union, types.UnionType):
        return st.one_of(*(_strategy(a) for a in args))
    if hint is str:
        return st.text()  # any code points, lone surrogates included (surrogateescape'd names)
    if hint is bool:
        return st.booleans()
    if hint is int:
        return st.integers(-(2**63), 2**63 - 1)
    if hint is float:
        return st.floats(allow_nan=False, allow_infinity=False)
    if origin is tuple:
        return st.tuples(*(_strategy(a) for a in args))
    if origin is dict:
        return st.dictionaries(st.text(), _strategy(args[1]), max_size=3)
    if origin is not None:  # list / Iterable / Sequence
        return st.lists(_strategy(args[0]), max_size=3)
    if dataclasses.is_dataclass(hint):
        hints = typing.get_type_hints(hint)
        return st.builds(hint, **{f.name: _strategy(hints[f.name]) for f in dataclasses.fields(hint)})
    raise AssertionError(f"no strategy for {hint}")


def test_every_remote_write_round_trips_its_arguments() -> None:
    """Search: for every remote write, arguments drawn from its own type hints survive the trip (encode, frame,
    decode, typed check) unchanged; so the host runs exactly the call the worker made."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from catalog.wire import decode, encode

    specs = sorted(REMOTE_WRITES.values(), key=lambda s: s.name)

    @settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.data())
    def trip(data: st.DataObject) -> None:
        spec = data.draw(st.sampled_from(specs))
        kwargs = {p.name: data.draw(_strategy(spec.hints[p.name]), label=p.name) for p in spec.parameters()}
        frame = encode({"call": spec.name, "args": spec.arguments((), kwargs)})
        assert len(frame) <= MAX_FRAME
        assert spec.check(decode(frame[4:])["args"]) == kwargs, spec.name

    trip()
