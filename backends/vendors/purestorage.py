"""``purestorage``: Pure Storage FlashBlade through its REST API 1.x.

FlashBlade has filesystem-wide limits and per-user/group quotas but no
directory quota (directory quotas on "managed directories" are a FlashArray
feature), so quota scopes are plain directories as with ``vfs`` and their
figures come from the agent's own accounting. The appliance supplies the
filesystem's capacity and usage, array details and performance counters.
The session comes from ``/api/login`` with the API token and is renewed when
the array answers 401 (sessions time out on the array).
"""

from __future__ import annotations

import asyncio
from typing import Any

from pydantic import SecretStr

from backends.base import Capability, FSUsage, PerfMetric
from backends.vendors.appliance import ApplianceVolume, RestTarget, VendorOptions
from backends.vendors.rest import ApplianceError, Auth, RestClient
from backends.vfs import DirectoryQuotaModel

# blade states that mean lost or unconfirmed service (the others: healthy, unused slots, identifying, evacuat*)
BAD_BLADE_STATES = frozenset({"critical", "unhealthy", "unknown"})


class PureOptions(VendorOptions):
    purity_endpoint: str
    purity_api_token: SecretStr
    purity_api_version: str = "1.8"
    purity_fs_name: str
    purity_ssl_verify: bool = False


class PureSessionAuth(Auth):
    """``x-auth-token`` session from ``POST /api/login`` (header ``api-token``); a new login on 401."""

    renewable = True

    def __init__(self, api_token: str) -> None:
        self.api_token = api_token
        self.session: str | None = None
        self._lock = asyncio.Lock()

    async def headers(self, client: RestClient, op: str) -> dict[str, str]:
        if self.session is None:
            await self._login(client, op, stale=None)
        return {"x-auth-token": self.session or ""}

    async def renew(self, client: RestClient, op: str) -> None:
        await self._login(client, op, stale=self.session)

    async def _login(self, client: RestClient, op: str, stale: str | None) -> None:
        async with self._lock:
            if self.session is not None and self.session != stale:
                return
            r = await client.call(
                "POST",
                "/login",
                op=f"login (for {op})",
                headers={"api-token": self.api_token},
                auth=False,
                idempotent=True,  # a repeated login only opens another session
            )
            token = r.headers.get("x-auth-token")
            if not token:
                raise ApplianceError(f"{client.label}: login (for {op}): the answer carried no x-auth-token")
            self.session = token


class PureVolume(ApplianceVolume):
    backend = "purestorage"
    appliance = "FlashBlade"
    Options = PureOptions
    capabilities = frozenset({Capability.VFOLDER, Capability.METRIC, Capability.FAST_FS_SIZE})
    target = RestTarget("purity_endpoint", "/api", "purity_ssl_verify")
    quota_model = DirectoryQuotaModel
    opts: PureOptions

    def auth(self) -> Auth:
        return PureSessionAuth(self.option("purity_api_token"))

    def _v(self, path: str) -> str:
        return f"/{self.opts.purity_api_version}{path}"

    async def _first_item(self, path: str, op: str, **params: str) -> dict[str, Any]:
        r = await self.client.get(self._v(path), op=op, params=params)
        items = self.client.fields(op).objects(r.body, "items")
        if not items:
            raise ApplianceError(f"{self.client.label}: {op}: no filesystem named {self.opts.purity_fs_name!r}")
        return items[0]

    async def fs_usage(self) -> FSUsage:
        f = self.client.fields(f"read filesystem {self.opts.purity_fs_name!r}")
        fs = await self._first_item("/file-systems", f.op, names=self.opts.purity_fs_name)
        return FSUsage(f.number(fs, "provisioned"), f.number(fs, "space", "total_physical"))

    async def appliance_hwinfo(self) -> tuple[str, str | None, dict[str, str]]:
        f = self.client.fields("read array info")
        items = f.objects((await self.client.get(self._v("/arrays"), op=f.op)).body, "items")
        first = items[0] if items else {}
        meta = {f"array_{k}": str(first.get(k, "")) for k in ("id", "name", "os", "revision", "version")}
        meta["blade_count"] = str(len(items))  # as the upstream proxy counts it (array items, not blades)
        problems = await self._blade_problems()
        if problems:
            return "degraded", "; ".join(problems), meta
        return "healthy", None, meta

    async def _blade_problems(self) -> list[str]:
        """``blade NAME: status (details)`` for each blade whose ``status`` means lost or unconfirmed service."""
        f = self.client.fields("read blade status")
        r = await self.client.get(self._v("/blades"), op=f.op)
        problems = []
        for blade in f.objects(r.body, "items"):
            status = f.field(blade, "status", kind=str, default="unknown")
            if status in BAD_BLADE_STATES:
                details = f.field(blade, "details", default="")
                problems.append(f"blade {blade.get('name', '?')}: {status}" + (f" ({details})" if details else ""))
        return problems

    async def performance_metric(self) -> PerfMetric:
        op = f"read NFS performance of filesystem {self.opts.purity_fs_name!r}"
        p = await self._first_item("/file-systems/performance", op, names=self.opts.purity_fs_name, protocol="NFS")

        f = self.client.fields(op)

        def num(key: str) -> float:
            return f.number(p, key, cast=float, default=0.0)

        return PerfMetric(
            int(num("reads_per_sec")),
            int(num("writes_per_sec")),
            int(num("read_bytes_per_sec")),
            int(num("write_bytes_per_sec")),
            num("usec_per_read_op"),
            num("usec_per_write_op"),
        )
