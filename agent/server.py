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
from agent.reconcile import reconcile
from agent.services import factories
from backends import build_volume
from backends.base import Volume
from catalog import Catalog

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


def _raise_fd_limit() -> None:
    """fd-based tree walks keep two descriptors per directory level open."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def start(config: Config) -> tuple[Agent, list[web.AppRunner], Bound]:
    _raise_fd_limit()
    asyncio.get_running_loop().set_default_executor(
        ThreadPoolExecutor(WORKER_THREADS, thread_name_prefix="storage-agent-io")
    )
    ignored = config.ignored_keys()
    if ignored:
        log.info("ignoring config keys storage-agent does not use: %s", ", ".join(ignored))
    catalog = await Catalog.open(config.catalog.path)
    log.info("catalogue %s at schema version %d", config.catalog.path, await catalog.schema_version())
    volumes: dict[str, Volume] = {}
    for name, vc in config.volume.items():
        try:
            volumes[name] = build_volume(name, vc.backend, vc.path, vc.options)
        except ValueError as e:  # unknown backend or unusable options: a config error, not a traceback
            raise ConfigError(f"[volume.{name}]: {e}") from None
    agent = Agent(config=config, catalog=catalog, volumes=volumes)
    keep = {f"upload-{s.session_id}" for s in await catalog.upload_sessions()}
    for vol in volumes.values():
        await vol.init()
        state = agent.refresh_state(vol)
        await catalog.record_volume(
            vol.name, vol.backend, str(vol.root), "serving" if state.serving else "unavailable", state.info
        )
        if not state.serving:
            log.error("volume %s is NOT served: %s", vol.name, state.info)
            continue
        await reconcile(catalog, vol, keep_staged=keep)
        log.info("volume %s (%s) at %s: serving", vol.name, vol.backend, vol.root)

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
