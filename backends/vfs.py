"""``vfs``: any local or network directory; quota scopes are plain directories.

Limits are recorded (the agent keeps them in the catalogue and reports them)
but a plain directory cannot enforce them.
"""

from __future__ import annotations

import asyncio
import os

from backends.base import Capability, QuotaModel, ScopeUsage
from backends.errors import QuotaScopeNotEmpty, QuotaScopeNotFound
from backends.mounted import STAGING, MountedVolume


class DirectoryQuotaModel(QuotaModel):
    """Quota scopes as first-level directories, with no enforcement."""

    def __init__(self, volume: MountedVolume) -> None:
        self.volume = volume

    async def create(self, qsid: str, limit_bytes: int | None) -> None:
        await asyncio.to_thread(self.volume.scope_path(qsid).mkdir, 0o755, False, True)

    async def describe(self, qsid: str) -> ScopeUsage:
        if not self.volume.scope_path(qsid).is_dir():
            raise QuotaScopeNotFound(f"quota scope {qsid!r} does not exist on volume {self.volume.name!r}")
        return ScopeUsage(used_bytes=None, limit_bytes=None)

    async def update(self, qsid: str, limit_bytes: int | None) -> None:
        await self.describe(qsid)

    async def delete(self, qsid: str) -> None:
        await asyncio.to_thread(self._delete, qsid)

    def _delete(self, qsid: str) -> None:
        path = self.volume.scope_path(qsid)
        if not path.is_dir():
            raise QuotaScopeNotFound(f"quota scope {qsid!r} does not exist on volume {self.volume.name!r}")
        leftover = [name for name in os.listdir(path) if name != STAGING]
        if leftover:
            raise QuotaScopeNotEmpty(f"quota scope {qsid!r} still holds vfolders; delete them first")
        try:
            os.rmdir(path / STAGING)
        except FileNotFoundError:
            pass
        except OSError:
            raise QuotaScopeNotEmpty(f"quota scope {qsid!r} has work in progress (uploads or clones)") from None
        os.rmdir(path)


class VfsVolume(MountedVolume):
    backend = "vfs"
    capabilities = frozenset({Capability.VFOLDER})

    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003 - same as Volume
        super().__init__(*args, **kwargs)
        self._quota = DirectoryQuotaModel(self)

    @property
    def quota(self) -> DirectoryQuotaModel:
        return self._quota
