"""``storage-agent serve``: open the catalogue, build the volumes, reconcile, listen."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import resource
import signal
import socket
import ssl
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from agent.config import Config, ConfigError, HostPort, Listener
from agent.engine import upload_sweeper, view_supervisor
from agent.engine.reconcile import Report, reconcile
from agent.http import upload_sessions, usage
from agent.http.app import client_app, manager_app
from agent.http.metrics import standalone_app as metrics_app
from agent.runtime import memory_trim
from agent.runtime.context import Agent
from agent.runtime.services import ServiceFactory
from backends import build_volume, cpu_placement
from backends.base import Capability, Volume
from catalog import Catalog
from catalog import db as catalog_db
from catalog.recovery import LOST

log = logging.getLogger(__name__)

# The services ``serve`` runs, started in this order after reconciliation and stopped in reverse; a factory
# returns None when its feature is disabled by config. Listed here, not in agent.runtime.services, which they import.
SERVICES: list[ServiceFactory] = [
    usage.factory, upload_sessions.service, upload_sweeper.factory, view_supervisor.factory, memory_trim.factory
]

WORKER_THREADS = 32


@dataclass(frozen=True)
class Bound:
    manager_url: str
    client_url: str
    metrics_url: str | None = None


@dataclass
class Sockets:
    """The listening sockets, bound before anything else (and before a privilege drop), by listener."""

    manager: list[socket.socket]
    client: list[socket.socket]
    metrics: list[socket.socket] = field(default_factory=list)

    def close(self) -> None:
        for sock in (*self.manager, *self.client, *self.metrics):
            sock.close()


def _bind(addr: HostPort, backlog: int = 1024) -> list[socket.socket]:
    """Listening sockets for ``host:port`` the way asyncio's create_server makes them: one per address
    the host resolves to (an empty host: every interface); SO_REUSEADDR, IPv6 sockets IPv6-only."""
    host = addr.host or None
    infos = socket.getaddrinfo(host, addr.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    out: list[socket.socket] = []
    infos = list(dict.fromkeys(infos))
    try:
        for family, kind, proto, _name, sockaddr in infos:
            try:
                sock = socket.socket(family, kind, proto)
            except OSError:
                if len(infos) > 1:
                    continue  # e.g. an IPv6 address of "every interface" on a kernel without IPv6
                raise
            out.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(sockaddr)
            except OSError as e:
                if len(infos) > 1 and e.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
                    out.pop().close()
                    continue
                raise OSError(e.errno, f"cannot listen on {addr.host}:{addr.port}: {e.strerror}") from None
            sock.listen(backlog)
            sock.setblocking(False)
        if not out:
            raise OSError(errno.EADDRNOTAVAIL, f"cannot listen on {addr.host}:{addr.port}: no usable address")
    except BaseException:
        for sock in out:
            sock.close()
        raise
    return out


def bind(config: Config) -> Sockets:
    """Every listener's sockets; called before the event loop exists, so before a privilege drop."""
    done: list[list[socket.socket]] = []
    try:
        for addr in (config.api.manager.service_addr, config.api.client.service_addr, config.metrics.service_addr):
            done.append(_bind(addr) if addr is not None else [])
    except BaseException:
        for sock in (s for group in done for s in group):
            sock.close()
        raise
    return Sockets(*done)


def write_pid_file(path: Path | None) -> None:
    if path is not None:
        path.write_text(f"{os.getpid()}\n")


def remove_pid_file(path: Path | None) -> None:
    if path is not None and path.is_file():  # never /dev/null, upstream's default
        try:
            path.unlink()
        except OSError as e:
            log.warning("cannot remove the pid file %s: %s", path, e.strerror)


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


async def start(config: Config, sockets: Sockets | None = None) -> tuple[Agent, list[web.AppRunner], Bound]:
    """Open the catalogue and the volumes, reconcile, start the services, then serve on ``sockets``
    (bound here when not given)."""
    sockets = sockets if sockets is not None else bind(config)
    _raise_fd_limit()
    catalog_db.set_thread_hook(cpu_placement.background_thread)
    asyncio.get_running_loop().set_default_executor(
        ThreadPoolExecutor(
            WORKER_THREADS, thread_name_prefix="storage-agent-io", initializer=cpu_placement.background_thread
        )
    )
    no_effect = config.no_effect_keys()
    if no_effect:
        log.info("config keys accepted with no effect here: %s", ", ".join(no_effect))
    catalog = await Catalog.open_or_rebuild(config.catalog.path)
    log.info("catalogue %s at schema version %d", config.catalog.path, await catalog.schema_version())
    volumes: dict[str, Volume] = {}
    for name, vc in config.volume.items():
        try:
            volumes[name] = build_volume(name, vc.backend, vc.path, vc.options)
        except ValueError as e:  # unknown backend or unusable options: a config error, not a traceback
            raise ConfigError(f"[volume.{name}]: {e}") from None
    for name, backend in config.unsupported_volumes.items():
        log.error("volume %s is NOT served: backend %r is not supported by storage-agent", name, backend)
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

    for factory in SERVICES:
        service = factory(agent)
        if service is not None:
            await service.start()
            agent.services.append(service)
            log.info("started %s", service.name)

    runners = []
    urls: list[str | None] = []
    for app, listener, socks in (
        (manager_app(agent), config.api.manager, sockets.manager),
        (client_app(agent), config.api.client, sockets.client),
        (metrics_app(agent), None, sockets.metrics),
    ):
        if not socks:
            urls.append(None)
            continue
        timeout = listener.idle_timeout if listener is not None else 75.0
        runner = web.AppRunner(app, access_log=None, handle_signals=False, keepalive_timeout=timeout)
        await runner.setup()
        ctx = _ssl_context(listener) if listener is not None else None
        for sock in socks:
            await web.SockSite(runner, sock, ssl_context=ctx).start()
        runners.append(runner)
        host, port = socks[0].getsockname()[:2]  # the real port when 0 was asked for
        shown = "127.0.0.1" if host in ("0.0.0.0", "", "::") else f"[{host}]" if ":" in host else host
        urls.append(f"{'https' if ctx else 'http'}://{shown}:{port}")
    assert urls[0] is not None and urls[1] is not None
    return agent, runners, Bound(urls[0], urls[1], urls[2])


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


async def serve(config: Config, sockets: Sockets | None = None, *, banner: bool = False) -> None:
    """Run until SIGINT/SIGTERM (the pid file is written and removed by the caller, around the drop)."""
    agent, runners, bound = await start(config, sockets)
    log.info("manager API on %s, client API on %s%s", bound.manager_url, bound.client_url,
             f", metrics on {bound.metrics_url}/metrics" if bound.metrics_url else "")
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
