"""``dellemc-onefs``: Dell PowerScale through the OneFS Platform API; a quota scope has a directory quota.

The quota is found by its ``/ifs`` path (``dell_ifs_path`` + ``/<qsid>``)
with ``type=directory`` rather than by an id kept in a file inside the scope
(as the upstream proxy did): nothing extra lives in the user's tree, and a
quota made by an operator on the same path is seen too. Limits are hard
thresholds on the logical size, snapshots excluded, enforced.

Without ``dell_ifs_path`` the volume's ``path`` is taken as its ``/ifs`` path, the assumption the
upstream proxy makes (it names each quota by the scope's local path): right when the cluster is
mounted at the same path locally (e.g. ``/ifs/data/ai``), and said with a warning at start-up.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from pydantic import AliasChoices, Field, SecretStr

from backends.base import Capability, FSUsage, PerfMetric, ScopeUsage
from backends.vendors.appliance import ApplianceQuotaModel, ApplianceVolume, RestTarget, VendorOptions, rmdir_scope

log = logging.getLogger(__name__)


class OnefsOptions(VendorOptions):
    dell_endpoint: str
    dell_username: str = Field(validation_alias=AliasChoices("dell_username", "dell_admin"))
    dell_password: SecretStr
    dell_api_version: str = "12"
    dell_system_name: str = "nfs"
    dell_ifs_path: str | None = Field(default=None, pattern=r"^/ifs(/.*)?$")  # None: the volume's path
    dell_verify_ssl: bool = False


class OnefsQuotaModel(ApplianceQuotaModel):
    v: OnefsVolume

    def ifs_path(self, qsid: str) -> str:
        return self.v.ifs_root.rstrip("/") + "/" + qsid

    async def _find(self, qsid: str, op: str) -> dict[str, Any] | None:
        r = await self.v.client.get("/quota/quotas", op=op, params={"path": self.ifs_path(qsid), "type": "directory"})
        for q in self.v.client.fields(op).objects(r.body, "quotas"):
            if q.get("path") == self.ifs_path(qsid) and q.get("type") == "directory":
                return q
        return None

    async def create(self, qsid: str, limit_bytes: int | None) -> None:
        await asyncio.to_thread(self.v.scope_path(qsid).mkdir, 0o755, False, True)
        if limit_bytes is not None:
            await self._set(qsid, limit_bytes, f"create directory quota for quota scope {qsid!r}")

    async def _set(self, qsid: str, limit_bytes: int | None, op: str) -> None:
        limit_bytes = limit_bytes or None  # 0 = no limit (a hard threshold of 0 would block every write)
        found = await self._find(qsid, op)
        if limit_bytes is None:
            if found is not None:
                await self.v.client.call("DELETE", self._quota_path(found, op), op=op, accept=(404,))
            return
        if found is not None:
            await self._put(found, limit_bytes, op)
            return
        await self._create(qsid, limit_bytes, op)

    def _quota_path(self, quota: dict[str, Any], op: str) -> str:
        return f"/quota/quotas/{self.v.client.fields(op).field(quota, 'id', kind=str)}"

    async def _put(self, quota: dict[str, Any], limit_bytes: int, op: str) -> None:
        await self.v.client.call("PUT", self._quota_path(quota, op), op=op, json={"thresholds": {"hard": limit_bytes}})

    async def _create(self, qsid: str, limit_bytes: int, op: str) -> None:
        """POST the directory quota (not retried once sent: a repeat would meet the first one's 409).

        A 409 "already exists" means it appeared since :meth:`_find` (another agent, an operator):
        the create is made idempotent by finding that quota and setting the limit on it.
        """
        r = await self.v.client.call(
            "POST",
            "/quota/quotas",
            op=op,
            accept=(409,),
            json={
                "path": self.ifs_path(qsid),
                "type": "directory",
                "include_snapshots": False,
                "thresholds": {"hard": limit_bytes},
                "thresholds_on": "fslogicalsize",
                "enforced": True,
            },
        )
        if r.status == 409:
            found = await self._find(qsid, op)
            if found is None:
                raise self.v.client.fail(op, r)
            await self._put(found, limit_bytes, op)

    async def describe(self, qsid: str) -> ScopeUsage:
        await asyncio.to_thread(self.v.require_scope, qsid)
        f = self.v.client.fields(f"read the directory quota of quota scope {qsid!r}")
        q = await self._find(qsid, f.op)
        if q is None:
            return ScopeUsage(None, None)
        hard = f.number(q, "thresholds", "hard", default=None)
        return ScopeUsage(f.number(q, "usage", "fslogical", default=None), hard or None)

    async def update(self, qsid: str, limit_bytes: int | None) -> None:
        await asyncio.to_thread(self.v.require_scope, qsid)
        await self._set(qsid, limit_bytes, f"set the directory quota of quota scope {qsid!r}")

    async def delete(self, qsid: str) -> None:
        path = await asyncio.to_thread(self.v.prepare_scope_removal, qsid)
        await self._set(qsid, None, f"delete the directory quota of quota scope {qsid!r}")
        await asyncio.to_thread(rmdir_scope, path)


class OnefsVolume(ApplianceVolume):
    backend = "dellemc-onefs"
    appliance = "PowerScale OneFS"
    Options = OnefsOptions
    capabilities = frozenset({Capability.VFOLDER, Capability.QUOTA, Capability.METRIC, Capability.FAST_FS_SIZE})
    target = RestTarget(
        "dell_endpoint", "/platform/{dell_api_version}", "dell_verify_ssl", ("dell_username", "dell_password")
    )
    quota_model = OnefsQuotaModel
    opts: OnefsOptions

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ifs_root = self.opts.dell_ifs_path or str(self.root)
        if self.opts.dell_ifs_path is None:
            log.warning(
                "volume %s: no dell_ifs_path: quotas are named by the volume's path %s on the cluster (as the "
                "upstream proxy does)%s", self.name, self.root,
                "" if self.ifs_root.startswith("/ifs") else "; OneFS only knows /ifs paths, so set dell_ifs_path",
            )

    async def _pools(self, op: str) -> list[dict[str, Any]]:
        r = await self.client.get("/storagepool/storagepools", op=op)
        return self.client.fields(op).objects(r.body, "storagepools")

    async def fs_usage(self) -> FSUsage:
        f = self.client.fields("read storage pools")
        pools = await self._pools(f.op)
        # tiers aggregate node pools: count each node pool once
        counted = [p for p in pools if p.get("type") != "tier"] or pools
        total = sum(f.number(p, "usage", "total_bytes", default=0) for p in counted)
        used = sum(f.number(p, "usage", "used_bytes", default=0) for p in counted)
        return FSUsage(total, used)

    async def appliance_hwinfo(self) -> tuple[str, str | None, dict[str, str]]:
        f = self.client.fields("read cluster config")
        body = f.field((await self.client.get("/cluster/config", op=f.op)).body, kind=dict)
        meta = {
            "cluster_name": str(body.get("name", "")),
            "onefs_release": str(f.field(body, "onefs_version", "release", default="")),
            "onefs_build": str(f.field(body, "onefs_version", "build", default="")),
        }
        problems = await self._pool_problems()
        if problems:
            return "degraded", "; ".join(problems), meta
        return "healthy", None, meta

    async def _pool_problems(self) -> list[str]:
        """``node pool 'name': flag, ...`` for each pool whose ``health_flags`` list is not empty (empty = healthy)."""
        f = self.client.fields("read storage pool health")
        problems = []
        for pool in await self._pools(f.op):
            flags = f.field(pool, "health_flags", kind=list, default=[])  # only node pools carry it
            if flags:
                problems.append(f"node pool {pool.get('name', '?')!r}: {', '.join(str(x) for x in flags)}")
        return problems

    async def performance_metric(self) -> PerfMetric:
        f = self.client.fields("read protocol statistics")
        r = await self.client.get("/statistics/summary/protocol-stats", op=f.op)
        stats = f.field(r.body, "protocol-stats", kind=dict)
        g = self.client.fields(f"read workload statistics of {self.opts.dell_system_name!r}")
        w = await self.client.get(
            "/statistics/summary/workload", op=g.op, params={"system_names": self.opts.dell_system_name}
        )
        loads = g.objects(w.body, "workload")
        load = loads[0] if loads else {}
        return PerfMetric(
            f.number(stats, "disk", "iops", default=0),
            0,  # OneFS's summary has one disk iops figure, not split by direction
            f.number(stats, "onefs", "out", default=0),
            f.number(stats, "onefs", "in", default=0),
            g.number(load, "latency_read", cast=float, default=0.0),
            g.number(load, "latency_write", cast=float, default=0.0),
        )
