"""Service and volume routes: /, /status, /volumes, /volume/hwinfo, /volume/performance-metric, /folder/fs-usage."""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import UTC, datetime
from typing import NoReturn

from aiohttp import web

from agent import __version__
from agent.http import answers
from agent.http.errors import ApiError
from agent.http.params import VFolderParams, VolumeParams, VolumeQuotaParams, documented, takes
from agent.runtime.context import agent_of
from backends.base import HwInfo

routes = web.RouteTableDef()


@routes.get("/")
@takes(None, answer=answers.StatusOk)
async def root(request: web.Request) -> web.Response:
    """A liveness answer that needs the token."""
    return web.json_response({"status": "ok"})


@routes.get("/status")
@documented(answer=answers.StatusOk)
async def status(request: web.Request) -> web.Response:
    """A liveness answer without auth."""
    return web.json_response({"status": "ok"})


async def _health(request: web.Request, *, volumes: bool, probe: bool) -> web.Response:
    """Upstream's health shape: one check per volume (served, or why not) when ``volumes``; ``probe``: a failed
    check answers 503 (a Kubernetes probe), else 200 with status "degraded"."""
    agent = agent_of(request)
    now = datetime.now(UTC).isoformat()
    names = list(agent.volumes) if volumes else []
    states = await asyncio.gather(*(agent.checked_state(agent.volumes[name]) for name in names))
    checks = [
        {
            "service_group": "volume",
            "component_id": name,
            "is_healthy": state.serving,
            "last_checked_at": now,
            "error_message": None if state.serving else state.info,
        }
        for name, state in zip(names, states, strict=True)
    ]
    healthy = all(c["is_healthy"] for c in checks)
    body = {
        "status": "ok" if healthy else "error" if probe else "degraded",
        "version": __version__,
        "component": "storage-proxy",
        "connectivity": {"overall_healthy": healthy, "connectivity_checks": checks, "timestamp": now},
    }
    return web.json_response(body, status=503 if probe and not healthy else 200)


@routes.get("/health")
@documented(answer=answers.Health)
async def health(request: web.Request) -> web.Response:
    """Whether each volume is served, without auth; always 200 ("degraded" when one is not)."""
    return await _health(request, volumes=True, probe=False)


@routes.get("/livez")
@documented(answer=answers.Health)
async def livez(request: web.Request) -> web.Response:
    """Liveness probe without auth: 200 whenever the agent answers (no check gates it)."""
    return await _health(request, volumes=False, probe=True)


@routes.get("/readyz")
@documented(answer=answers.Health, also=((503, True, "a volume is not served (status `error`)"),))
async def readyz(request: web.Request) -> web.Response:
    """Readiness probe without auth: 200 when every volume is served, else 503 naming those that are not."""
    return await _health(request, volumes=True, probe=True)


@routes.get("/volumes")
@takes(None, answer=answers.Volumes)
async def volumes(request: web.Request) -> web.Response:
    """Every configured volume: backend, capabilities, whether it is served."""
    agent = agent_of(request)
    states = await asyncio.gather(*(agent.checked_state(vol) for vol in agent.volumes.values()))
    out = [
        {
            "name": name,
            "backend": vol.backend,
            "path": str(vol.root),
            "fsprefix": vol.fsprefix,
            "capabilities": sorted(str(c) for c in vol.capabilities),
            "status": "serving" if state.serving else "unavailable",
            "status_info": state.info,
        }
        for (name, vol), state in zip(agent.volumes.items(), states, strict=True)
    ]
    return web.json_response({"volumes": out})


@routes.get("/volume/hwinfo")
@takes(VolumeParams, answer=answers.HwInfoAnswer)
async def hwinfo(request: web.Request, p: VolumeParams) -> web.Response:
    """A volume's health."""
    agent = agent_of(request)
    vol = agent.configured(p.volume)
    state = await agent.checked_state(vol)  # a hung mount answers "unavailable" here, before vol.hwinfo() meets it
    info = await vol.hwinfo() if state.serving else HwInfo("unavailable", state.info, {"backend": vol.backend})
    return web.json_response({"status": info.status, "status_info": info.status_info, "metadata": dict(info.metadata)})


@routes.get("/volume/performance-metric")
@takes(VolumeParams, answer=answers.PerfMetricAnswer)
async def performance_metric(request: web.Request, p: VolumeParams) -> web.Response:
    """A volume's I/O figures."""
    metric = await (await agent_of(request).volume(p.volume)).performance_metric()
    return web.json_response({"metric": dataclasses.asdict(metric)})


@routes.get("/folder/fs-usage")
@takes(VolumeParams, answer=answers.FsUsage)
async def fs_usage(request: web.Request, p: VolumeParams) -> web.Response:
    """Capacity and used bytes of the whole volume."""
    usage = await (await agent_of(request).volume(p.volume)).fs_usage()
    return web.json_response({"capacity_bytes": usage.capacity_bytes, "used_bytes": usage.used_bytes})


@routes.get("/volume/quota")
@takes(VFolderParams, status=400)
async def deprecated_get_volume_quota(request: web.Request, p: VFolderParams) -> web.Response:
    """Deprecated: always a 400 pointing at quota scopes."""
    await _deprecated_volume_quota(request, p)


@routes.patch("/volume/quota")
@takes(VolumeQuotaParams, status=400)
async def deprecated_set_volume_quota(request: web.Request, p: VolumeQuotaParams) -> web.Response:
    """Deprecated: always a 400 pointing at quota scopes."""
    await _deprecated_volume_quota(request, p)


async def _deprecated_volume_quota(request: web.Request, p: VFolderParams) -> NoReturn:
    await agent_of(request).volume(p.volume)
    raise ApiError(
        400,
        "per-vfolder quota is deprecated; set a limit on the quota scope instead (PATCH /quota-scope)",
        "unsupported-operation",
    )
