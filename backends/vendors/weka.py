"""``weka``: WekaFS through its REST API v2; a quota scope is a directory with a Weka directory quota.

Weka keys a directory quota by the directory's inode number inside the
filesystem (``/fileSystems/{uid}/quota/{inode}``), so the scope directory is
made on the mount first and its ``st_ino`` names the quota. Access tokens
come from ``/login``, are refreshed with the refresh token before they
expire (or when the appliance answers 401), and a full login is the fallback.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import time
from typing import Any

from pydantic import SecretStr

from backends.base import Capability, FSUsage, PerfMetric, ScopeUsage
from backends.vendors.appliance import ApplianceQuotaModel, ApplianceVolume, RestTarget, VendorOptions, rmdir_scope
from backends.vendors.rest import ApplianceError, Auth, Fields, RestClient

UNLIMITED = 2**63 - 1  # Weka answers "no limit" as the largest int64
STATS = ("READS", "WRITES", "READ_BYTES", "WRITE_BYTES", "READ_LATENCY", "WRITE_LATENCY")


class WekaOptions(VendorOptions):
    weka_endpoint: str
    weka_username: str
    weka_password: SecretStr
    weka_organization: str = "Root"
    weka_fs_name: str
    weka_verify_ssl: bool = False


class WekaTokenAuth(Auth):
    """Bearer tokens: refreshed ahead of expiry, renewed on 401 (refresh token first, then a new login)."""

    renewable = True

    def __init__(self, opts: WekaOptions) -> None:
        self.opts = opts
        self.access: str | None = None
        self.refresh: str | None = None
        self.expires = 0.0
        self._lock = asyncio.Lock()

    async def headers(self, client: RestClient, op: str) -> dict[str, str]:
        if self.access is None or time.monotonic() >= self.expires:
            await self._obtain(client, op, stale=self.access)
        return {"Authorization": f"Bearer {self.access}"}

    async def renew(self, client: RestClient, op: str) -> None:
        await self._obtain(client, op, stale=self.access)

    async def _obtain(self, client: RestClient, op: str, stale: str | None) -> None:
        async with self._lock:
            if self.access is not None and self.access != stale and time.monotonic() < self.expires:
                return  # another request renewed it meanwhile
            if self.refresh is not None:
                r = await client.call(
                    "POST",
                    "/login/refresh",
                    op=f"token refresh (for {op})",
                    json={"refresh_token": self.refresh},
                    auth=False,
                    accept=(400, 401, 403),
                    idempotent=True,  # a repeat at worst finds the token used up (401) and a login follows
                )
                if r.ok:
                    self._store(client, r.body, op)
                    return
            r = await client.call(
                "POST",
                "/login",
                op=f"login as {self.opts.weka_username!r} (for {op})",
                json={
                    "username": self.opts.weka_username,
                    "password": self.opts.weka_password.get_secret_value(),
                    "org": self.opts.weka_organization,
                },
                auth=False,
                idempotent=True,  # a repeated login only hands out another token
            )
            self._store(client, r.body, op)

    def _store(self, client: RestClient, body: Any, op: str) -> None:
        f = client.fields(f"login (for {op})")
        data = f.field(body, "data", kind=dict)
        self.access = f.field(data, "access_token", kind=str)
        self.refresh = f.field(data, "refresh_token", kind=str, default=None) or self.refresh
        ttl = f.number(data, "expires_in", cast=float, default=0.0) or 300.0
        self.expires = time.monotonic() + max(ttl - min(30.0, ttl * 0.1), 0.0)


class WekaQuotaModel(ApplianceQuotaModel):
    v: WekaVolume

    async def _inode(self, qsid: str) -> int:
        path = await asyncio.to_thread(self.v.require_scope, qsid)
        return (await asyncio.to_thread(os.stat, path)).st_ino

    async def create(self, qsid: str, limit_bytes: int | None) -> None:
        limit_bytes = limit_bytes or None  # 0 = no limit, as upstream backends read it
        await self.v.ready()
        await asyncio.to_thread(self.v.scope_path(qsid).mkdir, 0o755, False, True)
        if limit_bytes is not None:
            await self._set(qsid, limit_bytes, f"create quota scope {qsid!r}")

    async def _set(self, qsid: str, limit_bytes: int, op: str) -> None:
        ino = await self._inode(qsid)
        await self.v.client.call(
            "PUT",
            f"/fileSystems/{self.v.fs_uid}/quota/{ino}",
            op=op,
            json={"path": f"/{qsid}", "hard_limit_bytes": limit_bytes, "soft_limit_bytes": limit_bytes},
        )

    async def describe(self, qsid: str) -> ScopeUsage:
        await self.v.ready()
        ino = await self._inode(qsid)
        f = self.v.client.fields(f"describe quota scope {qsid!r}")
        r = await self.v.client.get(f"/fileSystems/{self.v.fs_uid}/quota/{ino}", op=f.op, accept=(404,))
        quota = _quota_object(f, r.body) if r.ok else None
        if quota is None:
            return ScopeUsage(None, None)
        hard = f.number(quota, "hard_limit_bytes", default=None)
        limit = None if hard in (None, 0) or hard >= UNLIMITED else hard
        return ScopeUsage(f.number(quota, "used_bytes", default=None), limit)

    async def update(self, qsid: str, limit_bytes: int | None) -> None:
        limit_bytes = limit_bytes or None
        await self.v.ready()
        op = f"set the limit of quota scope {qsid!r}"
        if limit_bytes is not None:
            await self._set(qsid, limit_bytes, op)
            return
        ino = await self._inode(qsid)
        await self.v.client.call("DELETE", f"/fileSystems/{self.v.fs_uid}/quota/{ino}", op=op, accept=(404,))

    async def delete(self, qsid: str) -> None:
        await self.v.ready()
        path = await asyncio.to_thread(self.v.prepare_scope_removal, qsid)
        ino = (await asyncio.to_thread(os.stat, path)).st_ino
        await self.v.client.call(
            "DELETE", f"/fileSystems/{self.v.fs_uid}/quota/{ino}", op=f"delete quota scope {qsid!r}", accept=(404,)
        )
        await asyncio.to_thread(rmdir_scope, path)


def _quota_object(f: Fields, body: Any) -> dict[str, Any] | None:
    """``data`` is the quota object itself or ``{quota_id: object}``; null or empty means "no quota"."""
    if not f.field(body, "data"):
        return None
    data = f.field(body, "data", kind=dict)
    if "hard_limit_bytes" in data or "used_bytes" in data:
        return data
    return f.field(data, next(iter(data)), kind=dict)


class WekaVolume(ApplianceVolume):
    backend = "weka"
    appliance = "Weka"
    Options = WekaOptions
    capabilities = frozenset({Capability.VFOLDER, Capability.QUOTA, Capability.METRIC, Capability.FAST_FS_SIZE})
    target = RestTarget("weka_endpoint", "/api/v2", "weka_verify_ssl")
    quota_model = WekaQuotaModel
    opts: WekaOptions

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fs_uid = ""

    def auth(self) -> Auth:
        return WekaTokenAuth(self.opts)

    async def discover(self) -> None:
        f = self.client.fields(f"look up filesystem {self.opts.weka_fs_name!r}")
        r = await self.client.get("/fileSystems", op=f.op)
        for fs in f.objects(r.body, "data"):
            if fs.get("name") == self.opts.weka_fs_name:
                self.fs_uid = f.field(fs, "uid", kind=str)
                return
        raise ApplianceError(f"{self.client.label}: {f.op}: no such filesystem on the cluster")

    async def fs_usage(self) -> FSUsage:
        await self.ready()
        f = self.client.fields("read filesystem capacity")
        r = await self.client.get(f"/fileSystems/{self.fs_uid}", op=f.op)
        return FSUsage(f.number(r.body, "data", "total_budget"), f.number(r.body, "data", "used_total"))

    async def appliance_hwinfo(self) -> tuple[str, str | None, dict[str, str]]:
        h = self.client.fields("health check")
        text = _health_text(h, (await self.client.get("/healthcheck", op=h.op, accept=(503,))).body)
        c = self.client.fields("read cluster info")
        data = c.field((await self.client.get("/cluster", op=c.op)).body, "data", kind=dict, default={})
        meta = {"cluster_name": str(data.get("name", "")), "release": str(data.get("release", ""))}
        if text.strip().lower().strip('"') == "ok":
            return "healthy", None, meta
        return "degraded", f"Weka health check: {text.strip()[:200]}", meta

    async def performance_metric(self) -> PerfMetric:
        await self.ready()
        start = dt.datetime.now(dt.UTC).replace(second=0, microsecond=0) - dt.timedelta(minutes=1)
        params = [("start_time", start.strftime("%Y-%m-%dT%H:%M:%SZ"))] + [("stat", f"ops.{s}") for s in STATS]
        f = self.client.fields("read performance statistics")
        r = await self.client.get("/stats", op=f.op, params=params)
        samples = f.objects(r.body, "data", "all", "ops")
        stats = f.field(samples[-1], "stats", kind=dict, default={}) if samples else {}

        def num(key: str) -> float:
            return f.number(stats, key, cast=float, default=0.0)  # null (no samples yet) -> 0

        return PerfMetric(
            int(num("READS")),
            int(num("WRITES")),
            int(num("READ_BYTES")),
            int(num("WRITE_BYTES")),
            num("READ_LATENCY"),
            num("WRITE_LATENCY"),
        )


def _health_text(f: Fields, body: Any) -> str:
    """The health check's verdict: plain text, or JSON with it in ``data`` (the shape is unverified)."""
    return str(f.field(body, "data", default=body)) if isinstance(body, dict) else str(body)
