"""The layout-2 -> 3 migration's journal: one row per folder, written around each rename.

The migration records a folder's *intent* (``state = 'intent'``) in a committed
transaction before renaming it, and marks it ``done`` — in the same transaction
that adopts the folder and its quota scope into the catalogue and advances the
job's progress — after the rename. A run killed in between leaves ``intent``
rows; the next run looks at both locations of each to learn whether the rename
happened, so no folder is lost or moved twice.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.dialects.sqlite import insert
from sqlalchemy.engine import Connection

from catalog.schema import jobs, layout_moves, quota_scopes, vfolders
from catalog.store import Catalog


@dataclass(frozen=True)
class MoveRow:
    folder_id: str
    qsid: str
    state: str
    job_id: str | None


class LayoutMoves:
    """Journal queries for one volume's migration, over an open :class:`Catalog`."""

    def __init__(self, catalog: Catalog, volume: str) -> None:
        self.db = catalog.db
        self.volume = volume

    def _key(self) -> sa.ColumnElement[bool]:
        return layout_moves.c.volume == self.volume

    async def intents(self) -> list[MoveRow]:
        """Folders whose rename may or may not have happened (a run stopped between the two writes)."""
        stmt = sa.select(layout_moves).where(self._key(), layout_moves.c.state == "intent")
        async with self.db.read() as conn:
            rows = await conn.execute(stmt.order_by(layout_moves.c.folder_id))
            return [MoveRow(r.folder_id, r.qsid, r.state, r.job_id) for r in rows]

    async def counts(self) -> dict[str, int]:
        stmt = sa.select(layout_moves.c.state, sa.func.count()).where(self._key()).group_by(layout_moves.c.state)
        async with self.db.read() as conn:
            return {state: n for state, n in await conn.execute(stmt)}

    async def record_intent(self, job_id: str, items: Iterable[tuple[str, str]]) -> None:
        """Commit ``(folder_id, qsid)`` as about to be renamed; must return before the renames start."""
        now = time.time()
        values = [
            {
                "volume": self.volume,
                "folder_id": fid,
                "qsid": qsid,
                "state": "intent",
                "job_id": job_id,
                "updated_at": now,
            }
            for fid, qsid in items
        ]
        if not values:
            return
        stmt = insert(layout_moves)
        stmt = stmt.on_conflict_do_update(
            index_elements=[layout_moves.c.volume, layout_moves.c.folder_id],
            set_={"qsid": stmt.excluded.qsid, "state": "intent", "job_id": job_id, "updated_at": now},
        )

        def intend(conn: Connection) -> None:
            conn.execute(stmt, values)

        await self.db.run_write(intend)

    async def record_done(self, job_id: str, items: Iterable[tuple[str, str]]) -> int:
        """Mark renamed folders done, adopt them (and their scopes) into the catalogue, advance the job.

        Returns the job's ``done`` count after the update.
        """
        items = list(items)
        if not items:
            return await self.job_done(job_id)
        now = time.time()

        def done(conn: Connection) -> int:
            conn.execute(
                layout_moves.update()
                .where(self._key(), layout_moves.c.folder_id == sa.bindparam("b_fid"))
                .values(state="done", job_id=job_id, updated_at=now),
                [{"b_fid": fid} for fid, _ in items],
            )
            scopes = sorted({qsid for _, qsid in items})
            conn.execute(
                insert(quota_scopes).on_conflict_do_nothing(),
                [
                    {"volume": self.volume, "qsid": q, "limit_bytes": None, "state": "active", "created_at": now}
                    for q in scopes
                ],
            )
            conn.execute(
                insert(vfolders).on_conflict_do_nothing(),
                [
                    {"volume": self.volume, "qsid": q, "folder_id": f, "state": "ready", "created_at": now}
                    for f, q in items
                ],
            )
            conn.execute(jobs.update().where(jobs.c.id == job_id).values(done=jobs.c.done + len(items), updated_at=now))
            return conn.execute(sa.select(jobs.c.done).where(jobs.c.id == job_id)).scalar_one()

        return await self.db.run_write(done)

    async def forget_intent(self, folder_ids: Iterable[str]) -> None:
        """Drop intents whose rename did not happen and will not be retried in this run."""
        ids = list(folder_ids)
        if not ids:
            return
        await self.db.execute_write(
            layout_moves.delete().where(
                self._key(), layout_moves.c.state == "intent", layout_moves.c.folder_id.in_(ids)
            )
        )

    async def job_done(self, job_id: str) -> int:
        async with self.db.read() as conn:
            done = (await conn.execute(sa.select(jobs.c.done).where(jobs.c.id == job_id))).scalar_one_or_none()
        return int(done or 0)

    async def running_job(self) -> str | None:
        """The id of an unfinished migration job of this volume (a run that was killed), if any."""
        stmt = (
            sa.select(jobs.c.id)
            .where(jobs.c.kind == "migrate", jobs.c.volume == self.volume, jobs.c.state == "running")
            .order_by(jobs.c.created_at.desc())
        )
        async with self.db.read() as conn:
            return (await conn.execute(stmt)).scalars().first()


__all__ = ["LayoutMoves", "MoveRow"]
