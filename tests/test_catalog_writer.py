"""The catalogue's writer thread: group commit, savepoints per caller, commit before results, clean close."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection

from catalog import Catalog
from catalog import db as dbmod
from catalog.db import CatalogError, Database


def run(coro):  # noqa: ANN001, ANN201 - tiny helper for async tests without a plugin
    return asyncio.run(coro)


@pytest.fixture
def commits(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every COMMIT the writer thread issues."""
    seen: list[str] = []
    plain = dbmod._writer_engine

    def engine(path: Path) -> sa.Engine:
        eng = plain(path)
        event.listen(eng, "commit", lambda _conn: seen.append("COMMIT"))
        return eng

    monkeypatch.setattr(dbmod, "_writer_engine", engine)
    return seen


def insert(n: int, *, fail: bool = False) -> Callable[[Connection], int]:
    def fn(conn: Connection) -> int:
        conn.exec_driver_sql("INSERT INTO t (id) VALUES (?)", (n,))
        if fail:
            raise ValueError(f"job {n} failed after its insert")
        return n

    return fn


def rows(path: Path) -> list[int]:
    """What another process would see: committed rows only."""
    con = sqlite3.connect(path)
    try:
        return [r for (r,) in con.execute("SELECT id FROM t ORDER BY id")]
    finally:
        con.close()


async def _open(path: Path) -> Database:
    db = Database(path)
    await db.execute_write(sa.text("CREATE TABLE t (id INTEGER PRIMARY KEY)"))
    return db


async def _hold_writer(db: Database) -> tuple[threading.Event, asyncio.Future[None]]:
    """Keep the writer busy in a job of its own until the returned event is set (what follows queues up)."""
    entered, gate = threading.Event(), threading.Event()

    def hold(_conn: Connection) -> None:
        entered.set()
        gate.wait(10)

    held = asyncio.ensure_future(db.run_write(hold))
    assert await asyncio.to_thread(entered.wait, 10)
    return gate, held


def test_concurrent_writers_share_one_commit(tmp_path: Path, commits: list[str]) -> None:
    async def main() -> None:
        db = await _open(tmp_path / "c.db")
        gate, held = await _hold_writer(db)
        before = len(commits)
        writes = [asyncio.ensure_future(db.run_write(insert(n))) for n in range(100)]
        await asyncio.sleep(0.05)
        assert not any(w.done() for w in writes)
        gate.set()
        assert await asyncio.gather(*writes) == list(range(100))
        await held
        assert len(commits) - before == 2  # the held job's transaction, then one for all 100
        await db.close()

    run(main())
    assert rows(tmp_path / "c.db") == list(range(100))


def test_a_failing_writer_rolls_back_only_its_own_work(tmp_path: Path, commits: list[str]) -> None:
    async def main() -> None:
        db = await _open(tmp_path / "c.db")
        await db.run_write(insert(7))
        gate, held = await _hold_writer(db)
        before = len(commits)
        jobs = [
            db.run_write(insert(1)),
            db.run_write(insert(2, fail=True)),  # a Python error after its insert
            db.run_write(insert(7)),  # a SQL error: the primary key is taken
            db.run_write(insert(3)),
        ]
        tasks = [asyncio.ensure_future(j) for j in jobs]
        await asyncio.sleep(0.05)
        gate.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        await held
        assert results[0] == 1 and results[3] == 3
        assert isinstance(results[1], ValueError)
        assert isinstance(results[2], sa.exc.IntegrityError)
        assert len(commits) - before == 2
        await db.close()

    run(main())
    assert rows(tmp_path / "c.db") == [1, 3, 7]


def test_when_sqlite_abandons_the_transaction_the_others_run_again(tmp_path: Path) -> None:
    """Disk full or an I/O error can make SQLite roll the whole transaction back: only the culprit fails."""

    def abandon(conn: Connection) -> None:
        conn.exec_driver_sql("INSERT INTO t (id) VALUES (50)")
        conn.connection.driver_connection.execute("ROLLBACK")  # what SQLite does on its own then
        raise sqlite3.OperationalError("database or disk is full")

    async def main() -> None:
        db = await _open(tmp_path / "c.db")
        gate, held = await _hold_writer(db)
        tasks = [asyncio.ensure_future(db.run_write(f)) for f in (insert(1), abandon, insert(2))]
        await asyncio.sleep(0.05)
        gate.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        await held
        assert results[0] == 1 and results[2] == 2
        assert isinstance(results[1], sqlite3.OperationalError)
        await db.close()

    run(main())
    assert rows(tmp_path / "c.db") == [1, 2]


def test_a_result_is_returned_only_once_its_transaction_committed(tmp_path: Path) -> None:
    path = tmp_path / "c.db"

    async def main() -> None:
        db = await _open(path)
        gate, held = await _hold_writer(db)
        late_started, late_gate = threading.Event(), threading.Event()

        def late(conn: Connection) -> None:  # in the same batch, after the first writer's job
            late_started.set()
            late_gate.wait(10)

        first = asyncio.ensure_future(db.run_write(insert(1)))
        second = asyncio.ensure_future(db.run_write(late))
        await asyncio.sleep(0.05)
        gate.set()
        assert await asyncio.to_thread(late_started.wait, 10)
        await asyncio.sleep(0.1)
        assert not first.done()  # its own work is done, but not committed yet
        assert rows(path) == []
        late_gate.set()
        assert await first == 1
        assert rows(path) == [1]  # visible to another connection when the caller learns of it
        await asyncio.gather(second, held)
        await db.close()

    run(main())


def test_close_commits_the_writes_already_queued_then_refuses_more(tmp_path: Path) -> None:
    async def main() -> None:
        db = await _open(tmp_path / "c.db")
        gate, held = await _hold_writer(db)
        writes = [asyncio.ensure_future(db.run_write(insert(n))) for n in range(20)]
        await asyncio.sleep(0)  # the writes are queued
        closing = asyncio.ensure_future(db.close())
        await asyncio.sleep(0.05)
        assert not closing.done()
        gate.set()
        await closing
        assert all(w.done() for w in writes)
        assert [w.result() for w in writes] == list(range(20))
        await held
        with pytest.raises(CatalogError, match="closed"):
            await db.run_write(insert(99))
        assert not any(t.name.startswith("catalog-writer") for t in threading.enumerate())

    run(main())
    assert rows(tmp_path / "c.db") == list(range(20))


def test_a_readonly_catalogue_refuses_every_kind_of_write(tmp_path: Path) -> None:
    async def main() -> None:
        db = await _open(tmp_path / "c.db")
        await db.close()
        ro = Database(tmp_path / "c.db", readonly=True)
        with pytest.raises(CatalogError, match="read-only"):
            await ro.run_write(insert(1))
        with pytest.raises(CatalogError, match="read-only"):
            await ro.execute_write(sa.text("DELETE FROM t"))
        await ro.close()

    run(main())


def test_catalog_methods_keep_their_results(tmp_path: Path) -> None:
    """Read-modify-write methods return what they decided inside the writer's transaction."""

    async def main() -> None:
        cat = await Catalog.open(tmp_path / "c.db")
        results = await asyncio.gather(*(cat.adopt_quota_scope("local", "qs") for _ in range(10)))
        assert sorted(results) == [False] * 9 + [True]
        await cat.mark_quota_scope_missing("local", "qs")
        assert await cat.adopt_quota_scope("local", "qs") is False
        assert (await cat.get_quota_scope("local", "qs")).state == "active"
        await cat.close()

    run(main())
