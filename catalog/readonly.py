"""Read-only, synchronous access to the catalogue for the FUSE view process.

The view runs on trio (pyfuse3 needs it), where the asyncio/aiosqlite stack of
:mod:`catalog.db` does not fit. It only ever reads small indexed rows, so a
plain ``sqlite3`` connection opened with ``mode=ro`` is enough: SQLite's WAL
lets it read whole transactions while ``serve`` writes, and the view can never
write by mistake.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import sqlalchemy as sa

from catalog.db import BUSY_TIMEOUT_MS, CatalogError
from catalog.migrations import SCHEMA_VERSION
from catalog.points import PointQuery
from catalog.schema import vfolders
from catalog.scope_used import ready_sums, used_of
from catalog.store import QuotaScopeRow, UsageRow, VFolderRow

# The tables read here (vfolders, quota_scopes, vfolder_usage) exist from schema version 2 on.
MIN_SCHEMA_VERSION = 2
PENDING_VERSION = 8


@dataclass(frozen=True)
class ScopeTotals:
    """A quota scope's used bytes (catalog/scope_used.py) and, for display, its measured vfolders' sums."""

    used_bytes: int | None  # None: a ready vfolder has not been measured yet
    file_count: int
    allocated_bytes: int


_SCOPE_USED = PointQuery(
    ready_sums(vfolders.c.volume == sa.bindparam("volume"), vfolders.c.qsid == sa.bindparam("qsid"))
)


class ReadOnlyCatalog:
    """One read-only connection; every call is one short read transaction."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        uri = f"file:{quote(str(self.path.resolve()))}?mode=ro"
        try:
            self._conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
            self._conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            version = self._conn.execute("PRAGMA user_version").fetchone()[0]
        except sqlite3.Error as e:
            raise CatalogError(f"catalogue {self.path} cannot be opened read-only: {e}") from None
        if not MIN_SCHEMA_VERSION <= version <= SCHEMA_VERSION:
            self._conn.close()
            raise CatalogError(
                f"catalogue {self.path} has schema version {version}; the view reads versions "
                f"{MIN_SCHEMA_VERSION}..{SCHEMA_VERSION} (start `storage-agent serve` once to upgrade it)"
            )
        self._pending = "pending" if version >= PENDING_VERSION else "0"  # the column came with version 8

    def close(self) -> None:
        self._conn.close()

    def _rows(self, sql: str, *args: object) -> list[sqlite3.Row]:
        """Rows of ``sql`` with ``args`` by position, or one mapping of named parameters."""
        params = args[0] if len(args) == 1 and isinstance(args[0], dict) else args
        try:
            cur = self._conn.execute(sql, params)
            return cur.fetchall()
        except sqlite3.Error as e:
            raise CatalogError(f"catalogue {self.path}: {e}") from None

    def quota_scopes(self) -> list[QuotaScopeRow]:
        rows = self._rows("SELECT volume, qsid, limit_bytes, state, created_at FROM quota_scopes ORDER BY volume, qsid")
        return [QuotaScopeRow(*r) for r in rows]

    def vfolders(self) -> list[VFolderRow]:
        rows = self._rows(
            "SELECT volume, qsid, folder_id, state, created_at, missing_since FROM vfolders "
            "ORDER BY volume, qsid, folder_id"
        )
        return [VFolderRow(*r) for r in rows]

    def usage(self, volume: str, qsid: str, folder_id: str) -> UsageRow | None:
        rows = self._rows(
            f"SELECT used_bytes, file_count, allocated_bytes, measured_at, source, stale, {self._pending} "
            "FROM vfolder_usage WHERE volume = ? AND qsid = ? AND folder_id = ?",
            volume,
            qsid,
            folder_id,
        )
        if not rows:
            return None
        r = rows[0]
        return UsageRow(r[0], r[1], r[2], r[3], r[4], bool(r[5]), bool(r[6]))

    def vfolder_figures(self, volume: str, qsid: str) -> dict[str, UsageRow]:
        """Every measured vfolder of a scope, by folder id, in one query (one consistent read)."""
        rows = self._rows(
            f"SELECT folder_id, used_bytes, file_count, allocated_bytes, measured_at, source, stale, {self._pending} "
            "FROM vfolder_usage WHERE volume = ? AND qsid = ?",
            volume,
            qsid,
        )
        return {r[0]: UsageRow(r[1], r[2], r[3], r[4], r[5], bool(r[6]), bool(r[7])) for r in rows}

    def scope_totals(self, volume: str, qsid: str) -> ScopeTotals:
        """The same figure as :meth:`catalog.store.Catalog.scope_used_bytes`, plus counts for display."""
        self._conn.execute("BEGIN")
        try:
            used = self._rows(_SCOPE_USED.sql, {"volume": volume, "qsid": qsid})
            summed = self._rows(
                "SELECT COALESCE(SUM(allocated_bytes), 0), COALESCE(SUM(file_count), 0) "
                "FROM vfolder_usage WHERE volume = ? AND qsid = ?",
                volume,
                qsid,
            )[0]
        finally:
            self._conn.execute("COMMIT")
        figure = used_of(0, 0, 0) if not used else used_of(used[0][2], used[0][3], used[0][4])
        return ScopeTotals(figure, int(summed[1]), int(summed[0]))


__all__ = ["MIN_SCHEMA_VERSION", "ReadOnlyCatalog", "ScopeTotals"]
