"""``vfs``: any local or network directory; quota scopes are plain directories.

Limits are recorded (the agent keeps them in the catalogue and reports them)
but a plain directory cannot enforce them.
"""

from __future__ import annotations

import asyncio

from backends.base import Capability, QuotaModel, ScopeUsage
from backends.mounted import MountedVolume


class DirectoryQuotaModel(QuotaModel):
    """Quota scopes as first-level directories, with no enforcement."""

    def __init__(self, volume: MountedVolume) -> None:
        self.volume = volume

    async def create(self, qsid: str, limit_bytes: int | None) -> None:
        await asyncio.to_thread(self.volume.scope_path(qsid).mkdir, 0o755, False, True)

    async def describe(self, qsid: str) -> ScopeUsage:
        self.volume.require_scope(qsid)
        return ScopeUsage(used_bytes=None, limit_bytes=None)

    async def update(self, qsid: str, limit_bytes: int | None) -> None:
        self.volume.require_scope(qsid)

    async def delete(self, qsid: str) -> None:
        await asyncio.to_thread(lambda: self.volume.prepare_scope_removal(qsid).rmdir())


class VfsVolume(MountedVolume):
    backend = "vfs"
    capabilities = frozenset({Capability.VFOLDER})

    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003 - same as Volume
        super().__init__(*args, **kwargs)
        self._quota = DirectoryQuotaModel(self)

    @property
    def quota(self) -> DirectoryQuotaModel:
        return self._quota
