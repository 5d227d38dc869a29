"""Read-only summaries for ``storage-agent status`` and ``/metrics``: per-scope figures in one query each."""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa

from catalog.schema import quota_scopes, vfolder_usage, vfolders
from catalog.scope_used import ready_sums, used_of
from catalog.store import Catalog


@dataclass(frozen=True)
class ScopeFigures:
    vfolders: int
    measured: int  # vfolders with a usage figure
    stale: int  # of those, figures known to be out of date
    oldest_measured_at: float | None


async def scope_figures(catalog: Catalog, volume: str) -> dict[str, ScopeFigures]:
    """Per quota scope: how many vfolders, how many have a usage figure, how many of those are stale."""
    known = (
        sa.select(vfolders.c.qsid, sa.func.count().label("n"))
        .where(vfolders.c.volume == volume)
        .group_by(vfolders.c.qsid)
    )
    usage = (
        sa.select(
            vfolder_usage.c.qsid,
            sa.func.count().label("n"),
            sa.func.sum(sa.case((vfolder_usage.c.stale, 1), else_=0)).label("stale"),
            sa.func.min(vfolder_usage.c.measured_at).label("oldest"),
        )
        .where(vfolder_usage.c.volume == volume)
        .group_by(vfolder_usage.c.qsid)
    )
    async with catalog.db.read() as conn:
        counts = {r.qsid: r.n for r in await conn.execute(known)}
        measured = {r.qsid: r for r in await conn.execute(usage)}
    out = {}
    for qsid in sorted(set(counts) | set(measured)):
        m = measured.get(qsid)
        out[qsid] = ScopeFigures(
            vfolders=counts.get(qsid, 0),
            measured=m.n if m else 0,
            stale=int(m.stale or 0) if m else 0,
            oldest_measured_at=m.oldest if m else None,
        )
    return out


@dataclass(frozen=True)
class ScopeGauge:
    volume: str
    qsid: str
    used_bytes: int | None  # None until every vfolder of the scope has a figure
    limit_bytes: int | None  # None = unlimited


async def scope_gauges(catalog: Catalog) -> list[ScopeGauge]:
    """Every active quota scope's used bytes and limit, by the one rule (catalog/scope_used.py), in two
    queries whatever the number of scopes: a scrape never walks a disk."""
    async with catalog.db.read() as conn:
        scopes = list(await conn.execute(
            sa.select(quota_scopes.c.volume, quota_scopes.c.qsid, quota_scopes.c.limit_bytes)
            .where(quota_scopes.c.state == "active").order_by(quota_scopes.c.volume, quota_scopes.c.qsid)
        ))
        sums = {(r.volume, r.qsid): (r.known, r.measured, r.total) for r in await conn.execute(ready_sums())}
    return [
        ScopeGauge(r.volume, r.qsid, used_of(*sums.get((r.volume, r.qsid), (0, 0, 0))), r.limit_bytes)
        for r in scopes
    ]


__all__ = ["ScopeFigures", "ScopeGauge", "scope_figures", "scope_gauges"]
