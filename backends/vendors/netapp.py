"""``netapp``: NetApp ONTAP through its REST API; a quota scope is a qtree with a tree quota rule.

The volume's junction is the agent's mount, so a qtree named after the
scope shows up as ``<mount>/<qsid>``. Mutations answer 202 with a job that
is polled to the end. Quota reports only exist once quotas are on for the
ONTAP volume; the agent switches them on with the first rule it adds
("already on", code 5308507, is fine).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from pydantic import Field, SecretStr

from backends.base import Capability, FSUsage, PerfMetric, QuotaModel, ScopeUsage
from backends.vendors.appliance import ApplianceVolume, VendorOptions, rmdir_scope
from backends.vendors.rest import ApplianceError, BasicAuth, Reply, RestClient, field

QUOTA_ALREADY_ON = "5308507"
WAITING = {"queued", "running", "paused"}


class NetappOptions(VendorOptions):
    netapp_ontap_endpoint: str
    netapp_ontap_user: str
    netapp_ontap_password: SecretStr
    netapp_volume_name: str
    netapp_svm: str | None = None
    netapp_verify_ssl: bool = False
    netapp_job_poll_interval: float = Field(default=0.2, gt=0)
    netapp_job_timeout: float = Field(default=60.0, gt=0)


class NetappQuotaModel(QuotaModel):
    def __init__(self, volume: NetappVolume) -> None:
        self.v = volume

    def _ids(self) -> dict[str, Any]:
        return {"svm": {"uuid": self.v.svm_uuid}, "volume": {"uuid": self.v.vol_uuid}}

    async def _qtree_id(self, qsid: str, op: str) -> int | None:
        r = await self.v.client.get(
            "/storage/qtrees", op=op, params={"volume.uuid": self.v.vol_uuid, "name": qsid, "fields": "id"}
        )
        records = field(r.body, "records", op=op, label=self.v.client.label)
        return int(records[0]["id"]) if records else None

    async def _rule(self, qsid: str, op: str) -> str | None:
        r = await self.v.client.get(
            "/storage/quota/rules",
            op=op,
            params={
                "svm.uuid": self.v.svm_uuid,
                "volume.uuid": self.v.vol_uuid,
                "type": "tree",
                "qtree.name": qsid,
                "fields": "space,files",
            },
        )
        records = field(r.body, "records", op=op, label=self.v.client.label)
        return records[0]["uuid"] if records else None

    async def create(self, qsid: str, limit_bytes: int | None) -> None:
        await self.v.ready()
        op = f"create qtree for quota scope {qsid!r}"
        if await self._qtree_id(qsid, op) is None:
            r = await self.v.client.call("POST", "/storage/qtrees", op=op, json={**self._ids(), "name": qsid})
            await self.v.wait_job(r, op)
        path = self.v.scope_path(qsid)
        if not await asyncio.to_thread(path.is_dir):
            raise ApplianceError(
                f"{self.v.client.label}: {op}: the qtree did not appear at {path} "
                f"(is the volume path the NFS mount of ONTAP volume {self.v.opts.netapp_volume_name!r}?)"
            )
        if limit_bytes is not None:
            await self._set(qsid, limit_bytes, op)

    async def _set(self, qsid: str, limit_bytes: int | None, op: str) -> None:
        limit_bytes = limit_bytes or None  # 0 = no limit, as upstream backends read it
        rule = await self._rule(qsid, op)
        if limit_bytes is None:
            if rule is not None:
                r = await self.v.client.call("DELETE", f"/storage/quota/rules/{rule}", op=op)
                await self.v.wait_job(r, op)
            return
        space = {"hard_limit": limit_bytes, "soft_limit": limit_bytes}
        if rule is not None:
            r = await self.v.client.call("PATCH", f"/storage/quota/rules/{rule}", op=op, json={"space": space})
        else:
            r = await self.v.client.call(
                "POST",
                "/storage/quota/rules",
                op=op,
                json={**self._ids(), "type": "tree", "qtree": {"name": qsid}, "space": space},
            )
        await self.v.wait_job(r, op)
        await self.v.enable_quota(op)  # rules only take effect (and reports only exist) with quotas on

    async def describe(self, qsid: str) -> ScopeUsage:
        await asyncio.to_thread(self.v.require_scope, qsid)
        await self.v.ready()
        op = f"read the quota report of quota scope {qsid!r}"
        r = await self.v.client.get(
            "/storage/quota/reports",
            op=op,
            params={
                "type": "tree",
                "svm.uuid": self.v.svm_uuid,
                "volume.uuid": self.v.vol_uuid,
                "qtree.name": qsid,
                "fields": "space",
            },
        )
        records = field(r.body, "records", op=op, label=self.v.client.label)
        if not records:
            return ScopeUsage(None, None)
        space = records[0].get("space", {})
        hard = space.get("hard_limit")
        return ScopeUsage(int(space.get("used", {}).get("total", 0)), int(hard) if hard else None)

    async def update(self, qsid: str, limit_bytes: int | None) -> None:
        await asyncio.to_thread(self.v.require_scope, qsid)
        await self.v.ready()
        await self._set(qsid, limit_bytes, f"set the quota rule of quota scope {qsid!r}")

    async def delete(self, qsid: str) -> None:
        path = await asyncio.to_thread(self.v.prepare_scope_removal, qsid)
        await self.v.ready()
        op = f"delete the qtree of quota scope {qsid!r}"
        await self._set(qsid, None, op)
        qtree = await self._qtree_id(qsid, op)
        if qtree is not None:
            r = await self.v.client.call("DELETE", f"/storage/qtrees/{self.v.vol_uuid}/{qtree}", op=op)
            await self.v.wait_job(r, op)
        await asyncio.to_thread(rmdir_scope, path)


class NetappVolume(ApplianceVolume):
    backend = "netapp"
    appliance = "NetApp ONTAP"
    Options = NetappOptions
    capabilities = frozenset({Capability.VFOLDER, Capability.QUOTA, Capability.METRIC, Capability.FAST_FS_SIZE})
    opts: NetappOptions

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.vol_uuid = ""
        self.svm_uuid = ""
        self._quota_on = False
        self._quota = NetappQuotaModel(self)

    @property
    def quota(self) -> NetappQuotaModel:
        return self._quota

    def make_client(self) -> RestClient:
        o = self.opts
        auth = BasicAuth(o.netapp_ontap_user, o.netapp_ontap_password.get_secret_value())
        return self.rest(o.netapp_ontap_endpoint.rstrip("/") + "/api", auth, o.netapp_verify_ssl)

    async def discover(self) -> None:
        name = self.opts.netapp_volume_name
        op = f"look up ONTAP volume {name!r}"
        params = {"name": name, "fields": "nas.path,svm"}
        if self.opts.netapp_svm:
            params["svm.name"] = self.opts.netapp_svm
        r = await self.client.get("/storage/volumes", op=op, params=params)
        records = field(r.body, "records", op=op, label=self.client.label)
        if not records:
            raise ApplianceError(f"{self.client.label}: {op}: no such volume")
        self.vol_uuid = records[0]["uuid"]
        self.svm_uuid = field(records[0], "svm", "uuid", op=op, label=self.client.label)

    async def wait_job(self, reply: Reply, op: str, tolerate: tuple[str, ...] = ()) -> None:
        job = reply.body.get("job") if isinstance(reply.body, dict) else None
        if not job:
            return  # answered synchronously
        deadline = time.monotonic() + self.opts.netapp_job_timeout
        while True:
            r = await self.client.get(f"/cluster/jobs/{job['uuid']}", op=f"{op} (job {job['uuid']})")
            state = r.body.get("state", "")
            if state == "success":
                return
            if state == "failure":
                code = str(r.body.get("code") or r.body.get("error", {}).get("code", ""))
                if code in tolerate:
                    return
                raise ApplianceError(
                    f"{self.client.label}: {op} failed: job {job['uuid']}: {r.body.get('message', '')} (code {code})"
                )
            if state not in WAITING:
                raise ApplianceError(f"{self.client.label}: {op}: job {job['uuid']} in unknown state {state!r}")
            if time.monotonic() >= deadline:
                raise ApplianceError(f"{self.client.label}: {op}: job {job['uuid']} still {state}")
            await asyncio.sleep(self.opts.netapp_job_poll_interval)

    async def enable_quota(self, op: str) -> None:
        if self._quota_on:
            return
        r = await self.client.call(
            "PATCH",
            f"/storage/volumes/{self.vol_uuid}",
            op=f"{op}: switch quotas on",
            json={"quota": {"enabled": True}},
        )
        await self.wait_job(r, f"{op}: switch quotas on", tolerate=(QUOTA_ALREADY_ON,))
        self._quota_on = True

    async def _volume(self, fields: str, op: str) -> dict[str, Any]:
        await self.ready()
        r = await self.client.get(f"/storage/volumes/{self.vol_uuid}", op=op, params={"fields": fields})
        return r.body if isinstance(r.body, dict) else {}

    async def fs_usage(self) -> FSUsage:
        op = "read volume space"
        body = await self._volume("space", op)
        space = field(body, "space", op=op, label=self.client.label)
        return FSUsage(int(space["size"]), int(space["used"]))

    async def appliance_hwinfo(self) -> tuple[str, str | None, dict[str, str]]:
        body = await self._volume("state,files,quota", "read volume state")
        meta = {
            "ontap_volume": self.opts.netapp_volume_name,
            "quota_state": str(body.get("quota", {}).get("state")),
            "files_used": str(body.get("files", {}).get("used")),
            "files_max": str(body.get("files", {}).get("maximum")),
        }
        state = body.get("state", "online")
        if state != "online":
            return "degraded", f"ONTAP volume {self.opts.netapp_volume_name!r} is {state}", meta
        return "healthy", None, meta

    async def performance_metric(self) -> PerfMetric:
        op = "read volume statistics"
        stats = field(await self._volume("statistics", op), "statistics", op=op, label=self.client.label)
        iops, tput, lat = stats.get("iops_raw", {}), stats.get("throughput_raw", {}), stats.get("latency_raw", {})

        def per_op(kind: str) -> float:
            n = int(iops.get(kind) or 0)
            return float(lat.get(kind) or 0) / n if n else 0.0

        return PerfMetric(
            int(iops.get("read") or 0),
            int(iops.get("write") or 0),
            int(tput.get("read") or 0),
            int(tput.get("write") or 0),
            per_op("read"),
            per_op("write"),
        )
