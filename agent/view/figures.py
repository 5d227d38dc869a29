"""The catalogue beside the files: the ``.usage`` table of a scope and the ``user.storage_agent.*`` xattrs.

Figures are read when asked for (one indexed row per xattr, one query per
``.usage`` open), never per directory entry, so they are as fresh as the
catalogue and listings stay cheap.
"""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime

from catalog.readonly import ReadOnlyCatalog
from catalog.store import QuotaScopeRow, UsageRow, VFolderRow

XATTR_PREFIX = "user.storage_agent."


def dashed(folder_id: str) -> str:
    return str(uuid.UUID(hex=folder_id))


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def _usage_json(u: UsageRow | None) -> dict[str, object]:
    if u is None:  # never measured: -1 means "not known", as in the API
        return {"used_bytes": -1, "file_count": -1, "allocated_bytes": -1, "measured_at": None, "source": None,
                "stale": True}
    return {
        "used_bytes": u.used_bytes,
        "file_count": u.file_count,
        "allocated_bytes": u.allocated_bytes,
        "measured_at": u.measured_at,
        "measured_at_iso": _iso(u.measured_at),
        "source": u.source,
        "stale": u.stale,
    }


def usage_table(catalog: ReadOnlyCatalog, scope: QuotaScopeRow, folders: list[VFolderRow]) -> bytes:
    """The JSON document served as ``<scope>/.usage``."""
    usage = catalog.vfolder_figures(scope.volume, scope.qsid)
    totals = catalog.scope_totals(scope.volume, scope.qsid)
    rows = []
    for vf in folders:
        rows.append({"id": dashed(vf.folder_id), "state": vf.state, **_usage_json(usage.get(vf.folder_id))})
    measured = list(usage.values())
    doc = {
        "volume": scope.volume,
        "quota_scope": scope.qsid,
        "state": scope.state,
        "limit_bytes": -1 if scope.limit_bytes is None else scope.limit_bytes,
        "used_bytes": -1 if totals.used_bytes is None else totals.used_bytes,
        "used_bytes_source": "vfolders",  # always, since the catalogue's scope_usage table went (schema 9)
        "totals": {
            "vfolders": len(folders),
            "missing": sum(1 for vf in folders if vf.state == "missing"),
            "measured": len(measured),
            "stale": sum(1 for u in measured if u.stale),
            "used_bytes": sum(u.used_bytes for u in measured),
            "file_count": sum(u.file_count for u in measured),
            "allocated_bytes": sum(u.allocated_bytes for u in measured),
        },
        "generated_at": _iso(time.time()),
        "vfolders": rows,
    }
    return (json.dumps(doc, indent=2) + "\n").encode()


def vfolder_xattrs(catalog: ReadOnlyCatalog, vf: VFolderRow, on_disk: bool) -> dict[str, bytes]:
    """``user.storage_agent.*`` of a vfolder directory: its state and the catalogue's usage figures."""
    state = vf.state if on_disk else "missing"
    attrs = {"state": state, "vfid": f"{vf.qsid}/{vf.folder_id}"}
    u = catalog.usage(vf.volume, vf.qsid, vf.folder_id)
    if u is not None:
        attrs |= {
            "used_bytes": str(u.used_bytes),
            "file_count": str(u.file_count),
            "allocated_bytes": str(u.allocated_bytes),
            "measured_at": repr(u.measured_at),
            "source": u.source,
            "stale": "true" if u.stale else "false",
        }
    return {XATTR_PREFIX + k: v.encode() for k, v in attrs.items()}


def scope_xattrs(catalog: ReadOnlyCatalog, scope: QuotaScopeRow, n_folders: int) -> dict[str, bytes]:
    totals = catalog.scope_totals(scope.volume, scope.qsid)
    attrs = {
        "state": scope.state,
        "limit_bytes": str(-1 if scope.limit_bytes is None else scope.limit_bytes),
        "used_bytes": str(-1 if totals.used_bytes is None else totals.used_bytes),
        "vfolders": str(n_folders),
    }
    return {XATTR_PREFIX + k: v.encode() for k, v in attrs.items()}
