"""``dellemc-onefs``: Dell PowerScale through the OneFS Platform API; a quota scope has a directory quota.

The quota is found by its ``/ifs`` path (``dell_ifs_path`` + ``/<qsid>``)
with ``type=directory`` rather than by an id kept in a file inside the scope
(as the upstream proxy did): nothing extra lives in the user's tree, and a
quota made by an operator on the same path is seen too. Limits are hard
thresholds on the logical size, snapshots excluded, enforced.
"""

from __future__ import annotations

import asyncio
from typing import Any

from pydantic import AliasChoices, Field, SecretStr

from backends.base import Capability, FSUsage, PerfMetric, QuotaModel, ScopeUsage
from backends.vendors.appliance import ApplianceVolume, VendorOptions, rmdir_scope
from backends.vendors.rest import BasicAuth, RestClient, field


class OnefsOptions(VendorOptions):
    dell_endpoint: str
    dell_username: str = Field(validation_alias=AliasChoices("dell_username", "dell_admin"))
    dell_password: SecretStr
    dell_api_version: str = "12"
    dell_system_name: str = "nfs"
    dell_ifs_path: str = Field(pattern=r"^/ifs(/.*)?$")
    dell_verify_ssl: bool = False


class OnefsQuotaModel(QuotaModel):
    def __init__(self, volume: OnefsVolume) -> None:
        self.v = volume

    def ifs_path(self, qsid: str) -> str:
        return self.v.opts.dell_ifs_path.rstrip("/") + "/" + qsid

    async def _find(self, qsid: str, op: str) -> dict[str, Any] | None:
        r = await self.v.client.get("/quota/quotas", op=op, params={"path": self.ifs_path(qsid), "type": "directory"})
        for q in field(r.body, "quotas", op=op, label=self.v.client.label):
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
                await self.v.client.call("DELETE", f"/quota/quotas/{found['id']}", op=op, accept=(404,))
            return
        if found is not None:
            await self.v.client.call(
                "PUT", f"/quota/quotas/{found['id']}", op=op, json={"thresholds": {"hard": limit_bytes}}
            )
            return
        await self.v.client.call(
            "POST",
            "/quota/quotas",
            op=op,
            json={
                "path": self.ifs_path(qsid),
                "type": "directory",
                "include_snapshots": False,
                "thresholds": {"hard": limit_bytes},
                "thresholds_on": "fslogicalsize",
                "enforced": True,
            },
        )

    async def describe(self, qsid: str) -> ScopeUsage:
        await asyncio.to_thread(self.v.require_scope, qsid)
        q = await self._find(qsid, f"read the directory quota of quota scope {qsid!r}")
        if q is None:
            return ScopeUsage(None, None)
        hard = (q.get("thresholds") or {}).get("hard")
        used = (q.get("usage") or {}).get("fslogical")
        return ScopeUsage(None if used is None else int(used), int(hard) if hard else None)

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
    opts: OnefsOptions

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._quota = OnefsQuotaModel(self)

    @property
    def quota(self) -> OnefsQuotaModel:
        return self._quota

    def make_client(self) -> RestClient:
        o = self.opts
        auth = BasicAuth(o.dell_username, o.dell_password.get_secret_value())
        return self.rest(f"{o.dell_endpoint.rstrip('/')}/platform/{o.dell_api_version}", auth, o.dell_verify_ssl)

    async def fs_usage(self) -> FSUsage:
        op = "read storage pools"
        r = await self.client.get("/storagepool/storagepools", op=op)
        pools = field(r.body, "storagepools", op=op, label=self.client.label)
        # tiers aggregate node pools: count each node pool once
        counted = [p for p in pools if p.get("type") != "tier"] or pools
        total = sum(int(p.get("usage", {}).get("total_bytes") or 0) for p in counted)
        used = sum(int(p.get("usage", {}).get("used_bytes") or 0) for p in counted)
        return FSUsage(total, used)

    async def appliance_hwinfo(self) -> tuple[str, str | None, dict[str, str]]:
        r = await self.client.get("/cluster/config", op="read cluster config")
        body = r.body if isinstance(r.body, dict) else {}
        version = body.get("onefs_version", {})
        meta = {
            "cluster_name": str(body.get("name", "")),
            "onefs_release": str(version.get("release", "")),
            "onefs_build": str(version.get("build", "")),
        }
        return "healthy", None, meta

    async def performance_metric(self) -> PerfMetric:
        op = "read protocol statistics"
        r = await self.client.get("/statistics/summary/protocol-stats", op=op)
        stats = field(r.body, "protocol-stats", op=op, label=self.client.label)
        op2 = f"read workload statistics of {self.opts.dell_system_name!r}"
        w = await self.client.get(
            "/statistics/summary/workload", op=op2, params={"system_names": self.opts.dell_system_name}
        )
        loads = field(w.body, "workload", op=op2, label=self.client.label)
        load = loads[0] if loads else {}
        return PerfMetric(
            int(stats.get("disk", {}).get("iops") or 0),
            0,  # OneFS's summary has one disk iops figure, not split by direction
            int(stats.get("onefs", {}).get("out") or 0),
            int(stats.get("onefs", {}).get("in") or 0),
            float(load.get("latency_read") or 0),
            float(load.get("latency_write") or 0),
        )
