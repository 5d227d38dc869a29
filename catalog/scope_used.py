"""The one rule for a quota scope's used bytes, in its two forms.

A scope's used bytes are the sum of its **ready** vfolders' allocated bytes (what ``/folder/used-bytes``
answers for each), unknown (None) while one of them has no figure yet; a scope with no ready vfolder uses
0. The HTTP answers apply it to the usage engine's memory or to the rows another process wrote
(:func:`sum_ready`); ``storage-agent status``, ``/metrics`` and the FUSE view's ``.usage`` apply it in SQL
(:func:`ready_sums` and :func:`used_of`), one query however many scopes there are.
tests/test_scope_gauges.py checks, on random catalogues, that every reader gives the same figure.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol

import sqlalchemy as sa

from catalog.schema import vfolder_usage, vfolders


class _Folder(Protocol):
    @property
    def folder_id(self) -> str: ...

    @property
    def state(self) -> str: ...


def sum_ready(rows: Iterable[_Folder], allocated: Callable[[str], int | None]) -> int | None:
    """The rule over figures at hand: ``allocated(folder_id)`` is a vfolder's figure, None when it has none."""
    total = 0
    for row in rows:
        if row.state != "ready":
            continue
        figure = allocated(row.folder_id)
        if figure is None:
            return None
        total += figure
    return total


def ready_sums(*where: sa.ColumnElement[bool]) -> sa.Select[tuple[str, str, int, int, int | None]]:
    """Per scope that has ready vfolders (``where`` narrows them): how many (``known``), how many have a
    figure (``measured``) and their allocated bytes summed (``total``). Read with :func:`used_of`."""
    u = vfolder_usage
    same = sa.and_(u.c.volume == vfolders.c.volume, u.c.qsid == vfolders.c.qsid, u.c.folder_id == vfolders.c.folder_id)
    return (
        sa.select(
            vfolders.c.volume, vfolders.c.qsid, sa.func.count().label("known"),
            sa.func.count(u.c.folder_id).label("measured"),
            sa.func.sum(u.c.allocated_bytes).label("total"),  # NULL when none is measured
        )
        .select_from(vfolders.outerjoin(u, same))
        .where(vfolders.c.state == sa.literal_column("'ready'"), *where)  # no bind: compiled once for sqlite3
        .group_by(vfolders.c.volume, vfolders.c.qsid)
    )


def used_of(known: int, measured: int, total: int | None) -> int | None:
    """The rule over one row of :func:`ready_sums` (a scope without a row: ``used_of(0, 0, 0)``, 0 bytes)."""
    return int(total or 0) if measured >= known else None


__all__ = ["ready_sums", "sum_ready", "used_of"]
