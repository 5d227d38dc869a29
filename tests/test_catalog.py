"""The catalogue: real SQLite files, versioned upgrades, one writer, WAL."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from pathlib import Path

import pytest

from catalog import SCHEMA_VERSION, Catalog
from catalog.db import CatalogError, Database
from catalog.schema import metadata


def run(coro):  # noqa: ANN001, ANN201 - tiny helper for async tests without a plugin
    return asyncio.run(coro)


def test_fresh_catalogue_matches_the_declared_tables(tmp_path: Path) -> None:
    async def main() -> None:
        cat = await Catalog.open(tmp_path / "c.db")
        assert await cat.schema_version() == SCHEMA_VERSION
        await cat.close()

    run(main())
    con = sqlite3.connect(tmp_path / "c.db")
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    for table in metadata.sorted_tables:
        on_disk = [row[1] for row in con.execute(f"PRAGMA table_info({table.name})")]
        assert on_disk == [c.name for c in table.columns], table.name


def test_upgrade_from_an_older_schema_keeps_the_data(tmp_path: Path) -> None:
    path = tmp_path / "old.db"

    async def make_v1() -> None:
        db = Database(path)
        await db.upgrade(target=1)
        assert await db.schema_version() == 1
        await db.close()

    run(make_v1())
    con = sqlite3.connect(path)
    con.execute("INSERT INTO quota_scopes VALUES ('local', 'user-1', 1024, 'active', 1.0, NULL)")
    con.execute("INSERT INTO vfolders VALUES ('local', 'user-1', 'ab' || printf('%030d', 1), 'ready', 2.0, NULL)")
    con.execute("INSERT INTO vfolder_metadata VALUES ('local', 'user-1', 'ab' || printf('%030d', 1), '{\"k\":1}', 3.0)")
    con.commit()
    con.close()

    async def reopen() -> None:
        cat = await Catalog.open(path)
        assert await cat.schema_version() == SCHEMA_VERSION
        scope = await cat.get_quota_scope("local", "user-1")
        assert scope is not None and scope.limit_bytes == 1024
        (vf,) = await cat.vfolders("local")
        assert await cat.get_metadata("local", "user-1", vf.folder_id) == '{"k":1}'
        # tables added by later steps are usable
        await cat.put_usage("local", "user-1", vf.folder_id, used_bytes=5, file_count=1, allocated_bytes=4096,
                            source="scan")
        assert (await cat.get_usage("local", "user-1", vf.folder_id)).allocated_bytes == 4096
        assert await cat.scope_used_bytes("local", "user-1") == 4096
        await cat.close()

    run(reopen())


def test_a_newer_catalogue_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "future.db"
    con = sqlite3.connect(path)
    con.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 5}")
    con.close()
    with pytest.raises(CatalogError, match="newer than this agent"):
        run(Catalog.open(path))


def test_a_file_that_is_not_sqlite_is_refused_cleanly(tmp_path: Path) -> None:
    path = tmp_path / "garbage.db"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(CatalogError):
        run(Catalog.open(path))


def test_concurrent_writers_are_serialised(tmp_path: Path) -> None:
    async def main() -> None:
        cat = await Catalog.open(tmp_path / "c.db")
        await cat.add_quota_scope("local", "qs", None)
        ids = [f"{i:032x}" for i in range(200)]
        results = await asyncio.gather(*(cat.add_vfolder("local", "qs", f) for f in ids))
        assert all(results)
        assert len(await cat.vfolders("local", "qs")) == 200
        # a second add of the same id is not new, and re-activates a missing one
        await cat.mark_vfolder_missing("local", "qs", ids[0])
        assert (await cat.get_vfolder("local", "qs", ids[0])).state == "missing"
        assert await cat.add_vfolder("local", "qs", ids[0]) is False
        assert (await cat.get_vfolder("local", "qs", ids[0])).state == "ready"
        await cat.remove_vfolder("local", "qs", ids[0])
        assert await cat.get_vfolder("local", "qs", ids[0]) is None
        await cat.close()

    run(main())


def test_readonly_open_sees_committed_rows_and_cannot_write(tmp_path: Path) -> None:
    async def main() -> None:
        writer = await Catalog.open(tmp_path / "c.db")
        await writer.add_quota_scope("local", "qs", 10)
        reader = await Catalog.open(tmp_path / "c.db", readonly=True)
        assert (await reader.get_quota_scope("local", "qs")).limit_bytes == 10
        with pytest.raises(CatalogError):
            await reader.add_quota_scope("local", "other", None)
        await reader.close()
        await writer.close()

    run(main())


def test_usage_rows_of_schema_5_upgrade_to_byte_paths_and_odd_names_round_trip(tmp_path: Path) -> None:
    """Issue 22 item 5: usage_dirs.relpath holds os.fsencode(relpath); rows written as text before keep
    their place, and a name that is not UTF-8 (a surrogate-escaped str in Python) is stored and read back."""
    from catalog.usage_store import DirRow, Totals, UsageStore, VFolderChange

    path = tmp_path / "v5.db"
    key = ("local", "user-1", "ab" * 16)

    async def make_v5() -> None:
        db = Database(path)
        await db.upgrade(target=5)
        await db.close()

    run(make_v5())
    con = sqlite3.connect(path)
    con.execute("INSERT INTO usage_vfolders (id, volume, qsid, folder_id) VALUES (1, ?, ?, ?)", key)
    con.execute("INSERT INTO usage_dirs VALUES (1, '', 7, 1, 10, 4096, 4096, NULL)")
    con.execute("INSERT INTO usage_dirs VALUES (1, 'café', 8, 2, 20, 8192, 4096, NULL)")
    con.commit()
    con.close()

    odd = os.fsdecode(b"caf\xe9/\xff")

    async def reopen() -> None:
        cat = await Catalog.open(path)
        store = UsageStore(cat.db)
        assert {r.relpath: r.ino for r in await store.dirs(key)} == {"": 7, "café": 8}
        totals = Totals(3, 30, 12288, "watch", False, 1.0)
        await store.apply([VFolderChange(key, totals, [DirRow(odd, 9, 0, 0, 0, 4096, None)], ["café"])])
        assert {r.relpath: r.ino for r in await store.dirs(key)} == {"": 7, odd: 9}
        assert await cat.vfolder_root_inodes("local", "user-1") == {key[2]: 7}
        await cat.close()

    run(reopen())


def test_schema_8_with_a_scope_usage_row_upgrades_and_the_scope_figure_is_its_vfolders(tmp_path: Path) -> None:
    """Schema 9 drops ``scope_usage`` (a backend's own per-scope figure that nothing but a test wrote): a
    catalogue of schema 8 with such a row upgrades, the table is gone, and the scope's used bytes are its
    ready vfolders' allocated bytes, as the HTTP answers have them (the row's figure no longer wins)."""
    path = tmp_path / "v8.db"

    async def make_v8() -> None:
        db = Database(path)
        await db.upgrade(target=8)
        await db.close()

    run(make_v8())
    ready, gone = "ab" * 16, "cd" * 16
    con = sqlite3.connect(path)
    con.execute("INSERT INTO quota_scopes VALUES ('local', 'user-1', NULL, 'active', 1.0, NULL)")
    con.execute("INSERT INTO vfolders VALUES ('local', 'user-1', ?, 'ready', 2.0, NULL, 'i1')", (ready,))
    con.execute("INSERT INTO vfolders VALUES ('local', 'user-1', ?, 'missing', 2.0, 3.0, 'i2')", (gone,))
    for folder, allocated in ((ready, 8192), (gone, 4096)):
        con.execute("INSERT INTO vfolder_usage VALUES ('local', 'user-1', ?, 100, 1, ?, 1.0, 'scan', 0, 0)",
                    (folder, allocated))
    con.execute("INSERT INTO scope_usage VALUES ('local', 'user-1', 999999, 1.0, 'quota')")
    con.commit()
    con.close()

    async def reopen() -> None:
        from catalog.report import scope_gauges

        cat = await Catalog.open(path)
        assert await cat.schema_version() == SCHEMA_VERSION >= 9
        assert await cat.scope_used_bytes("local", "user-1") == 8192
        assert [g.used_bytes for g in await scope_gauges(cat)] == [8192]
        await cat.add_vfolder("local", "user-1", "ef" * 16)  # a ready vfolder with no figure yet: unknown
        assert await cat.scope_used_bytes("local", "user-1") is None
        await cat.remove_quota_scope("local", "user-1")
        await cat.close()

    run(reopen())
    con = sqlite3.connect(path)
    tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    con.close()
    assert "scope_usage" not in tables and {"vfolders", "vfolder_usage"} <= tables


def test_finished_jobs_are_forgotten_after_their_keep_time_running_ones_never(tmp_path: Path) -> None:
    """Every clone and delete records a job; the engine forgets the finished ones after a while (the table
    would otherwise grow with every delete), never a running one however old."""

    async def main() -> list[tuple[str, str]]:
        cat = await Catalog.open(tmp_path / "c.db")
        try:
            old_done, old_running, new_done = [await cat.start_job("delete", "v", {"n": n}) for n in range(3)]
            await cat.finish_job(old_done)
            await cat.finish_job(new_done, error="boom")
            cutoff = time.time() + 1  # every job so far finished "before" the cutoff ...
            assert await cat.forget_finished_jobs(before=cutoff - 3600) == 0  # ... but none an hour before it
            assert await cat.forget_finished_jobs(before=cutoff) == 2
            return [(j.id, j.state) for j in await cat.running_jobs()] + [(old_running, "")]
        finally:
            await cat.close()

    (kept, _), (running, _) = run(main())
    assert kept == running
