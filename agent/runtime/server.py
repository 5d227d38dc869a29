"""``storage-agent serve``: open the catalogue, build the volumes, reconcile, listen.

One process (``num-proc = 1``, :func:`start`) does it all. Under ``num-proc = N`` the same steps are
split (agent/runtime/supervisor.py): :func:`start_engine` keeps the catalogue's upgrades, the
reconciliation, the background services and the metrics listener; :func:`start_worker` serves the two
APIs on the sockets the supervisor handed it.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import os
import resource
import signal
import socket
import ssl
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from agent.config import Config, ConfigError, HostPort, Listener
from agent.engine import orphans, upload_sweeper, view_supervisor, writer
from agent.engine.reconcile import Report, reconcile
from agent.http import upload_sessions, usage
from agent.http.app import client_app, manager_app
from agent.http.drain import CANCEL_GRACE
from agent.http.metrics import standalone_app as metrics_app
from agent.runtime import heartbeat, memory_trim
from agent.runtime.context import CHECK_TIMEOUT, Agent, VolumeState
from agent.runtime.services import ServiceFactory
from backends import build_volume, cpu_placement
from backends.base import Capability, Volume
from backends.daemon_pool import DaemonPool
from catalog import Catalog
from catalog import db as catalog_db
from catalog.recovery import LOST

log = logging.getLogger(__name__)

# The services ``serve`` runs, started in this order after reconciliation and stopped in reverse; a factory
# returns None when its feature is disabled by config. Listed here, not in agent.runtime.services, which they import.
SERVICES: list[ServiceFactory] = [
    usage.factory, upload_sessions.service, upload_sweeper.factory, view_supervisor.factory, memory_trim.factory
]
# the engine process of num-proc = N runs them all, and beats for the workers (agent/runtime/heartbeat.py)
# and the catalogue's writer host for the workers (last: started once the usage engine takes its requests,
# stopped first)
ENGINE_SERVICES: list[ServiceFactory] = [*SERVICES, orphans.factory, heartbeat.factory, writer.factory]
# an HTTP worker's: its upload sessions' background syncs only (per request; stopped with it)
WORKER_SERVICES: list[ServiceFactory] = [upload_sessions.service]
WORKER_HEADER = "X-Storage-Agent-Worker"  # each answer of an HTTP worker names it (num-proc = N only)

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


def _bind(addr: HostPort, backlog: int = 1024, *, reuseport: bool = False) -> list[socket.socket]:
    """Listening sockets for ``host:port`` the way asyncio's create_server makes them: one per address
    the host resolves to (an empty host: every interface); SO_REUSEADDR, IPv6 sockets IPv6-only.
    ``reuseport``: SO_REUSEPORT too, and port 0 resolved by the first socket for the others."""
    host = addr.host or None
    port = addr.port
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
            if reuseport:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                sockaddr = (sockaddr[0], port, *sockaddr[2:])
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(sockaddr)
                if reuseport and port == 0:
                    port = sock.getsockname()[1]
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


@dataclass
class Shared:
    """The listening sockets of ``num-proc = N``: N SO_REUSEPORT sets per API port, set i for worker i
    (the kernel spreads connections over them), and the metrics listener's, for the engine."""

    workers: list[Sockets]
    metrics: list[socket.socket]

    def close(self) -> None:
        for sockets in self.workers:
            sockets.close()
        for sock in self.metrics:
            sock.close()


def bind_shared(config: Config, count: int) -> Shared:
    """``count`` sockets per address of each API listener, all on one port (port 0: the first one bound
    picks it, every other binds that port), made before a privilege drop (a reuseport group admits only
    sockets of the same user)."""
    made: list[socket.socket] = []
    try:
        manager, client = config.api.manager.service_addr, config.api.client.service_addr
        sets: list[Sockets] = []
        for _ in range(count):
            m = _bind(manager, reuseport=True)
            made += m
            c = _bind(client, reuseport=True)
            made += c
            manager = HostPort(host=manager.host, port=m[0].getsockname()[1])
            client = HostPort(host=client.host, port=c[0].getsockname()[1])
            sets.append(Sockets(m, c))
        addr = config.metrics.service_addr
        metrics = _bind(addr) if addr is not None else []
    except BaseException:
        for sock in made:
            sock.close()
        raise
    return Shared(sets, metrics)


def url_of(socks: list[socket.socket], tls: bool) -> str:
    host, port = socks[0].getsockname()[:2]  # the real port when 0 was asked for
    shown = "127.0.0.1" if host in ("0.0.0.0", "", "::") else f"[{host}]" if ":" in host else host
    return f"{'https' if tls else 'http'}://{shown}:{port}"


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


def _prepare_process() -> None:
    """The process-wide settings every role needs, on the running event loop."""
    _raise_fd_limit()
    catalog_db.set_thread_hook(cpu_placement.background_thread)
    asyncio.get_running_loop().set_default_executor(
        DaemonPool(  # never joined past its bound: a call stuck in a hung mount does not hold the stop
            WORKER_THREADS, "storage-agent-io", initializer=cpu_placement.background_thread, join_timeout=CANCEL_GRACE
        )
    )


def _build_volumes(config: Config) -> dict[str, Volume]:
    volumes: dict[str, Volume] = {}
    for name, vc in config.volume.items():
        try:
            volumes[name] = build_volume(name, vc.backend, vc.path, vc.options)
        except ValueError as e:  # unknown backend or unusable options: a config error, not a traceback
            raise ConfigError(f"[volume.{name}]: {e}") from None
    return volumes


async def _init_volume(vol: Volume) -> None:
    """``vol.init()``, waited for at most CHECK_TIMEOUT (it may touch the disk, which may hang): past that it
    goes on in the background and the start goes on without it. An init that fails within the bound stops
    the start, as always."""
    init = asyncio.ensure_future(vol.init())
    try:
        await asyncio.wait_for(asyncio.shield(init), CHECK_TIMEOUT)
    except TimeoutError:
        log.warning("volume %s: its preparation (init) has not finished within %g s (a hung mount? a slow "
                    "backend?); it goes on in the background", vol.name, CHECK_TIMEOUT)
        init.add_done_callback(functools.partial(_init_done_late, vol.name))


def _init_done_late(name: str, init: asyncio.Future[None]) -> None:
    if init.cancelled():  # the process stopped first
        return
    if (e := init.exception()) is not None:
        log.error("volume %s: its late preparation (init) failed: %s", name, e, exc_info=e)
    else:
        log.info("volume %s: its late preparation (init) has finished", name)


async def _check_volumes(agent: Agent) -> dict[str, VolumeState]:
    """Each volume prepared (its init) and checked (:meth:`Agent.checked_state`), all at once and each step
    bounded by CHECK_TIMEOUT: hung mounts cost the start at most twice the bound, however many there are,
    and leave their volumes not served (state.answered False) while the others are."""

    async def one(vol: Volume) -> VolumeState:
        await _init_volume(vol)
        return await agent.checked_state(vol)

    names = list(agent.volumes)
    states = await asyncio.gather(*(one(agent.volumes[name]) for name in names))
    return dict(zip(names, states, strict=True))


async def _open_and_reconcile(config: Config, *, reconcile_volumes: bool = True) -> Agent:
    """The catalogue opened (rebuilt when corrupt, upgraded), the volumes checked and reconciled with it.

    Without ``reconcile_volumes`` (an engine restarted while HTTP workers keep serving) the volumes are
    only checked (and, into a catalogue file started anew, adopted): what reconciliation takes for leftovers
    of interrupted work (staged uploads, clones and deletes under way, running jobs) may be a live worker's;
    it runs at the next full start, and the clones of workers that died are settled by agent/engine/orphans.py."""
    no_effect = config.no_effect_keys()
    if no_effect:
        log.info("config keys accepted with no effect here: %s", ", ".join(no_effect))
    catalog = await Catalog.open_or_rebuild(config.catalog.path)
    log.info("catalogue %s at schema version %d", config.catalog.path, await catalog.schema_version())
    volumes = _build_volumes(config)
    for name, backend in config.unsupported_volumes.items():
        log.error("volume %s is NOT served: backend %r is not supported by storage-agent", name, backend)
    agent = Agent(config=config, catalog=catalog, volumes=volumes)
    keep = {f"upload-{s.session_id}" for s in await catalog.upload_sessions()}
    reports: dict[str, Report] = {}
    states = await _check_volumes(agent)
    for vol in volumes.values():
        state = states[vol.name]
        await catalog.record_volume(
            vol.name, vol.backend, str(vol.root), "serving" if state.serving else "unavailable", state.info
        )
        if not state.answered:
            log.error("volume %s is NOT served: %s; it is looked at again by each request naming it, and its "
                      "start-up reconciliation waits for a full start that finds it served", vol.name, state.info)
            continue
        if not state.serving:
            log.error("volume %s is NOT served: %s", vol.name, state.info)
            continue
        if not reconcile_volumes:
            if catalog.created:  # a new file: what is on disk is adopted, nothing of the workers' is touched
                reports[vol.name] = await reconcile(catalog, vol, sweep=False)
            log.info("volume %s (%s) at %s: serving (engine restarted beside live HTTP workers: the start-up "
                     "reconciliation waits for the next full start)", vol.name, vol.backend, vol.root)
            continue
        reports[vol.name] = await reconcile(catalog, vol, keep_staged=keep)
        log.info("volume %s (%s) at %s: serving", vol.name, vol.backend, vol.root)
    _report_new_catalogue(catalog, volumes, reports)
    return agent


async def _start_services(agent: Agent, factories: list[ServiceFactory]) -> None:
    for factory in factories:
        service = factory(agent)
        if service is not None:
            await service.start()
            agent.services.append(service)
            log.info("started %s", service.name)


def _worker_header(index: int):  # noqa: ANN202 - an aiohttp signal handler
    async def add(_request: web.Request, response: web.StreamResponse) -> None:
        response.headers[WORKER_HEADER] = str(index)

    return add


async def _listen(
    agent: Agent, served: list[tuple[web.Application, Listener | None, list[socket.socket]]]
) -> tuple[list[web.AppRunner], list[str | None]]:
    """Serve each app on its pre-bound sockets; the URL of each (None: not listened on)."""
    runners = []
    urls: list[str | None] = []
    for app, listener, socks in served:
        if not socks:
            urls.append(None)
            continue
        if agent.worker is not None:
            app.on_response_prepare.append(_worker_header(agent.worker))
        timeout = listener.idle_timeout if listener is not None else 75.0
        # stop() drains the requests first (agent/http/drain.py); the runner's own shutdown then only closes
        # what is left, and waits that long for a cancelled handler that has not ended yet
        runner = web.AppRunner(app, access_log=None, handle_signals=False, keepalive_timeout=timeout,
                               shutdown_timeout=CANCEL_GRACE)
        await runner.setup()
        ctx = _ssl_context(listener) if listener is not None else None
        for sock in socks:
            await web.SockSite(runner, sock, ssl_context=ctx).start()
        runners.append(runner)
        urls.append(url_of(socks, ctx is not None))
    return runners, urls


async def start(config: Config, sockets: Sockets | None = None) -> tuple[Agent, list[web.AppRunner], Bound]:
    """Open the catalogue and the volumes, reconcile, start the services, then serve on ``sockets``
    (bound here when not given): the single process of ``num-proc = 1``."""
    sockets = sockets if sockets is not None else bind(config)
    _prepare_process()
    agent = await _open_and_reconcile(config)
    await _start_services(agent, SERVICES)
    runners, urls = await _listen(agent, [
        (manager_app(agent), config.api.manager, sockets.manager),
        (client_app(agent), config.api.client, sockets.client),
        (metrics_app(agent), None, sockets.metrics),
    ])
    assert urls[0] is not None and urls[1] is not None
    return agent, runners, Bound(urls[0], urls[1], urls[2])


async def start_engine(
    config: Config, metrics: list[socket.socket], *, reconcile: bool = True
) -> tuple[Agent, list[web.AppRunner]]:
    """The engine process of ``num-proc = N``: what :func:`start` does but the two APIs (``reconcile``:
    see :func:`_open_and_reconcile`)."""
    _prepare_process()
    agent = await _open_and_reconcile(config, reconcile_volumes=reconcile)
    await _start_services(agent, ENGINE_SERVICES)
    runners, _ = await _listen(agent, [(metrics_app(agent), None, metrics)])
    return agent, runners


async def open_worker_catalogue(config: Config) -> Catalog:
    """The catalogue as an HTTP worker opens it: reads here (read-only), writes through the engine's writer
    host (agent/engine/writer.py; while the engine is down they answer 503 naming it). The engine has
    upgraded and reconciled the file before any worker starts."""
    path = config.catalog.path
    return await Catalog.open_remote(path, writer.socket_path(path), wait=5.0)


async def start_worker(config: Config, index: int, sockets: Sockets) -> tuple[Agent, list[web.AppRunner], Bound]:
    """HTTP worker ``index`` of ``num-proc = N``: the catalogue, the volumes (no reconciliation, no
    background service), usage from the catalogue's rows; the two APIs on its own sockets."""
    _prepare_process()
    catalog = await open_worker_catalogue(config)
    agent = Agent(config=config, catalog=catalog, volumes=_build_volumes(config), worker=index)
    for vol, state in (await _check_volumes(agent)).items():
        if not state.answered:
            log.error("volume %s is NOT served: %s; it is looked at again by each request naming it", vol,
                      state.info)
    if config.usage.enabled:
        agent.usage = usage.CatalogueUsage(agent)
    await _start_services(agent, WORKER_SERVICES)
    runners, urls = await _listen(agent, [
        (manager_app(agent), config.api.manager, sockets.manager),
        (client_app(agent), config.api.client, sockets.client),
    ])
    assert urls[0] is not None and urls[1] is not None
    return agent, runners, Bound(urls[0], urls[1])


SETTLE_WAIT = 60.0  # seconds a stop waits for cancelled operations to make their records match the disk


async def stop(agent: Agent, runners: list[web.AppRunner]) -> None:
    await agent.drain.stop(runners, agent.config.storage_proxy.stop_timeout)
    for runner in runners:
        await runner.cleanup()
    if agent.settling:  # handlers cancelled by the cleanup, still recording their outcome in the catalogue
        log.info("waiting for %d cancelled operation(s) to settle", len(agent.settling))
        await asyncio.wait(set(agent.settling), timeout=SETTLE_WAIT)
    for service in reversed(agent.services):
        try:
            await service.stop()
        except Exception:
            log.exception("stopping %s failed", service.name)
    agent.stop_checks()
    for vol in agent.volumes.values():
        await vol.shutdown()
    if isinstance(agent.usage, usage.CatalogueUsage):
        agent.usage.close()
    await agent.catalog.close()


def print_banner(config: Config, bound: Bound) -> None:
    """``make serve``'s banner (printed once, by the single process or by the supervisor)."""
    secret = config.api.manager.secret.get_secret_value()
    print(
        f"\nstorage-agent is serving\n"
        f"  manager API : {bound.manager_url}\n"
        f"  client API  : {bound.client_url}\n"
        f"  manager secret: {secret}\n"
        f"  try: curl -s -H 'X-BackendAI-Storage-Auth-Token: {secret}' {bound.manager_url}/volumes\n",
        flush=True,
    )


async def until_stopped() -> None:
    """Return at the first SIGINT or SIGTERM."""
    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopped.set)
    await stopped.wait()


async def serve(config: Config, sockets: Sockets | None = None, *, banner: bool = False) -> None:
    """Run until SIGINT/SIGTERM (the pid file is written and removed by the caller, around the drop)."""
    agent, runners, bound = await start(config, sockets)
    log.info("manager API on %s, client API on %s%s", bound.manager_url, bound.client_url,
             f", metrics on {bound.metrics_url}/metrics" if bound.metrics_url else "")
    if banner:
        print_banner(config, bound)
    try:
        await until_stopped()
    finally:
        log.info("stopping")
        await stop(agent, runners)
