"""Usage answers for vfolders: the public face of the usage engine used by the routes.

The counting rules (the same everywhere): ``used_bytes`` is the sum of ``st_size`` of every entry below
the vfolder root, links not followed, and ``file_count`` the number of those entries;
``allocated_bytes`` is ``st_blocks * 512`` of the root and every entry, each hard-linked inode once,
exactly what ``du -s -B1`` prints.

Answers come from the engine's figures (memory in front of the catalogue, written through): no walk on
the request path. A vfolder never measured yet is scanned at once; the call waits a bounded time
(``[usage] first-answer-wait``) and otherwise answers -1 ("not known"), as the contract says. With the
engine disabled by config, each answer is a fresh walk in a worker thread.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from agent.engine.usage import Usage, UsageEngine
from backends.base import Volume
from backends.ids import VFolderID

if TYPE_CHECKING:
    from agent.runtime.context import Agent
    from agent.runtime.services import Service

UNKNOWN = Usage(-1, -1, -1, 0.0, "scan", True)

__all__ = [
    "UNKNOWN", "Usage", "as_json", "engine_of", "factory", "get", "refresh", "registered", "scope_used", "unregistered",
]


def factory(agent: Agent) -> Service | None:
    """The ``usage-engine`` service, unless ``[usage] enabled = false``."""
    settings = agent.config.usage
    return UsageEngine(agent, settings) if settings.enabled else None


def engine_of(agent: Agent) -> UsageEngine | None:
    for service in agent.services:
        if isinstance(service, UsageEngine):
            return service
    return None


def as_json(u: Usage) -> dict[str, object]:
    return {
        "file_count": u.file_count,
        "used_bytes": u.used_bytes,
        "measured_at": u.measured_at,
        "source": u.source,
        "stale": u.stale,
        "pending": u.pending,
    }


async def get(agent: Agent, vol: Volume, vfid: VFolderID) -> Usage:
    """The current figure of a vfolder (UNKNOWN when not measured within the wait). Raises
    VFolderNotFound for a vfolder that does not exist."""
    engine = engine_of(agent)
    if engine is None:
        return await measure(agent, vol, vfid)
    figure = await engine.answer(vol, vfid)
    return UNKNOWN if figure is None else figure


async def refresh(agent: Agent, vol: Volume, vfid: VFolderID) -> None:
    """Rescan a vfolder now, without waiting for it (``POST /folder/usage/refresh``). Raises
    VFolderNotFound for a vfolder that does not exist. Without the engine every answer is a fresh walk
    already: nothing to start."""
    await asyncio.to_thread(lambda: vol.open_vfolder(vfid).close())
    engine = engine_of(agent)
    if engine is not None:
        engine.refresh(vol, vfid)


async def scope_used(agent: Agent, vol: Volume, qsid: str) -> int | None:
    """A quota scope's usage as the sum of its vfolders' allocated bytes (the same figures
    ``/folder/used-bytes`` answers); None until every vfolder of the scope has been measured."""
    engine = engine_of(agent)
    if engine is None:
        return await agent.catalog.scope_used_bytes(vol.name, qsid)
    total = 0
    for row in await agent.catalog.vfolders(vol.name, qsid):
        if row.state != "ready":
            continue
        figure = engine.cached_key((vol.name, qsid, row.folder_id))
        if figure is None:
            return None
        total += figure.allocated_bytes
    return total


def registered(agent: Agent, vol: Volume, vfid: VFolderID, *, fresh: bool) -> None:
    """A vfolder was created or cloned through the API: start keeping its figure."""
    engine = engine_of(agent)
    if engine is not None:
        engine.register(vol, vfid, fresh=fresh)


async def unregistered(agent: Agent, vol: Volume, vfid: VFolderID) -> None:
    """A vfolder was deleted through the API: forget its figure and aggregates."""
    engine = engine_of(agent)
    if engine is not None:
        await engine.unregister(vol, vfid)


async def measure(agent: Agent, vol: Volume, vfid: VFolderID) -> Usage:
    """Measure a vfolder now (backend figure where it has one, else a walk) and record it."""
    async with agent.walks:
        tree = await vol.fast_usage(vfid)
        source = "fast"
        if tree is None:
            tree = await vol.tree_usage(vfid)
            source = "scan"
    usage = Usage(tree.entries, tree.size_bytes, tree.allocated_bytes, time.time(), source, stale=False)
    await agent.catalog.put_usage(
        vol.name,
        vfid.qsid,
        vfid.hex,
        used_bytes=usage.used_bytes,
        file_count=usage.file_count,
        allocated_bytes=usage.allocated_bytes,
        source=source,
        measured_at=usage.measured_at,
    )
    return usage
