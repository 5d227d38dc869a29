"""``cephfs``: quota scopes are directories with a ``ceph.quota.max_bytes`` limit.

CephFS keeps recursive statistics on every directory (``ceph.dir.rbytes``,
``ceph.dir.rentries``), so both a scope's usage and a vfolder's usage are read
from one attribute instead of a walk (capability ``fast-size``). They are
propagated lazily by the MDS, so they may lag a few seconds behind writes.
Quotas are enforced by clients and may overshoot a little (BACKENDS.md).
All attribute access goes through :class:`backends.xattrs.XattrAdapter`.

Options: ``xattr_prefix`` ("" on CephFS; "user." maps ``ceph.*`` onto
``user.ceph.*`` of an ordinary filesystem, for tests).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os

from backends.base import Capability, HwInfo, ScopeUsage
from backends.errors import ExternalError, VFolderNotFound
from backends.ids import VFolderID
from backends.process import CommandFailed, run
from backends.quotascoped import QuotaScopedVolume
from backends.vfs import DirectoryQuotaModel
from backends.walk import TreeUsage
from backends.xattrs import XattrAdapter

log = logging.getLogger(__name__)

MAX_BYTES = "ceph.quota.max_bytes"
RBYTES = "ceph.dir.rbytes"
RENTRIES = "ceph.dir.rentries"  # rfiles + rsubdirs; rsubdirs counts the directory itself


class CephQuotaModel(DirectoryQuotaModel):
    volume: CephFSVolume

    async def create(self, qsid: str, limit_bytes: int | None) -> None:
        path = self.volume.scope_path(qsid)
        made = not await asyncio.to_thread(os.path.lexists, path)
        await super().create(qsid, limit_bytes)
        if limit_bytes is None:
            return
        try:
            await self.update(qsid, limit_bytes)
        except BaseException:
            if made:
                await asyncio.to_thread(os.rmdir, path)
            raise

    def _xattr_error(self, qsid: str, e: OSError) -> ExternalError:
        return ExternalError(f"cephfs xattrs of quota scope {qsid!r} on volume {self.volume.name!r}: {e.strerror}")

    async def describe(self, qsid: str) -> ScopeUsage:
        await super().describe(qsid)  # raises QuotaScopeNotFound
        path, x = self.volume.scope_path(qsid), self.volume.xattrs
        try:
            used = await asyncio.to_thread(x.get_int, path, RBYTES)
            limit = await asyncio.to_thread(x.get_int, path, MAX_BYTES)
        except OSError as e:
            raise self._xattr_error(qsid, e) from None
        return ScopeUsage(used_bytes=used, limit_bytes=limit or None)  # absent (ENODATA) or 0 = no quota

    async def update(self, qsid: str, limit_bytes: int | None) -> None:
        await super().update(qsid, limit_bytes)  # raises QuotaScopeNotFound
        try:
            await asyncio.to_thread(self.volume.xattrs.set, self.volume.scope_path(qsid), MAX_BYTES, limit_bytes or 0)
        except OSError as e:
            raise self._xattr_error(qsid, e) from None


class CephFSVolume(QuotaScopedVolume):
    backend = "cephfs"
    capabilities = frozenset({Capability.VFOLDER, Capability.QUOTA, Capability.FAST_SIZE})

    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003 - same as Volume
        super().__init__(*args, **kwargs)
        self.xattrs = XattrAdapter(self.options.get("xattr_prefix", ""))
        self._quota = CephQuotaModel(self)

    @property
    def quota(self) -> CephQuotaModel:
        return self._quota

    async def init(self) -> None:
        try:  # as upstream: note the client version; the backend itself needs only the mount
            done = await run(["ceph", "--version"], timeout=10, check=False)
            log.info("volume %s: %s", self.name, done.text.strip() or done.stderr.decode().strip())
        except CommandFailed:
            log.info("volume %s: no ceph CLI on this node (not needed: quotas and usage are xattrs)", self.name)

    async def fast_usage(self, vfid: VFolderID) -> TreeUsage | None:
        """From the vfolder root's recursive stats: entries below it, and its bytes (also as allocated)."""
        with self.open_vfolder(vfid):
            pass
        path, x = self.vfolder_path(vfid), self.xattrs

        def read() -> tuple[int | None, int | None]:
            return x.get_int(path, RBYTES), x.get_int(path, RENTRIES)

        try:
            rbytes, rentries = await asyncio.to_thread(read)
        except FileNotFoundError:
            raise VFolderNotFound(f"vfolder {vfid} does not exist on volume {self.name!r}") from None
        except OSError as e:
            if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
                return None  # not a CephFS directory: the caller walks
            raise ExternalError(f"cephfs xattrs of vfolder {vfid}: {e.strerror}") from None
        if rbytes is None or rentries is None:
            return None
        return TreeUsage(entries=max(0, rentries - 1), size_bytes=rbytes, allocated_bytes=rbytes, errors=0)

    async def hwinfo(self) -> HwInfo:
        base = await super().hwinfo()
        if base.status == "unavailable":
            return base
        try:
            await asyncio.to_thread(self.xattrs.get, self.root, RBYTES)
        except OSError as e:
            return HwInfo("degraded", f"cannot read {self.xattrs.name(RBYTES)} of {self.root}: {e.strerror}",
                          base.metadata)
        return base

