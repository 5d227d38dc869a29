"""Opening the SQLite file: pragmas, transactions, one writer, schema upgrades."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from catalog.metrics import WRITE_SECONDS
from catalog.migrations import SCHEMA_VERSION, STEPS

log = logging.getLogger(__name__)

BUSY_TIMEOUT_MS = 10_000


class CatalogError(Exception):
    """The catalogue file cannot be used (newer schema, unreadable, corrupt)."""


class CatalogCorrupt(CatalogError):
    """The catalogue file itself is damaged or is not a SQLite database (``serve`` sets it aside)."""

    def __init__(self, message: str, detail: str) -> None:
        super().__init__(message)
        self.detail = detail  # what SQLite said, without the path


def _engine(path: Path, *, readonly: bool, begin: str) -> AsyncEngine:
    if readonly:
        url = f"sqlite+aiosqlite:///file:{path}?mode=ro&uri=true"
    else:
        url = f"sqlite+aiosqlite:///{path}"
    # The writer keeps one connection; readers get a small pool (WAL lets them run beside it).
    kwargs = {"pool_size": 1, "max_overflow": 0} if begin == "BEGIN IMMEDIATE" else {"pool_size": 4}
    engine = create_async_engine(url, **kwargs)

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_conn, _record) -> None:  # noqa: ANN001 - DB-API connection
        # Let SQLAlchemy decide where transactions begin (pysqlite would skip DDL otherwise).
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        if not readonly:
            cur.execute("PRAGMA journal_mode = WAL")
        cur.execute("PRAGMA synchronous = NORMAL")
        cur.execute("PRAGMA foreign_keys = ON")
        cur.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn) -> None:  # noqa: ANN001 - sync Connection
        conn.exec_driver_sql(begin)

    return engine


class Database:
    """A reader engine and a single-writer engine over one SQLite file.

    Writes are serialised by an asyncio lock *and* ``BEGIN IMMEDIATE``, so other
    processes (``storage-agent scan``, the FUSE view) see whole transactions only.
    """

    def __init__(self, path: Path, *, readonly: bool = False) -> None:
        self.path = path
        self.readonly = readonly
        self._reader = _engine(path, readonly=readonly, begin="BEGIN")
        self._writer = None if readonly else _engine(path, readonly=False, begin="BEGIN IMMEDIATE")
        self._write_lock = asyncio.Lock()

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        async with self._reader.connect() as conn:
            yield conn

    @asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncConnection]:
        if self._writer is None:
            raise CatalogError(f"catalogue {self.path} is open read-only")
        started = time.perf_counter()
        try:
            async with self._write_lock, self._writer.begin() as conn:
                yield conn
        finally:
            WRITE_SECONDS.observe(time.perf_counter() - started)

    async def schema_version(self) -> int:
        async with self.read() as conn:
            return (await conn.exec_driver_sql("PRAGMA user_version")).scalar_one()

    async def upgrade(self, target: int = SCHEMA_VERSION) -> tuple[int, int]:
        """Apply the missing steps up to ``target``; returns (from, to)."""
        async with self.write() as conn:
            current = (await conn.exec_driver_sql("PRAGMA user_version")).scalar_one()
            if current > SCHEMA_VERSION:
                raise CatalogError(
                    f"catalogue {self.path} has schema version {current}, newer than this agent's "
                    f"{SCHEMA_VERSION}: upgrade storage-agent or point [catalog] path elsewhere"
                )
            for version in range(current + 1, target + 1):
                for ddl in STEPS[version - 1]:
                    await conn.exec_driver_sql(ddl)
                await conn.exec_driver_sql(f"PRAGMA user_version = {version}")
        if current < target:
            log.info("catalogue %s upgraded from schema %d to %d", self.path, current, target)
        return current, max(current, target)

    async def close(self) -> None:
        await self._reader.dispose()
        if self._writer is not None:
            await self._writer.dispose()


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


__all__ = ["BUSY_TIMEOUT_MS", "CatalogCorrupt", "CatalogError", "Database", "check_integrity"]
