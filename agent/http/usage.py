"""Usage answers for vfolders: the public face of the usage engine used by the routes.

The counting rules (the same everywhere): ``used_bytes`` is the sum of ``st_size`` of every entry below
the vfolder root, links not followed, and ``file_count`` the number of those entries;
``allocated_bytes`` is ``st_blocks * 512`` of the root and every entry, each hard-linked inode once,
exactly what ``du -s -B1`` prints.

Answers come from the engine's figures (memory in front of the catalogue, written through): no walk on
the request path. A vfolder never measured yet is scanned at once; the call waits a bounded time
(``[usage] first-answer-wait``) and otherwise answers -1 ("not known"), as the contract says. With the
engine disabled by config, each answer is a fresh walk in a worker thread.

The routes reach the figures through a :class:`UsageSource`, set on the agent by whoever runs it:
:class:`EngineUsage` where the engine runs in the same process (``num-proc = 1``; also the walk when the
engine is disabled), :class:`CatalogueUsage` in the HTTP workers of ``num-proc = N``, which answer from
the catalogue's rows the engine writes through at each flush (stale and pending flags included), flagged
stale once the engine's heartbeat is old, and post registrations and refreshes to the engine's mailbox
(a catalogue write through the engine's writer host, which wakes the engine: agent/engine/writer.py).
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Protocol

from agent.engine.usage import Usage, UsageEngine
from agent.runtime import heartbeat
from backends.base import Volume
from backends.ids import VFolderID
from catalog import WriterUnavailable
from catalog.readonly import ReadOnlyCatalog
from catalog.scope_used import sum_ready
from catalog.store import UsageRow
from catalog.usage_store import UsageStore

if TYPE_CHECKING:
    from agent.runtime.context import Agent
    from agent.runtime.services import Service

UNKNOWN = Usage(-1, -1, -1, 0.0, "scan", True)
FIRST_ANSWER_POLL = 0.02  # seconds between looks at the catalogue while a first figure is awaited (workers)

__all__ = [
    "UNKNOWN", "CatalogueUsage", "EngineUsage", "Usage", "UsageSource", "as_json", "engine_of", "factory", "get",
    "refresh", "registered", "scope_used", "unregistered",
]


class UsageSource(Protocol):
    """Where the routes get usage figures from, and whom they tell about vfolders they create or delete."""

    async def get(self, vol: Volume, vfid: VFolderID) -> Usage:
        """The current figure (UNKNOWN when not measured within the wait); VFolderNotFound if none."""
        ...

    async def refresh(self, vol: Volume, vfid: VFolderID) -> None:
        """Start a rescan without waiting for it; VFolderNotFound if the vfolder does not exist."""
        ...

    async def scope_used(self, vol: Volume, qsid: str) -> int | None:
        """A scope's vfolders' allocated bytes summed; None until each ready one has a figure."""
        ...

    async def registered(self, vol: Volume, vfid: VFolderID, *, fresh: bool) -> None: ...

    async def unregistered(self, vol: Volume, vfid: VFolderID) -> None: ...


class EngineUsage:
    """The engine in this process (``engine`` None: ``[usage] enabled = false``, every answer a walk)."""

    def __init__(self, agent: Agent, engine: UsageEngine | None) -> None:
        self.agent = agent
        self.engine = engine

    async def get(self, vol: Volume, vfid: VFolderID) -> Usage:
        if self.engine is None:
            return await measure(self.agent, vol, vfid)
        figure = await self.engine.answer(vol, vfid)
        return UNKNOWN if figure is None else figure

    async def refresh(self, vol: Volume, vfid: VFolderID) -> None:
        await asyncio.to_thread(lambda: vol.open_vfolder(vfid).close())
        if self.engine is not None:  # without it every answer is a fresh walk already
            self.engine.refresh(vol, vfid)

    async def scope_used(self, vol: Volume, qsid: str) -> int | None:
        if self.engine is None:
            return await self.agent.catalog.scope_used_bytes(vol.name, qsid)
        engine = self.engine
        return sum_ready(
            await self.agent.catalog.vfolders(vol.name, qsid),
            lambda folder_id: _allocated(engine.cached_key((vol.name, qsid, folder_id))),
        )

    async def registered(self, vol: Volume, vfid: VFolderID, *, fresh: bool) -> None:
        if self.engine is not None:
            self.engine.register(vol, vfid, fresh=fresh)

    async def unregistered(self, vol: Volume, vfid: VFolderID) -> None:
        if self.engine is not None:
            await self.engine.unregister(vol, vfid)


class CatalogueUsage:
    """An HTTP worker's figures: the rows the engine (another process) writes through, read with a plain
    read-only ``sqlite3`` connection on the event loop (one indexed row: ~0.1 ms, less than a thread hop)."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        path = agent.config.catalog.path
        self.rows = ReadOnlyCatalog(path)
        self.heartbeat = heartbeat.path_for(path)
        self.wait = agent.config.usage.first_answer_wait
        self.mailbox = UsageStore(agent.catalog.db)  # its request_rescan is a remote write

    def close(self) -> None:
        self.rows.close()

    def engine_stale(self) -> bool:
        return heartbeat.age(self.heartbeat) > heartbeat.STALE_AFTER

    async def _ask(self, vol: Volume, vfid: VFolderID) -> None:
        # a write through the engine's writer host, which hands it to the engine at once (engine/writer.py)
        await self.mailbox.request_rescan((vol.name, vfid.qsid, vfid.hex))

    async def get(self, vol: Volume, vfid: VFolderID) -> Usage:
        row = self.rows.usage(vol.name, vfid.qsid, vfid.hex)
        if row is None:  # never measured: the engine is asked to, and the answer waited for a bounded time
            await asyncio.to_thread(lambda: vol.open_vfolder(vfid).close())
            if self.engine_stale():
                return UNKNOWN  # nobody to measure it now: "not known", at once
            try:
                await self._ask(vol, vfid)
            except WriterUnavailable:
                return UNKNOWN
            deadline = time.monotonic() + self.wait
            while row is None and time.monotonic() < deadline:
                await asyncio.sleep(FIRST_ANSWER_POLL)
                row = self.rows.usage(vol.name, vfid.qsid, vfid.hex)
            if row is None:
                return UNKNOWN
        stale = row.stale or self.engine_stale()
        return Usage(row.file_count, row.used_bytes, row.allocated_bytes, row.measured_at, row.source, stale,
                     row.pending)

    async def refresh(self, vol: Volume, vfid: VFolderID) -> None:
        await asyncio.to_thread(lambda: vol.open_vfolder(vfid).close())
        await self._ask(vol, vfid)

    async def scope_used(self, vol: Volume, qsid: str) -> int | None:
        vfolders = await self.agent.catalog.vfolders(vol.name, qsid)
        figures = self.rows.vfolder_figures(vol.name, qsid)
        return sum_ready(vfolders, lambda folder_id: _allocated(figures.get(folder_id)))

    async def registered(self, vol: Volume, vfid: VFolderID, *, fresh: bool) -> None:
        await self._ask(vol, vfid)

    async def unregistered(self, vol: Volume, vfid: VFolderID) -> None:
        await self._ask(vol, vfid)  # posted after the catalogue forgot the vfolder: the engine forgets it too


def _allocated(figure: Usage | UsageRow | None) -> int | None:
    return None if figure is None else figure.allocated_bytes


def source(agent: Agent) -> UsageSource:
    return agent.usage if agent.usage is not None else EngineUsage(agent, None)


def factory(agent: Agent) -> Service | None:
    """The ``usage-engine`` service, unless ``[usage] enabled = false``; the agent's usage source becomes it."""
    settings = agent.config.usage
    if not settings.enabled:
        return None
    engine = UsageEngine(agent, settings)
    agent.usage = EngineUsage(agent, engine)
    return engine


def engine_of(agent: Agent) -> UsageEngine | None:
    """The engine of this process, if it runs one (for /metrics and status figures)."""
    return agent.usage.engine if isinstance(agent.usage, EngineUsage) else None


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
    return await source(agent).get(vol, vfid)


async def refresh(agent: Agent, vol: Volume, vfid: VFolderID) -> None:
    """Rescan a vfolder now, without waiting for it (``POST /folder/usage/refresh``). Raises
    VFolderNotFound for a vfolder that does not exist."""
    await source(agent).refresh(vol, vfid)


async def scope_used(agent: Agent, vol: Volume, qsid: str) -> int | None:
    """A quota scope's usage as the sum of its vfolders' allocated bytes (the same figures
    ``/folder/used-bytes`` answers); None until every vfolder of the scope has been measured."""
    return await source(agent).scope_used(vol, qsid)


async def registered(agent: Agent, vol: Volume, vfid: VFolderID, *, fresh: bool) -> None:
    """A vfolder was created or cloned through the API: start keeping its figure."""
    await source(agent).registered(vol, vfid, fresh=fresh)


async def unregistered(agent: Agent, vol: Volume, vfid: VFolderID) -> None:
    """A vfolder was deleted through the API (and forgotten by the catalogue): forget its figure."""
    await source(agent).unregistered(vol, vfid)


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
