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

from backends.base import Capability, FSUsage, PerfMetric, ScopeUsage
from backends.vendors.appliance import ApplianceQuotaModel, ApplianceVolume, RestTarget, VendorOptions, rmdir_scope
from backends.vendors.rest import ApplianceError, Reply

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


class NetappQuotaModel(ApplianceQuotaModel):
    v: NetappVolume

    def _ids(self) -> dict[str, Any]:
        return {"svm": {"uuid": self.v.svm_uuid}, "volume": {"uuid": self.v.vol_uuid}}

    async def _qtree_id(self, qsid: str, op: str) -> int | None:
        r = await self.v.client.get(
            "/storage/qtrees", op=op, params={"volume.uuid": self.v.vol_uuid, "name": qsid, "fields": "id"}
        )
        f = self.v.client.fields(op)
        records = f.objects(r.body, "records")
        return f.number(records[0], "id") if records else None

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
        f = self.v.client.fields(op)
        records = f.objects(r.body, "records")
        return f.field(records[0], "uuid", kind=str) if records else None

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
        f = self.v.client.fields(op)
        records = f.objects(r.body, "records")
        if not records:
            return ScopeUsage(None, None)
        hard = f.number(records[0], "space", "hard_limit", default=None)
        return ScopeUsage(f.number(records[0], "space", "used", "total", default=0), hard or None)

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
    target = RestTarget(
        "netapp_ontap_endpoint", "/api", "netapp_verify_ssl", ("netapp_ontap_user", "netapp_ontap_password")
    )
    quota_model = NetappQuotaModel
    opts: NetappOptions

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.vol_uuid = ""
        self.svm_uuid = ""
        self._quota_on = False

    async def discover(self) -> None:
        name = self.opts.netapp_volume_name
        op = f"look up ONTAP volume {name!r}"
        params = {"name": name, "fields": "nas.path,svm"}
        if self.opts.netapp_svm:
            params["svm.name"] = self.opts.netapp_svm
        r = await self.client.get("/storage/volumes", op=op, params=params)
        f = self.client.fields(op)
        records = f.objects(r.body, "records")
        if not records:
            raise ApplianceError(f"{self.client.label}: {op}: no such volume")
        self.vol_uuid = f.field(records[0], "uuid", kind=str)
        self.svm_uuid = f.field(records[0], "svm", "uuid", kind=str)

    async def wait_job(self, reply: Reply, op: str, tolerate: tuple[str, ...] = ()) -> None:
        """Poll the job a mutation answer names until it ends; a failure whose code is in ``tolerate`` is fine.

        202 (Accepted) always names a job; another 2xx may (the job ended within ``return_timeout``) or not.
        """
        if reply.status != 202 and not (isinstance(reply.body, dict) and "job" in reply.body):
            return  # answered synchronously
        uuid = self.client.fields(op).field(reply.body, "job", "uuid", kind=str)
        f = self.client.fields(f"{op} (job {uuid})")
        deadline = time.monotonic() + self.opts.netapp_job_timeout
        while True:
            body = (await self.client.get(f"/cluster/jobs/{uuid}", op=f.op)).body
            state = f.field(body, "state", kind=str)
            if state == "success":
                return
            if state == "failure":
                code = str(f.field(body, "code", default=None) or f.field(body, "error", "code", default=""))
                if code in tolerate:
                    return
                message = f.field(body, "message", default="")
                raise ApplianceError(f"{self.client.label}: {op} failed: job {uuid}: {message} (code {code})")
            if state not in WAITING:
                raise ApplianceError(f"{self.client.label}: {op}: job {uuid} in unknown state {state!r}")
            if time.monotonic() >= deadline:
                raise ApplianceError(f"{self.client.label}: {op}: job {uuid} still {state}")
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
        return self.client.fields(op).field(r.body, kind=dict)

    async def fs_usage(self) -> FSUsage:
        f = self.client.fields("read volume space")
        body = await self._volume("space", f.op)
        return FSUsage(f.number(body, "space", "size"), f.number(body, "space", "used"))

    async def appliance_hwinfo(self) -> tuple[str, str | None, dict[str, str]]:
        f = self.client.fields("read volume state")
        body = await self._volume("state,files,quota", f.op)
        meta = {
            "ontap_volume": self.opts.netapp_volume_name,
            "quota_state": str(f.field(body, "quota", "state", default=None)),
            "files_used": str(f.field(body, "files", "used", default=None)),
            "files_max": str(f.field(body, "files", "maximum", default=None)),
        }
        state = f.field(body, "state", kind=str)  # requested: an answer without it is malformed, not "online"
        if state != "online":
            return "degraded", f"ONTAP volume {self.opts.netapp_volume_name!r} is {state}", meta
        return "healthy", None, meta

    async def performance_metric(self) -> PerfMetric:
        f = self.client.fields("read volume statistics")
        stats = f.field(await self._volume("statistics", f.op), "statistics", kind=dict)

        def raw(counter: str, kind: str) -> int:
            return f.number(stats, counter, kind, default=0)

        def per_op(kind: str) -> float:
            n = raw("iops_raw", kind)
            return f.number(stats, "latency_raw", kind, cast=float, default=0.0) / n if n else 0.0

        return PerfMetric(
            raw("iops_raw", "read"),
            raw("iops_raw", "write"),
            raw("throughput_raw", "read"),
            raw("throughput_raw", "write"),
            per_op("read"),
            per_op("write"),
        )
