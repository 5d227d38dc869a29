"""Queries over the catalogue, returning plain rows.

Callers never see SQL or SQLAlchemy objects: every method takes and returns
simple values and dataclasses, so the HTTP layer and the backends stay free of
database code (the Datasette split).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.sqlite import insert
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection

from catalog.db import BUSY_TIMEOUT_MS, CatalogCorrupt, CatalogError, Database, WriterUnavailable, check_integrity
from catalog.migrations import SCHEMA_VERSION
from catalog.points import PointQuery, PointReader
from catalog.recovery import Recovery, find_corruption, is_corruption, orphan_companions, set_aside
from catalog.schema import (
    dir_usage,
    jobs,
    quota_scopes,
    upload_sessions,
    usage_dirs,
    usage_vfolders,
    vfolder_metadata,
    vfolder_usage,
    vfolders,
    volumes,
)
from catalog.scope_used import ready_sums, used_of
from catalog.wire import WriterClient
from catalog.writes import writes


@dataclass(frozen=True)
class VolumeRow:
    name: str
    backend: str
    path: str
    state: str
    state_info: str | None


@dataclass(frozen=True)
class QuotaScopeRow:
    volume: str
    qsid: str
    limit_bytes: int | None
    state: str
    created_at: float


@dataclass(frozen=True)
class VFolderRow:
    volume: str
    qsid: str
    folder_id: str
    state: str
    created_at: float
    missing_since: float | None
    incarnation: str | None = None  # new each time the id is created: tells a recreated vfolder apart


@dataclass(frozen=True)
class UsageRow:
    used_bytes: int
    file_count: int
    allocated_bytes: int
    measured_at: float
    source: str
    stale: bool
    pending: bool = False  # events for the vfolder were queued when the engine wrote the figure


@dataclass(frozen=True)
class UploadSessionRow:
    session_id: str
    volume: str
    qsid: str
    folder_id: str
    relpath: str
    size: int
    received: int  # bytes acknowledged to the client (written to the staged file)
    created_at: float
    expires_at: float
    state: str
    synced: int = 0  # bytes known durable; the rest survive a process kill but maybe not a power cut
    boot_id: str | None = None  # the boot that wrote the bytes past ``synced``
    incarnation: str | None = None  # the vfolder incarnation it was issued for


@dataclass(frozen=True)
class JobRow:
    id: str
    kind: str
    volume: str
    params: dict[str, Any]
    state: str
    done: int
    total: int | None
    error: str | None


def _vf_key(table: sa.Table, volume: Any, qsid: Any, folder_id: Any) -> sa.ColumnElement[bool]:
    return sa.and_(table.c.volume == volume, table.c.qsid == qsid, table.c.folder_id == folder_id)


def _qs_key(table: sa.Table, volume: Any, qsid: Any) -> sa.ColumnElement[bool]:
    return sa.and_(table.c.volume == volume, table.c.qsid == qsid)


def _vf_params(table: sa.Table) -> sa.ColumnElement[bool]:
    return _vf_key(table, sa.bindparam("volume"), sa.bindparam("qsid"), sa.bindparam("folder_id"))


def _qs_params(table: sa.Table) -> sa.ColumnElement[bool]:
    return _qs_key(table, sa.bindparam("volume"), sa.bindparam("qsid"))


# The point reads a request makes (see catalog/points.py), each defined once for both connections.
_GET_USAGE = PointQuery(sa.select(vfolder_usage).where(_vf_params(vfolder_usage)))
_GET_VFOLDER = PointQuery(sa.select(vfolders).where(_vf_params(vfolders)))
_GET_QUOTA_SCOPE = PointQuery(sa.select(quota_scopes).where(_qs_params(quota_scopes)))
_GET_METADATA = PointQuery(sa.select(vfolder_metadata.c.payload).where(_vf_params(vfolder_metadata)))
_GET_UPLOAD = PointQuery(sa.select(upload_sessions).where(upload_sessions.c.session_id == sa.bindparam("session_id")))
_SCOPE_USED = PointQuery(ready_sums(_qs_params(vfolders)))  # catalog/scope_used.py: the one rule


class Catalog:
    """The agent's catalogue. Open with :meth:`open`; one instance per process."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.upgraded_from: int | None = None  # the schema version found at open (0: a new, empty file)
        self.recovery: Recovery | None = None  # set by open_or_rebuild when the old file was unusable
        # point reads on the calling thread (catalog/points.py); None: through aiosqlite like the rest
        self.points: PointReader | None = None

    async def _point(self, query: PointQuery, **params: Any) -> dict[str, Any] | None:
        """The first row of a point query by column name (or None), by the quickest path this catalogue has."""
        if self.points is not None:
            return self.points.first(query, params)
        async with self.db.read() as conn:
            return await self._first(conn, query, params)

    @staticmethod
    async def _first(conn: AsyncConnection, query: PointQuery, params: Mapping[str, Any]) -> dict[str, Any] | None:
        r = (await conn.execute(query.statement, params)).mappings().first()
        return None if r is None else dict(r)

    @property
    def created(self) -> bool:
        """Whether this run started the catalogue from nothing (a new, deleted or set-aside file)."""
        return self.upgraded_from == 0

    @classmethod
    async def open(
        cls, path: str | Path, *, readonly: bool = False, upgrade: bool = True, check: bool = True
    ) -> Catalog:
        """Open (and upgrade) the catalogue; :class:`CatalogCorrupt` if the file is damaged.

        ``check``: run ``PRAGMA quick_check`` first (writable opens; the caller may have run it already).
        """
        path = Path(path)
        if not readonly:
            path.parent.mkdir(parents=True, exist_ok=True)
        db = Database(path, readonly=readonly)
        found: int | None = None
        try:
            if not readonly:
                problems = await check_integrity(db) if check else "ok"
                if problems != "ok":
                    raise CatalogCorrupt(
                        f"catalogue {path} failed its integrity check: {problems}", f"quick_check: {problems}"
                    )
                if upgrade:
                    found, _ = await db.upgrade()
            elif await db.schema_version() < SCHEMA_VERSION:
                raise CatalogError(f"catalogue {path} is older than schema version {SCHEMA_VERSION}; start serve once")
        except CatalogError:
            await db.close()
            raise
        except sa.exc.DBAPIError as e:
            await db.close()
            if is_corruption(e.orig):
                raise CatalogCorrupt(f"catalogue {path} cannot be opened: {e.orig}", str(e.orig)) from e
            raise CatalogError(f"catalogue {path} cannot be opened: {e.orig}") from e
        catalog = cls(db)
        catalog.upgraded_from = found
        catalog.points = PointReader(path)
        return catalog

    @classmethod
    async def open_or_rebuild(cls, path: str | Path) -> Catalog:
        """Open for ``serve``: a corrupt file is renamed aside and a new, empty catalogue started.

        ``recovery`` on the result says what happened (``None``: the file was there and usable); the
        caller rebuilds what is on disk and logs what was lost. Every other :class:`CatalogError`
        (permissions, locks, a newer schema) is raised unchanged: nothing is moved.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        missing, orphans = await asyncio.to_thread(orphan_companions, path)
        problem = None if missing else await asyncio.to_thread(find_corruption, path, BUSY_TIMEOUT_MS)
        if problem is None:
            try:
                catalog = await cls.open(path, check=False)
            except CatalogCorrupt as e:  # found only by the writer (e.g. while upgrading)
                problem = e.detail
            else:
                if missing and catalog.created:
                    catalog.recovery = Recovery(path, "missing", orphans)
                return catalog
        try:
            kept = await asyncio.to_thread(set_aside, path, "corrupt")
        except OSError as e:
            raise CatalogError(
                f"catalogue {path} is corrupt ({problem}) and could not be moved aside: {e.strerror or e}"
            ) from None
        catalog = await cls.open(path)
        catalog.recovery = Recovery(path, problem, kept)
        return catalog

    @classmethod
    async def open_remote(
        cls, path: str | Path, socket_path: str | Path, *, wait: float = 5.0, reply_wait: float = 60.0
    ) -> Catalog:
        """A catalogue for an HTTP worker: reads here, writes through the engine's :class:`~catalog.remote.WriterHost`.

        Reads run locally on the file opened read-only (WAL: they see every commit of the engine at once;
        point reads on the calling thread). Every ``@writes`` method is sent over ``socket_path``; it raises
        :class:`WriterUnavailable` when the host cannot be reached within ``wait`` seconds or does not answer
        within ``reply_wait``, and reconnects on the next call. Any other write fails (the file is read-only).
        This never upgrades or recovers the file (the engine does, before it listens): a file that is
        missing or older than this schema is waited for up to ``wait`` seconds, then WriterUnavailable; a
        newer one is a :class:`CatalogError` at once.
        """
        path = Path(path)
        deadline = time.monotonic() + wait
        while True:
            try:
                catalog = await cls.open(path, readonly=True)
                break
            except CatalogError as e:
                if time.monotonic() >= deadline:
                    raise WriterUnavailable(
                        f"catalogue {path} is not ready ({e}); the storage-agent engine process prepares it and "
                        f"is not answering"
                    ) from None
                await asyncio.sleep(0.05)
        version = await catalog.schema_version()
        if version != SCHEMA_VERSION:
            await catalog.close()
            raise CatalogError(
                f"catalogue {path} has schema version {version}, newer than this agent's {SCHEMA_VERSION}"
            )
        catalog.db.remote = WriterClient(Path(socket_path), wait=wait, reply_wait=reply_wait)
        return catalog

    async def close(self) -> None:
        if self.points is not None:
            self.points.close()
        await self.db.close()

    async def schema_version(self) -> int:
        return await self.db.schema_version()

    # -- volumes ---------------------------------------------------------------

    @writes
    async def record_volume(self, name: str, backend: str, path: str, state: str, state_info: str | None) -> None:
        now = time.time()
        stmt = insert(volumes).values(
            name=name, backend=backend, path=path, state=state, state_info=state_info, first_seen=now, last_seen=now
        )
        stmt = stmt.on_conflict_do_update(
            index_elements=[volumes.c.name],
            set_={"backend": backend, "path": path, "state": state, "state_info": state_info, "last_seen": now},
        )
        await self.db.execute_write(stmt)

    async def volumes(self) -> list[VolumeRow]:
        async with self.db.read() as conn:
            rows = await conn.execute(sa.select(volumes).order_by(volumes.c.name))
            return [VolumeRow(r.name, r.backend, r.path, r.state, r.state_info) for r in rows]

    # -- quota scopes ----------------------------------------------------------

    @writes
    async def add_quota_scope(self, volume: str, qsid: str, limit_bytes: int | None) -> None:
        """Record a scope as active (re-activating one that was marked missing)."""
        stmt = insert(quota_scopes).values(
            volume=volume, qsid=qsid, limit_bytes=limit_bytes, state="active", created_at=time.time()
        )
        stmt = stmt.on_conflict_do_update(
            index_elements=[quota_scopes.c.volume, quota_scopes.c.qsid],
            set_={"limit_bytes": limit_bytes, "state": "active", "missing_since": None},
        )
        await self.db.execute_write(stmt)

    @writes
    async def adopt_quota_scope(self, volume: str, qsid: str) -> bool:
        """Record a scope found on disk; keeps a known limit. True if it was new."""

        def adopt(conn: Connection) -> bool:
            row = conn.execute(sa.select(quota_scopes.c.state).where(_qs_key(quota_scopes, volume, qsid))).first()
            if row is None:
                conn.execute(
                    quota_scopes.insert().values(
                        volume=volume, qsid=qsid, limit_bytes=None, state="active", created_at=time.time()
                    )
                )
                return True
            if row.state != "active":
                conn.execute(
                    quota_scopes.update()
                    .where(_qs_key(quota_scopes, volume, qsid))
                    .values(state="active", missing_since=None)
                )
            return False

        return await self.db.run_write(adopt)

    async def get_quota_scope(self, volume: str, qsid: str) -> QuotaScopeRow | None:
        r = await self._point(_GET_QUOTA_SCOPE, volume=volume, qsid=qsid)
        if r is None:
            return None
        return QuotaScopeRow(r["volume"], r["qsid"], r["limit_bytes"], r["state"], r["created_at"])

    async def quota_scopes(self, volume: str) -> list[QuotaScopeRow]:
        async with self.db.read() as conn:
            rows = await conn.execute(
                sa.select(quota_scopes).where(quota_scopes.c.volume == volume).order_by(quota_scopes.c.qsid)
            )
            return [QuotaScopeRow(r.volume, r.qsid, r.limit_bytes, r.state, r.created_at) for r in rows]

    @writes
    async def set_quota_limit(self, volume: str, qsid: str, limit_bytes: int | None) -> None:
        await self.db.execute_write(
            quota_scopes.update().where(_qs_key(quota_scopes, volume, qsid)).values(limit_bytes=limit_bytes)
        )

    @writes
    async def remove_quota_scope(self, volume: str, qsid: str) -> None:
        await self.db.execute_write(quota_scopes.delete().where(_qs_key(quota_scopes, volume, qsid)))

    @writes
    async def mark_quota_scope_missing(self, volume: str, qsid: str) -> None:
        await self.db.execute_write(
            quota_scopes.update()
            .where(_qs_key(quota_scopes, volume, qsid), quota_scopes.c.state != "missing")
            .values(state="missing", missing_since=time.time())
        )

    # -- vfolders --------------------------------------------------------------

    @writes
    async def add_vfolder(self, volume: str, qsid: str, folder_id: str, *, adopted: bool = False) -> bool:
        """Record a vfolder as ready; True if it was not known before."""

        def add(conn: Connection) -> bool:
            row = conn.execute(sa.select(vfolders.c.state).where(_vf_key(vfolders, volume, qsid, folder_id))).first()
            if row is None:
                conn.execute(
                    vfolders.insert().values(
                        volume=volume,
                        qsid=qsid,
                        folder_id=folder_id,
                        state="ready",
                        created_at=time.time(),
                        incarnation=uuid.uuid4().hex,
                    )
                )
                return True
            if row.state != "ready":
                conn.execute(
                    vfolders.update()
                    .where(_vf_key(vfolders, volume, qsid, folder_id))
                    .values(state="ready", missing_since=None)
                )
            return False

        return await self.db.run_write(add)

    async def get_vfolder(self, volume: str, qsid: str, folder_id: str) -> VFolderRow | None:
        r = await self._point(_GET_VFOLDER, volume=volume, qsid=qsid, folder_id=folder_id)
        return None if r is None else VFolderRow(**r)

    async def vfolders(self, volume: str, qsid: str | None = None) -> list[VFolderRow]:
        stmt = sa.select(vfolders).where(vfolders.c.volume == volume)
        if qsid is not None:
            stmt = stmt.where(vfolders.c.qsid == qsid)
        async with self.db.read() as conn:
            rows = await conn.execute(stmt.order_by(vfolders.c.qsid, vfolders.c.folder_id))
            return [VFolderRow(**r._asdict()) for r in rows]

    async def vfolder_root_inodes(self, volume: str, qsid: str) -> dict[str, int]:
        """The inode of each vfolder root as the last usage scan saw it (folder_id -> st_ino).

        A rename keeps the inode, so start-up reconciliation can tell a vfolder whose delete was
        interrupted (its tree moved into the staging area) from one removed behind the agent's back.
        """
        stmt = (
            sa.select(usage_vfolders.c.folder_id, usage_dirs.c.ino)
            .join(usage_dirs, usage_dirs.c.vf == usage_vfolders.c.id)
            .where(usage_vfolders.c.volume == volume, usage_vfolders.c.qsid == qsid, usage_dirs.c.relpath == b"")
        )
        async with self.db.read() as conn:
            return {r.folder_id: r.ino for r in await conn.execute(stmt)}

    @writes
    async def mark_vfolder_missing(self, volume: str, qsid: str, folder_id: str) -> None:
        await self.db.execute_write(
            vfolders.update()
            .where(_vf_key(vfolders, volume, qsid, folder_id), vfolders.c.state != "missing")
            .values(state="missing", missing_since=time.time())
        )

    @writes
    async def remove_vfolder(self, volume: str, qsid: str, folder_id: str) -> None:
        """Forget a vfolder and everything stored about it, in one transaction."""
        tables = (vfolders, vfolder_metadata, vfolder_usage, dir_usage)
        await self.db.execute_write(*(t.delete().where(_vf_key(t, volume, qsid, folder_id)) for t in tables))

    # -- metadata --------------------------------------------------------------

    @writes
    async def set_metadata(self, volume: str, qsid: str, folder_id: str, payload: str) -> None:
        stmt = insert(vfolder_metadata).values(
            volume=volume, qsid=qsid, folder_id=folder_id, payload=payload, updated_at=time.time()
        )
        stmt = stmt.on_conflict_do_update(
            index_elements=[vfolder_metadata.c.volume, vfolder_metadata.c.qsid, vfolder_metadata.c.folder_id],
            set_={"payload": payload, "updated_at": time.time()},
        )
        await self.db.execute_write(stmt)

    async def get_metadata(self, volume: str, qsid: str, folder_id: str) -> str | None:
        r = await self._point(_GET_METADATA, volume=volume, qsid=qsid, folder_id=folder_id)
        return None if r is None else r["payload"]

    # -- usage -----------------------------------------------------------------

    @writes
    async def put_usage(
        self,
        volume: str,
        qsid: str,
        folder_id: str,
        *,
        used_bytes: int,
        file_count: int,
        allocated_bytes: int,
        source: str,
        measured_at: float | None = None,
        stale: bool = False,
    ) -> None:
        values = {
            "used_bytes": used_bytes,
            "file_count": file_count,
            "allocated_bytes": allocated_bytes,
            "measured_at": measured_at if measured_at is not None else time.time(),
            "source": source,
            "stale": stale,
        }
        stmt = insert(vfolder_usage).values(volume=volume, qsid=qsid, folder_id=folder_id, **values)
        stmt = stmt.on_conflict_do_update(
            index_elements=[vfolder_usage.c.volume, vfolder_usage.c.qsid, vfolder_usage.c.folder_id], set_=values
        )
        await self.db.execute_write(stmt)

    async def get_usage(self, volume: str, qsid: str, folder_id: str) -> UsageRow | None:
        r = await self._point(_GET_USAGE, volume=volume, qsid=qsid, folder_id=folder_id)
        if r is None:
            return None
        return UsageRow(
            r["used_bytes"], r["file_count"], r["allocated_bytes"], r["measured_at"], r["source"], bool(r["stale"]),
            bool(r["pending"]),
        )

    async def scope_used_bytes(self, volume: str, qsid: str) -> int | None:
        """The sum of the scope's ready vfolders' allocated bytes; None while one has no figure
        (catalog/scope_used.py)."""
        key = {"volume": volume, "qsid": qsid}
        if self.points is not None:
            with self.points.snapshot() as read:
                row = read.first(_SCOPE_USED, key)
        else:
            async with self.db.read() as conn:
                row = await self._first(conn, _SCOPE_USED, key)
        return used_of(0, 0, 0) if row is None else used_of(row["known"], row["measured"], row["total"])

    # -- upload sessions -------------------------------------------------------

    @writes
    async def create_upload_session(
        self,
        volume: str,
        qsid: str,
        folder_id: str,
        relpath: str,
        size: int,
        expires_at: float,
        incarnation: str | None = None,
    ) -> UploadSessionRow:
        row = UploadSessionRow(
            session_id=uuid.uuid4().hex,
            volume=volume,
            qsid=qsid,
            folder_id=folder_id,
            relpath=relpath,
            size=size,
            received=0,
            created_at=time.time(),
            expires_at=expires_at,
            state="open",
            incarnation=incarnation,
        )
        await self.db.execute_write(upload_sessions.insert().values(**row.__dict__))
        return row

    async def get_upload_session(self, session_id: str) -> UploadSessionRow | None:
        r = await self._point(_GET_UPLOAD, session_id=session_id)
        return None if r is None else UploadSessionRow(**r)

    @writes
    async def update_upload_session(
        self, session_id: str, *, received: int, synced: int, boot_id: str | None, state: str = "open"
    ) -> None:
        await self.db.execute_write(
            upload_sessions.update()
            .where(upload_sessions.c.session_id == session_id)
            .values(received=received, synced=synced, boot_id=boot_id, state=state)
        )

    @writes
    async def raise_upload_synced(self, session_id: str, synced: int) -> None:
        """A background ``fdatasync`` made ``synced`` bytes durable: raise the open session's figure to it, never
        past what was acknowledged and never down (another process's PATCH may have recorded more meanwhile)."""
        c = upload_sessions.c
        await self.db.execute_write(
            upload_sessions.update()
            .where(c.session_id == session_id, c.state == "open", c.synced < synced, c.received >= synced)
            .values(synced=synced, boot_id=sa.case((c.received == synced, None), else_=c.boot_id))
        )

    async def upload_sessions(
        self,
        *,
        state: str | None = None,
        expired_before: float | None = None,
        folder: tuple[str, str, str] | None = None,
    ) -> list[UploadSessionRow]:
        """Session rows, all or only those in ``state`` / expired before a time (the sweeper's question,
        answered by the expiry index: finished sessions stay until they expire and can be many)."""
        stmt = sa.select(upload_sessions)
        if state is not None:
            stmt = stmt.where(upload_sessions.c.state == state)
        if expired_before is not None:
            stmt = stmt.where(upload_sessions.c.expires_at < expired_before)
        if folder is not None:  # (volume, qsid, folder_id): one vfolder's sessions
            stmt = stmt.where(_vf_key(upload_sessions, *folder))
        async with self.db.read() as conn:
            rows = await conn.execute(stmt)
            return [UploadSessionRow(**r._asdict()) for r in rows]

    async def count_upload_sessions(self, state: str) -> int:
        async with self.db.read() as conn:
            stmt = sa.select(sa.func.count()).select_from(upload_sessions).where(upload_sessions.c.state == state)
            return (await conn.execute(stmt)).scalar_one()

    @writes
    async def delete_upload_session(self, session_id: str) -> None:
        await self.db.execute_write(upload_sessions.delete().where(upload_sessions.c.session_id == session_id))

    # -- jobs ------------------------------------------------------------------

    @writes
    async def start_job(self, kind: str, volume: str, params: dict[str, Any], total: int | None = None) -> str:
        job_id = uuid.uuid4().hex
        now = time.time()
        await self.db.execute_write(
            jobs.insert().values(
                id=job_id,
                kind=kind,
                volume=volume,
                params=json.dumps(params, sort_keys=True),
                state="running",
                done=0,
                total=total,
                created_at=now,
                updated_at=now,
            )
        )
        return job_id

    @writes
    async def update_job(self, job_id: str, *, done: int | None = None, total: int | None = None) -> None:
        values: dict[str, Any] = {"updated_at": time.time()}
        if done is not None:
            values["done"] = done
        if total is not None:
            values["total"] = total
        await self.db.execute_write(jobs.update().where(jobs.c.id == job_id).values(**values))

    @writes
    async def finish_job(self, job_id: str, *, error: str | None = None) -> None:
        await self.db.execute_write(
            jobs.update()
            .where(jobs.c.id == job_id)
            .values(state="failed" if error else "done", error=error, updated_at=time.time())
        )

    async def forget_finished_jobs(self, *, before: float) -> int:
        """Drop the jobs that finished (done or failed) before ``before``; how many were."""
        stmt = jobs.delete().where(jobs.c.state != "running", jobs.c.updated_at < before)
        return await self.db.run_write(lambda conn: conn.execute(stmt).rowcount)

    async def running_jobs(self, kind: str | None = None) -> list[JobRow]:
        stmt = sa.select(jobs).where(jobs.c.state == "running")
        if kind is not None:
            stmt = stmt.where(jobs.c.kind == kind)
        async with self.db.read() as conn:
            rows = await conn.execute(stmt.order_by(jobs.c.created_at))
            return [
                JobRow(r.id, r.kind, r.volume, json.loads(r.params), r.state, r.done, r.total, r.error) for r in rows
            ]
