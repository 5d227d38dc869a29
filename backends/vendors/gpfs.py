"""``gpfs`` (alias ``spectrumscale``): IBM Storage Scale through its management REST API v2.

A quota scope is an independent fileset (name = prefix + qsid) linked at the
scope's path on the mount, and its limit is a FILESET quota. Every mutation
answers with a job that is polled until it completes, so a 204 from the
agent means the appliance has really done it. Limits are sent with an
explicit ``K`` suffix (KiB, rounded up), which ``mmsetquota`` reads the same
way whatever the REST default unit is; reports are in KiB.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from pydantic import Field, SecretStr

from backends.base import Capability, FSUsage, PerfMetric, ScopeUsage
from backends.errors import QuotaScopeNotFound
from backends.vendors.appliance import ApplianceQuotaModel, ApplianceVolume, RestTarget, VendorOptions, rmdir_scope
from backends.vendors.rest import ApplianceError, Fields, Reply

UNHEALTHY = {"FAILED", "DEGRADED", "ERROR"}
PERF_QUERY = (
    "metrics avg(gpfs_ns_read_ops),avg(gpfs_ns_write_ops),avg(gpfs_ns_bytes_read),avg(gpfs_ns_bytes_written),"
    "avg(gpfs_ns_max_disk_wait_rd),avg(gpfs_ns_max_disk_wait_wr) last 1 bucket_size 10"
)


class GpfsOptions(VendorOptions):
    gpfs_endpoint: str
    gpfs_username: str
    gpfs_password: SecretStr
    gpfs_fs_name: str
    gpfs_verify_ssl: bool = False
    gpfs_owner: str = Field(default="1000:1000", pattern=r"^\d+:\d+$")
    gpfs_fileset_prefix: str = ""
    gpfs_junction_root: str | None = None  # the volume root as GPFS names it, when mounted elsewhere here
    gpfs_job_poll_interval: float = Field(default=0.5, gt=0)
    gpfs_job_timeout: float = Field(default=60.0, gt=0)


def _kib(limit_bytes: int) -> str:
    return f"{-(-limit_bytes // 1024)}K"


class GpfsQuotaModel(ApplianceQuotaModel):
    v: GpfsVolume

    def fileset(self, qsid: str) -> str:
        return self.v.opts.gpfs_fileset_prefix + qsid

    def junction(self, qsid: str) -> str:
        root = self.v.opts.gpfs_junction_root
        return f"{root.rstrip('/')}/{qsid}" if root else str(self.v.scope_path(qsid))

    @property
    def fs(self) -> str:
        return self.v.opts.gpfs_fs_name

    async def create(self, qsid: str, limit_bytes: int | None) -> None:
        op = f"create fileset {self.fileset(qsid)!r} for quota scope {qsid!r}"
        path = self.v.scope_path(qsid)
        reply = await self.v.client.call(
            "POST",
            f"/filesystems/{self.fs}/filesets",
            op=op,
            json={"filesetName": self.fileset(qsid), "path": self.junction(qsid), "owner": self.v.opts.gpfs_owner},
            accept=(409,),
        )
        if reply.status != 409:  # 409: the fileset exists already - creating a scope twice is fine
            await self.v.wait_jobs(reply, op)
        if not await asyncio.to_thread(path.is_dir):
            raise ApplianceError(
                f"{self.v.client.label}: {op}: the fileset's junction {path} did not appear on the mount "
                f"(does the volume path match the GPFS mount?)"
            )
        if limit_bytes is not None:
            await self._set(qsid, limit_bytes, op)

    async def _set(self, qsid: str, limit_bytes: int | None, op: str) -> None:
        limit = "0" if limit_bytes is None else _kib(limit_bytes)
        reply = await self.v.client.call(
            "POST",
            f"/filesystems/{self.fs}/quotas",
            op=op,
            idempotent=True,  # setQuota sets absolute limits: a repeat after a lost answer changes nothing
            json={
                "operationType": "setQuota",
                "quotaType": "FILESET",
                "objectName": self.fileset(qsid),
                "blockSoftLimit": limit,
                "blockHardLimit": limit,
            },
        )
        await self.v.wait_jobs(reply, op)

    async def describe(self, qsid: str) -> ScopeUsage:
        await asyncio.to_thread(self.v.require_scope, qsid)
        op = f"read the quota of fileset {self.fileset(qsid)!r} (quota scope {qsid!r})"
        reply = await self.v.client.get(
            f"/filesystems/{self.fs}/quotas",
            op=op,
            params={"filter": f"quotaType=FILESET,objectName={self.fileset(qsid)}"},
        )
        f = self.v.client.fields(op)
        for q in f.objects(reply.body, "quotas"):
            if q.get("isDefaultQuota") or q.get("objectName") != self.fileset(qsid):
                continue
            limit_kib = f.number(q, "blockLimit", default=0)
            return ScopeUsage(f.number(q, "blockUsage", default=0) * 1024, limit_kib * 1024 if limit_kib else None)
        return ScopeUsage(None, None)

    async def update(self, qsid: str, limit_bytes: int | None) -> None:
        await asyncio.to_thread(self.v.require_scope, qsid)
        await self._set(qsid, limit_bytes, f"set the quota of fileset {self.fileset(qsid)!r} (quota scope {qsid!r})")

    async def delete(self, qsid: str) -> None:
        path = await asyncio.to_thread(self.v.prepare_scope_removal, qsid)
        op = f"delete fileset {self.fileset(qsid)!r} (quota scope {qsid!r})"
        reply = await self.v.client.call(
            "DELETE", f"/filesystems/{self.fs}/filesets/{self.fileset(qsid)}", op=op, accept=(404,)
        )
        if reply.status == 404:
            raise QuotaScopeNotFound(f"quota scope {qsid!r} has no fileset on volume {self.v.name!r}")
        await self.v.wait_jobs(reply, op)
        await asyncio.to_thread(rmdir_scope, path)


class GpfsVolume(ApplianceVolume):
    backend = "gpfs"
    appliance = "GPFS"
    Options = GpfsOptions
    capabilities = frozenset({Capability.VFOLDER, Capability.QUOTA, Capability.METRIC, Capability.FAST_FS_SIZE})
    target = RestTarget("gpfs_endpoint", "/scalemgmt/v2", "gpfs_verify_ssl", ("gpfs_username", "gpfs_password"))
    quota_model = GpfsQuotaModel
    opts: GpfsOptions

    async def wait_jobs(self, reply: Reply, op: str) -> None:
        """Poll each job the mutation started until it is COMPLETED; FAILED / CANCELLED become errors.

        Every mutation answers with its jobs; an answer without them cannot show the change was made.
        """
        f = self.client.fields(op)
        for job in f.objects(reply.body, "jobs"):
            await self._wait_job(f.number(job, "jobId"), op)

    async def _wait_job(self, job_id: int, op: str) -> None:
        deadline = time.monotonic() + self.opts.gpfs_job_timeout
        f = self.client.fields(f"{op} (job {job_id})")
        while True:
            r = await self.client.get(f"/jobs/{job_id}", op=f.op, accept=(404,))
            # 404: the job is not registered yet - polled again, as upstream does
            job = {"status": "RUNNING"} if r.status == 404 else f.field(r.body, "jobs", 0, kind=dict)
            status = f.field(job, "status", kind=str)
            if status == "COMPLETED":
                return
            if status in ("FAILED", "CANCELLED"):
                raise ApplianceError(f"{self.client.label}: {op} failed: job {job_id} {status}: {_job_detail(f, job)}")
            if status not in ("RUNNING", "CANCELLING"):
                raise ApplianceError(f"{self.client.label}: {op}: job {job_id} in unknown state {status!r}")
            if time.monotonic() >= deadline:
                raise ApplianceError(
                    f"{self.client.label}: {op}: job {job_id} still {status} after {self.opts.gpfs_job_timeout:g} s"
                )
            await asyncio.sleep(self.opts.gpfs_job_poll_interval)

    async def fs_usage(self) -> FSUsage:
        fs = self.opts.gpfs_fs_name
        f = self.client.fields(f"read the storage pools of filesystem {fs!r}")
        r = await self.client.get(f"/filesystems/{fs}/pools", op=f.op)
        capacity = used = 0
        for pool in f.objects(r.body, "storagePool"):
            total, free = await self._pool_kib(fs, f.field(pool, "storagePoolName", kind=str))
            capacity += total * 1024
            used += (total - free) * 1024
        return FSUsage(capacity, used)

    async def _pool_kib(self, fs: str, name: str) -> tuple[int, int]:
        """(total, free) data KiB of one storage pool."""
        f = self.client.fields(f"read storage pool {name!r}")
        p = await self.client.get(f"/filesystems/{fs}/pools/{name}", op=f.op)
        info = f.field(p.body, "storagePool", 0, kind=dict)
        return f.number(info, "totalDataInKB", default=0), f.number(info, "freeDataInKB", default=0)

    async def appliance_hwinfo(self) -> tuple[str, str | None, dict[str, str]]:
        f = self.client.fields("list cluster nodes")
        r = await self.client.get("/nodes", op=f.op)
        bad: list[str] = []
        for node in f.objects(r.body, "nodes"):
            bad += await self._node_problems(f.field(node, "adminNodeName", kind=str))
        c = self.client.fields("read cluster info")
        body = (await self.client.get("/cluster", op=c.op)).body
        summary = c.field(body, "cluster", "clusterSummary", kind=dict, default={})
        meta = {"cluster_name": str(summary.get("clusterName", "")), "filesystem": self.opts.gpfs_fs_name}
        if bad:
            return "degraded", "; ".join(bad), meta
        return "healthy", None, meta

    async def _node_problems(self, name: str) -> list[str]:
        """``node: component STATE`` for each unhealthy health state the node reports."""
        f = self.client.fields(f"read health of node {name!r}")
        h = await self.client.get(f"/nodes/{name}/health/states", op=f.op)
        states = f.objects(h.body, "states")
        return [f"{name}: {st.get('component', '?')} {st['state']}" for st in states if st.get("state") in UNHEALTHY]

    async def performance_metric(self) -> PerfMetric:
        f = self.client.fields("read performance data")
        r = await self.client.get("/perfmon/data", op=f.op, params={"query": PERF_QUERY})
        rows = f.objects(r.body, "performanceData", "rows")
        last = rows[-1] if rows else {}

        def value(i: int, cast: type[int] | type[float]) -> Any:
            return f.number(last, "values", i, cast=cast, default=cast(0))  # null or absent -> 0

        return PerfMetric(value(0, int), value(1, int), value(2, int), value(3, int), value(4, float), value(5, float))


def _job_detail(f: Fields, job: dict[str, Any]) -> str:
    """Why a job failed: its stderr lines, else its exit code."""
    result = f.field(job, "result", kind=dict, default={})
    stderr = f.field(result, "stderr", kind=list, default=[])
    return " ".join(str(x).strip() for x in stderr if x) or str(result.get("exitCode", ""))
