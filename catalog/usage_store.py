"""Queries of the usage engine: per-directory aggregates and vfolder totals, written as deltas.

One call to :meth:`UsageStore.apply` is one transaction: the changed directories' rows, the removed ones
and the new vfolder totals land together, so a reader never sees totals that disagree with the rows.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import partial

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from catalog.db import Database
from catalog.schema import usage_dirs, usage_vfolders, vfolder_usage, vfolders
from catalog.writes import writes

VFKey = tuple[str, str, str]  # (volume, qsid, folder_id)


@dataclass(frozen=True)
class DirRow:
    relpath: str  # os.fsdecode'd (surrogateescape): stored as os.fsencode(relpath)
    ino: int
    entries: int
    size_bytes: int
    allocated_bytes: int
    own_allocated: int
    links: str | None


@dataclass(frozen=True)
class Totals:
    file_count: int
    used_bytes: int
    allocated_bytes: int
    source: str
    stale: bool
    measured_at: float
    pending: bool = False  # events for the vfolder are queued or being applied (the figure lags)


@dataclass
class VFolderChange:
    """What one flush changes for one vfolder."""

    key: VFKey
    totals: Totals
    upserts: list[DirRow]
    deletes: list[str]
    replace_all: bool = False  # a full scan: every old row goes


def _vf(key: VFKey) -> sa.ColumnElement[bool]:
    return sa.and_(
        usage_vfolders.c.volume == key[0], usage_vfolders.c.qsid == key[1], usage_vfolders.c.folder_id == key[2]
    )


_UPSERT_DIR = (
    "INSERT INTO usage_dirs (vf, relpath, ino, entries, size_bytes, allocated_bytes, own_allocated, links) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (vf, relpath) DO UPDATE SET ino = excluded.ino, "
    "entries = excluded.entries, size_bytes = excluded.size_bytes, allocated_bytes = excluded.allocated_bytes, "
    "own_allocated = excluded.own_allocated, links = excluded.links"
)
# The engine's flush writes these several times a second under load: plain driver SQL skips Core's per-call
# statement building and cache-key work (measured: most of the writer thread's time under the load bench).
_VF_ID = "SELECT id FROM usage_vfolders WHERE volume = ? AND qsid = ? AND folder_id = ?"
_DELETE_DIR = "DELETE FROM usage_dirs WHERE vf = ? AND relpath = ?"
_UPSERT_TOTALS = (
    "INSERT INTO vfolder_usage (volume, qsid, folder_id, used_bytes, file_count, allocated_bytes, measured_at, "
    "source, stale, pending) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (volume, qsid, folder_id) DO UPDATE "
    "SET used_bytes = excluded.used_bytes, file_count = excluded.file_count, "
    "allocated_bytes = excluded.allocated_bytes, measured_at = excluded.measured_at, source = excluded.source, "
    "stale = excluded.stale, pending = excluded.pending"
)


class UsageStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    @staticmethod
    def _vf_id(conn: Connection, key: VFKey) -> int:
        row = conn.exec_driver_sql(_VF_ID, tuple(key)).first()
        if row is not None:
            return row[0]
        res = conn.execute(usage_vfolders.insert().values(volume=key[0], qsid=key[1], folder_id=key[2]))
        assert res.inserted_primary_key is not None  # an insert of one row always has one
        return int(res.inserted_primary_key[0])

    # apply, forget_orphans and take_rescan_requests are the engine's own: not remote writes
    async def apply(self, changes: Sequence[VFolderChange], chunk: int = 5000) -> None:
        """Write several vfolders' changes in one transaction (large scans are split, totals last)."""
        big = [c for c in changes if len(c.upserts) > chunk]
        small = [c for c in changes if len(c.upserts) <= chunk]
        for c in big:  # a big scan: rows in several transactions, the totals with the last one

            def start(conn: Connection, c: VFolderChange = c) -> int:
                vf = self._vf_id(conn, c.key)
                if c.replace_all:
                    conn.execute(usage_dirs.delete().where(usage_dirs.c.vf == vf))
                return vf

            vf = await self.db.run_write(start)
            for i in range(0, len(c.upserts), chunk):
                part = c.upserts[i : i + chunk]
                await self.db.run_write(partial(self._upsert, vf=vf, rows=part))
            small.append(VFolderChange(c.key, c.totals, [], c.deletes, replace_all=False))
        if small:
            await self.db.run_write(lambda conn: self._apply(conn, small))

    def _apply(self, conn: Connection, changes: Iterable[VFolderChange]) -> None:
        for c in changes:
            vf = self._vf_id(conn, c.key)
            if c.replace_all:
                conn.execute(usage_dirs.delete().where(usage_dirs.c.vf == vf))
            elif c.deletes:
                conn.exec_driver_sql(_DELETE_DIR, [(vf, os.fsencode(rel)) for rel in c.deletes])
            self._upsert(conn, vf, c.upserts)
            self._put_totals(conn, c.key, c.totals)
            if c.replace_all or c.totals.source == "scan":
                conn.execute(usage_vfolders.update().where(usage_vfolders.c.id == vf).values(scanned_at=time.time()))

    @staticmethod
    def _upsert(conn: Connection, vf: int, rows: Iterable[DirRow]) -> None:
        # plain driver executemany: a scan writes 100k rows, and Core's per-row processing costs more
        values = [
            (vf, os.fsencode(r.relpath), r.ino, r.entries, r.size_bytes, r.allocated_bytes, r.own_allocated, r.links)
            for r in rows
        ]
        if values:
            conn.exec_driver_sql(_UPSERT_DIR, values)

    @staticmethod
    def _put_totals(conn: Connection, key: VFKey, t: Totals) -> None:
        values = (t.used_bytes, t.file_count, t.allocated_bytes, t.measured_at, t.source, int(t.stale), int(t.pending))
        conn.exec_driver_sql(_UPSERT_TOTALS, (*key, *values))

    @writes
    async def put_totals(self, key: VFKey, totals: Totals) -> None:
        await self.db.run_write(lambda conn: self._put_totals(conn, key, totals))

    @writes
    async def mark_stale(self, keys: Iterable[VFKey]) -> None:
        await self.db.execute_write(
            *(
                vfolder_usage.update()
                .where(
                    vfolder_usage.c.volume == key[0],
                    vfolder_usage.c.qsid == key[1],
                    vfolder_usage.c.folder_id == key[2],
                )
                .values(stale=True)
                for key in keys
            )
        )

    async def all_totals(self, volume: str) -> dict[VFKey, Totals]:
        """The last figures of a volume's vfolders (served, flagged stale, until a rescan lands)."""
        async with self.db.read() as conn:
            rows = await conn.execute(sa.select(vfolder_usage).where(vfolder_usage.c.volume == volume))
            return {
                (r.volume, r.qsid, r.folder_id): Totals(
                    r.file_count, r.used_bytes, r.allocated_bytes, r.source, bool(r.stale), r.measured_at,
                    bool(r.pending),
                )
                for r in rows
            }

    async def dirs(self, key: VFKey) -> list[DirRow]:
        async with self.db.read() as conn:
            stmt = (
                sa.select(usage_dirs)
                .join(usage_vfolders, usage_vfolders.c.id == usage_dirs.c.vf)
                .where(_vf(key))
                .order_by(usage_dirs.c.relpath)
            )
            return [
                DirRow(
                    os.fsdecode(r.relpath), r.ino, r.entries, r.size_bytes, r.allocated_bytes, r.own_allocated, r.links
                )
                for r in await conn.execute(stmt)
            ]

    @staticmethod
    def _drop(conn: Connection, vf: int) -> None:
        """A vfolder's aggregates and its id row."""
        conn.execute(usage_dirs.delete().where(usage_dirs.c.vf == vf))
        conn.execute(usage_vfolders.delete().where(usage_vfolders.c.id == vf))

    @writes
    async def forget(self, key: VFKey) -> None:
        def forget(conn: Connection) -> None:
            row = conn.execute(sa.select(usage_vfolders.c.id).where(_vf(key))).first()
            if row is not None:
                self._drop(conn, row.id)

        await self.db.run_write(forget)

    async def forget_orphans(self) -> int:
        """Drop aggregates of vfolders the catalogue no longer knows (deleted while the engine was off)."""
        known = sa.select(vfolders.c.volume).where(
            vfolders.c.volume == usage_vfolders.c.volume,
            vfolders.c.qsid == usage_vfolders.c.qsid,
            vfolders.c.folder_id == usage_vfolders.c.folder_id,
        )

        def forget(conn: Connection) -> int:
            ids = [r.id for r in conn.execute(sa.select(usage_vfolders.c.id).where(~sa.exists(known)))]
            for vf in ids:
                self._drop(conn, vf)
            return len(ids)

        return await self.db.run_write(forget)

    @writes
    async def request_rescan(self, key: VFKey) -> None:
        def request(conn: Connection) -> None:
            vf = self._vf_id(conn, key)
            conn.execute(usage_vfolders.update().where(usage_vfolders.c.id == vf).values(rescan_requested=time.time()))

        await self.db.run_write(request)

    async def take_rescan_requests(self) -> list[VFKey]:
        """Rescans asked for from the command line while this agent runs; cleared as they are taken.

        Looked for first on a reader (usually there are none: no write), then read again and cleared in one
        write, so a request arriving in between is neither lost nor taken twice.
        """
        stmt = sa.select(usage_vfolders).where(usage_vfolders.c.rescan_requested.is_not(None))
        async with self.db.read() as conn:
            if (await conn.execute(stmt.limit(1))).first() is None:
                return []

        def take(conn: Connection) -> list[VFKey]:
            rows = [(r.id, (r.volume, r.qsid, r.folder_id)) for r in conn.execute(stmt)]
            ids = [i for i, _ in rows]
            conn.execute(usage_vfolders.update().where(usage_vfolders.c.id.in_(ids)).values(rescan_requested=None))
            return [k for _, k in rows]

        return await self.db.run_write(take)
