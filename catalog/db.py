"""Opening the SQLite file: pragmas, the writer thread (group commit), schema upgrades.

Reads go through an aiosqlite engine (a small pool; WAL lets them run beside the writer). Writes go to
one thread that owns the only writing connection, a plain synchronous SQLAlchemy Core one. A caller hands
it a function ``fn(conn) -> result`` (:meth:`Database.run_write`); the thread takes everything queued at
that moment, runs each function in its own SAVEPOINT inside one ``BEGIN IMMEDIATE`` transaction, commits
once and only then wakes the callers. A write therefore costs the event loop one round trip however many
statements it runs (the async writer paid one per statement, each waiting for a turn of a busy loop), and
concurrent writers share one commit.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from catalog.metrics import COMMITS, WRITE_SECONDS
from catalog.migrations import SCHEMA_VERSION, STEPS

if TYPE_CHECKING:
    from catalog.wire import WriterClient

log = logging.getLogger(__name__)

BUSY_TIMEOUT_MS = 10_000
SWITCH_INTERVAL = 0.0005  # seconds; see _Writer.start

T = TypeVar("T")

ThreadHook = Callable[[int], None]
_thread_hook: ThreadHook = lambda tid: None  # noqa: E731


def set_thread_hook(hook: ThreadHook) -> None:
    """Call ``hook(tid)`` (0: the calling thread) in or for each thread the catalogue starts: its writer and
    aiosqlite's reader threads. The agent uses it to place them beside its own (``cpu_placement``); the
    catalogue itself stays free of agent and backend code."""
    global _thread_hook
    _thread_hook = hook


class CatalogError(Exception):
    """The catalogue file cannot be used (newer schema, unreadable, corrupt)."""


class WriterUnavailable(CatalogError):
    """A worker's catalogue cannot reach the engine's writer (not started, stopped, stalled): the write was not
    made, or (the connection broke mid-call) may not have been; the HTTP side answers 503."""


class CatalogCorrupt(CatalogError):
    """The catalogue file itself is damaged or is not a SQLite database (``serve`` sets it aside)."""

    def __init__(self, message: str, detail: str) -> None:
        super().__init__(message)
        self.detail = detail  # what SQLite said, without the path


def _configure(engine: sa.Engine, *, readonly: bool, begin: str) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record) -> None:  # noqa: ANN001 - DB-API connection
        # Let SQLAlchemy decide where transactions begin (pysqlite would skip DDL and SAVEPOINTs otherwise).
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        if not readonly:
            cur.execute("PRAGMA journal_mode = WAL")
        cur.execute("PRAGMA synchronous = NORMAL")
        cur.execute("PRAGMA foreign_keys = ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn) -> None:  # noqa: ANN001 - sync Connection
        conn.exec_driver_sql(begin)


def _reader_engine(path: Path, *, readonly: bool) -> AsyncEngine:
    url = f"sqlite+aiosqlite:///file:{path}?mode=ro&uri=true" if readonly else f"sqlite+aiosqlite:///{path}"
    engine = create_async_engine(url, pool_size=4)
    _configure(engine.sync_engine, readonly=readonly, begin="BEGIN")

    @event.listens_for(engine.sync_engine, "connect")
    def _background(dbapi_conn, _record) -> None:  # noqa: ANN001 - DB-API connection
        # aiosqlite runs each connection on a thread of its own: a worker, not the event loop (this hook
        # itself runs on the event loop's thread, so the thread is named by its id)
        thread = getattr(getattr(dbapi_conn, "driver_connection", None), "_thread", None)
        if thread is not None and thread.native_id is not None:
            _thread_hook(thread.native_id)

    return engine


def _writer_engine(path: Path) -> sa.Engine:
    """The writer thread's engine; ``BEGIN IMMEDIATE`` so other processes never see half a transaction."""
    engine = sa.create_engine(f"sqlite:///{path}", poolclass=sa.pool.NullPool)
    _configure(engine, readonly=False, begin="BEGIN IMMEDIATE")
    return engine


@dataclass(eq=False)
class _Job:
    fn: Callable[[Connection], Any]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]
    result: Any = None
    error: BaseException | None = None


def _wake(jobs: list[_Job]) -> None:
    for job in jobs:
        if job.future.done():  # the caller was cancelled
            continue
        if job.error is not None:
            job.future.set_exception(job.error)
        else:
            job.future.set_result(job.result)


class _Writer(threading.Thread):
    """The one thread that writes: drains the queue into one transaction per batch (group commit)."""

    def __init__(self, path: Path) -> None:
        super().__init__(name=f"catalog-writer {path.name}", daemon=True)
        self.engine = _writer_engine(path)
        self.jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()  # None: stop after what came before
        self._conn: Connection | None = None

    def start(self) -> None:
        # The writer needs the GIL for a moment around each SQLite call. While a saturated event loop holds
        # it, CPython hands it over only once per switch interval (5 ms by default), so a batch of N jobs
        # took N x ~15 ms; at 0.5 ms a saturated loop's writes ran ~40x faster (4000 upserts: 170 s -> 3.4 s).
        sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL))
        super().start()

    def run(self) -> None:
        _thread_hook(0)
        stop = False
        while not stop:
            first = self.jobs.get()
            if first is None:
                break
            batch = [first]
            while True:
                try:
                    job = self.jobs.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    stop = True
                    break
                batch.append(job)
            todo = [j for j in batch if not j.future.cancelled()]
            while todo:
                todo = self._transaction(todo)
            self._settle(batch)
        if self._conn is not None:
            self._conn.close()
        self.engine.dispose()

    def _transaction(self, jobs: list[_Job]) -> list[_Job]:
        """Run ``jobs`` in one transaction, each in a SAVEPOINT; returns those to run again.

        A failing function only rolls back its own savepoint. But some errors (disk full, I/O) make SQLite
        abandon the whole transaction: then the failing job keeps its error and the others run again in a
        new one, so a function must only touch the connection.
        """
        try:
            if self._conn is None:
                self._conn = self.engine.connect()
            conn = self._conn
            tx = conn.begin()
            raw = conn.connection.driver_connection  # the sqlite3.Connection
            assert raw is not None  # a live connection (engine.connect() just gave it) always has one
        except Exception as e:  # cannot connect (corrupt, unreadable) or BEGIN IMMEDIATE timed out
            self._reset()
            for job in jobs:
                job.error = e
            return []
        for i, job in enumerate(jobs):
            try:
                # plain SQL on the DB-API connection: SQLAlchemy's begin_nested() costs ~10x more per job
                raw.execute("SAVEPOINT job")
                job.result = job.fn(conn)
                raw.execute("RELEASE job")
            except BaseException as e:  # not only Exception: the thread must live on to answer the others
                job.result, job.error = None, e
                if raw.in_transaction:
                    try:
                        raw.execute("ROLLBACK TO job")
                        raw.execute("RELEASE job")
                        continue
                    except Exception:
                        pass
                self._reset()
                return [j for j in jobs[:i] if j.error is None] + jobs[i + 1 :]
        try:
            tx.commit()
        except Exception as e:  # nothing of this batch is on disk
            self._reset()
            for job in jobs:
                if job.error is None:
                    job.result, job.error = None, e
        else:
            COMMITS.inc()
        return []

    def _reset(self) -> None:
        """Roll back whatever is open; a connection that cannot even do that is dropped (reopened next time)."""
        if self._conn is None:
            return
        try:
            self._conn.rollback()
        except Exception:
            self._conn.invalidate()
            self._conn.close()
            self._conn = None

    @staticmethod
    def _settle(batch: list[_Job]) -> None:
        """Wake the callers: one ``call_soon_threadsafe`` per event loop per batch."""
        by_loop: dict[asyncio.AbstractEventLoop, list[_Job]] = {}
        for job in batch:
            by_loop.setdefault(job.loop, []).append(job)
        for loop, jobs in by_loop.items():
            try:
                loop.call_soon_threadsafe(_wake, jobs)
            except RuntimeError:  # that loop is closed: nobody is waiting any more
                pass


class Database:
    """A reader engine and the single writer thread over one SQLite file."""

    def __init__(self, path: Path, *, readonly: bool = False) -> None:
        self.path = path
        self.readonly = readonly
        self._reader = _reader_engine(path, readonly=readonly)
        self._writer: _Writer | None = None  # started by the first write
        self._closed = False
        # A worker's catalogue: @writes methods go to the engine through this (catalog/writes.py)
        self.remote: WriterClient | None = None

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        async with self._reader.connect() as conn:
            yield conn

    def _submit(self, fn: Callable[[Connection], Any]) -> asyncio.Future[Any]:
        if self.readonly:
            raise CatalogError(f"catalogue {self.path} is open read-only")
        if self._closed:
            raise CatalogError(f"catalogue {self.path} is closed")
        if self._writer is None:
            self._writer = _Writer(self.path)
            self._writer.start()
        loop = asyncio.get_running_loop()
        job = _Job(fn, loop, loop.create_future())
        self._writer.jobs.put(job)
        return job.future

    async def run_write(self, fn: Callable[[Connection], T]) -> T:
        """Run ``fn(conn)`` on the writer thread in a write transaction; its result once committed.

        ``fn`` runs in its own SAVEPOINT, possibly beside other callers' functions in the same transaction:
        its exception rolls back only its own work and is raised here. It must only use ``conn`` (no event
        loop, no other I/O): it blocks the writer while it runs, and may run again if SQLite abandons the
        shared transaction. Cancelling the caller before ``fn`` started skips it; later, it still commits.
        """
        future = self._submit(fn)
        started = time.perf_counter()
        try:
            return await future
        finally:
            WRITE_SECONDS.observe(time.perf_counter() - started)

    async def execute_write(self, *statements: sa.Executable) -> None:
        """Run ``statements`` in order as one write (see :meth:`run_write`)."""

        def run(conn: Connection) -> None:
            for statement in statements:
                conn.execute(statement)

        await self.run_write(run)

    async def schema_version(self) -> int:
        async with self.read() as conn:
            return (await conn.exec_driver_sql("PRAGMA user_version")).scalar_one()

    async def upgrade(self, target: int = SCHEMA_VERSION) -> tuple[int, int]:
        """Apply the missing steps up to ``target``, all in one transaction; returns (from, to)."""

        def steps(conn: Connection) -> int:
            current = conn.exec_driver_sql("PRAGMA user_version").scalar_one()
            if current > SCHEMA_VERSION:
                raise CatalogError(
                    f"catalogue {self.path} has schema version {current}, newer than this agent's "
                    f"{SCHEMA_VERSION}: upgrade storage-agent or point [catalog] path elsewhere"
                )
            for version in range(current + 1, target + 1):
                for ddl in STEPS[version - 1]:
                    conn.exec_driver_sql(ddl)
                conn.exec_driver_sql(f"PRAGMA user_version = {version}")
            return current

        current = await self.run_write(steps)
        if current < target:
            log.info("catalogue %s upgraded from schema %d to %d", self.path, current, target)
        return current, max(current, target)

    async def close(self) -> None:
        """Refuse new writes, let the writer commit what is already queued and stop, close the readers."""
        self._closed = True
        if self.remote is not None:
            await self.remote.close()
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.jobs.put(None)
            await asyncio.to_thread(writer.join)
        await self._reader.dispose()


async def check_integrity(db: Database) -> str:
    """``ok``, or the first problems ``PRAGMA quick_check`` found (it lists up to 100 rows).

    quick_check reads every page once but skips the index-content cross-checks of a full
    integrity_check, so it stays linear and cheap enough for every start.
    """
    async with db.read() as conn:
        rows = list((await conn.execute(sa.text("PRAGMA quick_check"))).scalars())
    if rows == ["ok"]:
        return "ok"
    return "; ".join(str(r) for r in rows[:3]) + (f" (and {len(rows) - 3} more)" if len(rows) > 3 else "")


__all__ = ["BUSY_TIMEOUT_MS", "CatalogCorrupt", "CatalogError", "Database", "WriterUnavailable", "check_integrity"]
