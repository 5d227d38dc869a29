"""``storage-agent serve``: open the catalogue, build the volumes, reconcile, listen."""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import signal
import ssl
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from aiohttp import web

from agent.app import client_app, manager_app
from agent.config import Config, ConfigError, Listener
from agent.context import Agent
from agent.reconcile import Report, reconcile
from agent.services import factories
from backends import build_volume, cpu_placement
from backends.base import Capability, Volume
from catalog import Catalog
from catalog.recovery import LOST

log = logging.getLogger(__name__)

WORKER_THREADS = 32


@dataclass(frozen=True)
class Bound:
    manager_url: str
    client_url: str


def _ssl_context(listener: Listener) -> ssl.SSLContext | None:
    if not listener.ssl_enabled:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(listener.ssl_cert), str(listener.ssl_privkey))
    return ctx


def _report_new_catalogue(catalog: Catalog, volumes: dict[str, Volume], reports: dict[str, Report]) -> None:
    """One line for a catalogue started from nothing: a WARNING naming what was lost when that was not a first start.

    A corrupt file was renamed aside by :meth:`Catalog.open_or_rebuild`; a deleted one is noticed because
    the volumes hold scopes or vfolders a new catalogue does not know. Either way the start-up
    reconciliation has just adopted what is on disk and the usage engine rescans it.
    """
    recovery = catalog.recovery
    path = catalog.db.path
    if recovery is None and not catalog.created:
        return
    scopes = sum(len(r.adopted_scopes) for r in reports.values())
    vfolders = sum(len(r.adopted_vfolders) for r in reports.values())
    rebuilt = (
        f"rebuilt from disk: {scopes} quota scope(s) and {vfolders} vfolder(s) on volume(s) "
        f"{', '.join(sorted(reports)) or '(none served)'}; usage is being rescanned"
    )
    lost = list(LOST)
    only_here = sorted(n for n, v in volumes.items() if Capability.QUOTA not in v.capabilities)
    if only_here:
        lost.insert(1, f"quota limits of volume(s) {', '.join(only_here)}, whose backend keeps them only in "
                       "the catalogue (set them again)")
    if recovery is not None and recovery.corrupt:
        log.warning(
            "catalogue %s is corrupt (%s): kept it as %s and started a new one, %s. Lost with the old catalogue: %s",
            path, recovery.reason, ", ".join(str(p) for p in recovery.kept), rebuilt, "; ".join(lost),
        )
    elif scopes or vfolders:
        how = "did not exist" if recovery is not None else "was empty"
        log.warning(
            "catalogue %s %s (deleted?) but the volumes hold data: started a new one, %s. If a catalogue existed "
            "before, what only it held is lost: %s", path, how, rebuilt, "; ".join(lost),
        )
    else:
        log.info("catalogue %s is new", path)


def _raise_fd_limit() -> None:
    """fd-based tree walks keep two descriptors per directory level open."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def start(config: Config) -> tuple[Agent, list[web.AppRunner], Bound]:
    _raise_fd_limit()
    asyncio.get_running_loop().set_default_executor(
        ThreadPoolExecutor(
            WORKER_THREADS, thread_name_prefix="storage-agent-io", initializer=cpu_placement.background_thread
        )
    )
    ignored = config.ignored_keys()
    if ignored:
        log.info("ignoring config keys storage-agent does not use: %s", ", ".join(ignored))
    catalog = await Catalog.open_or_rebuild(config.catalog.path)
    log.info("catalogue %s at schema version %d", config.catalog.path, await catalog.schema_version())
    volumes: dict[str, Volume] = {}
    for name, vc in config.volume.items():
        try:
            volumes[name] = build_volume(name, vc.backend, vc.path, vc.options)
        except ValueError as e:  # unknown backend or unusable options: a config error, not a traceback
            raise ConfigError(f"[volume.{name}]: {e}") from None
    agent = Agent(config=config, catalog=catalog, volumes=volumes)
    keep = {f"upload-{s.session_id}" for s in await catalog.upload_sessions()}
    reports: dict[str, Report] = {}
    for vol in volumes.values():
        await vol.init()
        state = agent.refresh_state(vol)
        await catalog.record_volume(
            vol.name, vol.backend, str(vol.root), "serving" if state.serving else "unavailable", state.info
        )
        if not state.serving:
            log.error("volume %s is NOT served: %s", vol.name, state.info)
            continue
        reports[vol.name] = await reconcile(catalog, vol, keep_staged=keep)
        log.info("volume %s (%s) at %s: serving", vol.name, vol.backend, vol.root)
    _report_new_catalogue(catalog, volumes, reports)

    for factory in factories():
        service = factory(agent)
        if service is not None:
            await service.start()
            agent.services.append(service)
            log.info("started %s", service.name)

    runners = []
    urls = []
    for app, listener in (
        (manager_app(agent), config.api.manager),
        (client_app(agent), config.api.client),
    ):
        runner = web.AppRunner(app, access_log=None, handle_signals=False, keepalive_timeout=listener.idle_timeout)
        await runner.setup()
        ctx = _ssl_context(listener)
        site = web.TCPSite(runner, listener.service_addr.host, listener.service_addr.port, ssl_context=ctx)
        await site.start()
        runners.append(runner)
        host, port = site._server.sockets[0].getsockname()[:2]  # the real port when 0 was asked for
        shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        urls.append(f"{'https' if ctx else 'http'}://{shown}:{port}")
    return agent, runners, Bound(urls[0], urls[1])


async def stop(agent: Agent, runners: list[web.AppRunner]) -> None:
    for runner in runners:
        await runner.cleanup()
    for service in reversed(agent.services):
        try:
            await service.stop()
        except Exception:
            log.exception("stopping %s failed", service.name)
    for vol in agent.volumes.values():
        await vol.shutdown()
    await agent.catalog.close()


async def serve(config: Config, *, banner: bool = False) -> None:
    agent, runners, bound = await start(config)
    pid_file = config.storage_proxy.pid_file
    if pid_file:
        pid_file.write_text(f"{os.getpid()}\n")
    log.info("manager API on %s, client API on %s", bound.manager_url, bound.client_url)
    if banner:
        secret = config.api.manager.secret.get_secret_value()
        print(
            f"\nstorage-agent is serving\n"
            f"  manager API : {bound.manager_url}\n"
            f"  client API  : {bound.client_url}\n"
            f"  manager secret: {secret}\n"
            f"  try: curl -s -H 'X-BackendAI-Storage-Auth-Token: {secret}' {bound.manager_url}/volumes\n",
            flush=True,
        )
    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopped.set)
    try:
        await stopped.wait()
    finally:
        log.info("stopping")
        await stop(agent, runners)
        if pid_file:
            pid_file.unlink(missing_ok=True)
