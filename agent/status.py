"""``storage-agent status``: what an operator checks first, from the config, the disk and the catalogue.

It never needs the agent to be running (it reads the catalogue read-only) but
says whether the agent answers on its manager port.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from agent.config import Config
from backends.layout import LAYOUT_VERSION, read_version
from catalog import Catalog
from catalog.report import scope_figures


def _agent_answers(config: Config) -> bool:
    listener = config.api.manager
    host = listener.service_addr.host
    host = "127.0.0.1" if host in ("0.0.0.0", "") else "[::1]" if host == "::" else host
    scheme = "https" if listener.ssl_enabled else "http"
    try:
        import ssl

        ctx = ssl._create_unverified_context() if listener.ssl_enabled else None  # only a liveness probe
        with urllib.request.urlopen(f"{scheme}://{host}:{listener.service_addr.port}/status", timeout=2,
                                    context=ctx) as r:
            return r.status == 200
    except OSError:
        return False


def _volume_health(root: Path) -> tuple[str, str | None]:
    if not root.is_dir():
        return "unavailable", f"volume root {root} does not exist"
    version = read_version(root)
    if version != LAYOUT_VERSION:
        return "needs-migration", f"layout {version or 2}: run storage-agent migrate"
    if os.statvfs(root).f_flag & os.ST_RDONLY:
        return "degraded", "the volume's filesystem is mounted read-only"
    if not os.access(root, os.W_OK):
        return "degraded", "volume root is not writable by this user"
    return "healthy", None


def _usage_mode(config: Config, name: str) -> dict[str, Any]:
    """How the usage engine keeps this volume's figures, and why (the choice the agent logs at start-up)."""
    from agent.engine.usage.policy import choose
    from backends import BACKENDS

    vc = config.volume[name]
    cls = BACKENDS.get(vc.backend)
    if cls is None or not config.usage.enabled:
        return {"mode": "none", "reason": "usage engine disabled" if cls else "backend not available"}
    pol = choose(cls.capabilities, vc.path, vc.options, config.usage, watcher=config.usage.watcher != "none")
    return {"mode": pol.mode, "fstype": pol.fstype, "rescan_interval_s": pol.rescan_interval, "reason": pol.reason}


def _volume(name: str, backend: str, root: Path, config: Config) -> dict[str, Any]:
    health, info = _volume_health(root)
    vol: dict[str, Any] = {"name": name, "backend": backend, "path": str(root), "health": health, "info": info,
                           "scopes": [], "usage": _usage_mode(config, name)}
    try:
        st = os.statvfs(root)
        vol["capacity_bytes"] = st.f_frsize * st.f_blocks
        vol["used_bytes"] = st.f_frsize * (st.f_blocks - st.f_bavail)
    except OSError:
        pass
    return vol


async def _from_catalogue(catalog: Catalog, out: dict[str, Any]) -> None:
    now = time.time()
    for vol in out["volumes"]:
        name = vol["name"]
        figures = await scope_figures(catalog, name)
        for qs in await catalog.quota_scopes(name):
            fig = figures.get(qs.qsid)
            vol["scopes"].append({
                "qsid": qs.qsid,
                "state": qs.state,
                "limit_bytes": qs.limit_bytes,
                "used_bytes": await catalog.scope_used_bytes(name, qs.qsid),
                "vfolders": fig.vfolders if fig else 0,
                "unmeasured": (fig.vfolders - fig.measured) if fig else 0,
                "stale": fig.stale if fig else 0,
                "oldest_figure_age_s": round(now - fig.oldest_measured_at, 1)
                if fig and fig.oldest_measured_at else None,
            })
    out["jobs"] = [
        {"id": j.id, "kind": j.kind, "volume": j.volume, "done": j.done, "total": j.total}
        for j in await catalog.running_jobs()
    ]


async def _read_catalogue(path: Path, out: dict[str, Any]) -> None:
    catalog = await Catalog.open(path, readonly=True)
    try:
        await _from_catalogue(catalog, out)
    finally:
        await catalog.close()


def collect(config: Config) -> dict[str, Any]:
    """Everything ``status`` shows, as JSON-ready data."""
    out: dict[str, Any] = {
        "agent": {"answers": _agent_answers(config)},
        "volumes": [_volume(name, vc.backend, vc.path, config) for name, vc in config.volume.items()],
        "jobs": [],
        "catalogue": str(config.catalog.path),
    }
    if Path(config.catalog.path).exists():
        asyncio.run(_read_catalogue(Path(config.catalog.path), out))
    else:
        out["catalogue"] += " (not created yet)"
    out["healthy"] = out["agent"]["answers"] and all(v["health"] == "healthy" for v in out["volumes"])
    return out


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    x = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(x) < 1024 or unit == "PiB":
            return f"{x:.0f} {unit}" if unit == "B" else f"{x:.1f} {unit}"
        x /= 1024
    return str(x)


def render(data: dict[str, Any], *, as_json: bool) -> None:
    if as_json:
        print(json.dumps(data, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    # On a terminal rich fits the width; piped to a file or a script, ids and paths are never cut.
    console = Console(width=None if sys.stdout.isatty() else 240)
    console.print(f"agent: {'answering' if data['agent']['answers'] else 'NOT answering'} on its manager port")
    vols = Table(title="volumes")
    for col in ("volume", "backend", "path", "health", "used", "capacity", "note"):
        vols.add_column(col)
    for v in data["volumes"]:
        vols.add_row(v["name"], v["backend"], v["path"], v["health"], _size(v.get("used_bytes")),
                     _size(v.get("capacity_bytes")), v["info"] or "")
    console.print(vols)
    modes = Table(title="usage kept by")
    for col in ("volume", "filesystem", "mode", "why"):
        modes.add_column(col)
    for v in data["volumes"]:
        modes.add_row(v["name"], v["usage"].get("fstype", "-"), v["usage"]["mode"], v["usage"]["reason"])
    console.print(modes)
    scopes = Table(title="quota scopes")
    for col in ("volume", "scope", "state", "vfolders", "used", "limit", "stale", "unmeasured"):
        scopes.add_column(col)
    for v in data["volumes"]:
        for s in v["scopes"]:
            scopes.add_row(v["name"], s["qsid"], s["state"], str(s["vfolders"]), _size(s["used_bytes"]),
                           _size(s["limit_bytes"]) if s["limit_bytes"] is not None else "unlimited",
                           str(s["stale"]), str(s["unmeasured"]))
    console.print(scopes)
    if data["jobs"]:
        jobs = Table(title="running jobs")
        for col in ("job", "kind", "volume", "progress"):
            jobs.add_column(col)
        for j in data["jobs"]:
            jobs.add_row(j["id"][:12], j["kind"], j["volume"], f"{j['done']}/{j['total'] or '?'}")
        console.print(jobs)
    else:
        console.print("no running jobs")


__all__ = ["collect", "render"]
