"""Usage answers for vfolders.

The counting rules (the same everywhere): ``used_bytes`` is the sum of
``st_size`` of every entry below the vfolder root, links not followed, and
``file_count`` the number of those entries; ``allocated_bytes`` is
``st_blocks * 512`` of the root and every entry, each hard-linked inode once,
exactly what ``du -s -B1`` prints.

Until the live usage engine lands, each answer comes from a fresh walk in a
worker thread (never on the event loop); the result is stored in the
catalogue with ``source = "scan"`` and ``measured_at``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from agent.context import Agent
from backends.base import Volume
from backends.ids import VFolderID


@dataclass(frozen=True)
class Usage:
    file_count: int
    used_bytes: int
    allocated_bytes: int
    measured_at: float
    source: str
    stale: bool

    def as_json(self) -> dict[str, object]:
        return {
            "file_count": self.file_count,
            "used_bytes": self.used_bytes,
            "measured_at": self.measured_at,
            "source": self.source,
            "stale": self.stale,
        }


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
