"""Prometheus metrics: per-route request counts and latencies, uploads, usage engine, catalogue writes.

Routes are labelled by their canonical path (``/folder/file/list``), never the raw URL, and methods
outside the HTTP set by ``other``, so no client can grow the label sets. Figures that are state rather
than events (upload sessions open, vfolders watched or stale) are read when ``/metrics`` is scraped.

Several processes (``num-proc``): prometheus-client's multiprocess mode. The supervisor calls
:func:`prepare_multiprocess` before it starts any child and :func:`process_exited` when one dies; each child
then keeps its counters and histograms in files of that directory, and ``/metrics`` of any of them answers
the sum over every process that ever ran in it (a dead worker's counts stay in the totals), followed by
the state figures and process figures of the process that answers. There are no ``Gauge`` objects here
(a gauge would need a ``multiprocess_mode``): every gauge is read at scrape time by a collector.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web
from aiohttp.typedefs import Middleware
from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
    values,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from agent.http import drain
from agent.http.errors import Handler, error_middleware
from agent.http.params import documented
from agent.runtime.context import AGENT_KEY, Agent, agent_of
from backends.base import FSUsage
from catalog.report import ScopeGauge, scope_gauges

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from agent.engine.usage import UsageEngine

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_LABELS = ("listener", "method", "route", "status")

REQUESTS = Counter("storage_agent_http_requests", "HTTP requests answered", _LABELS)
LATENCY = Histogram(
    "storage_agent_http_request_duration_seconds",
    "Time from the request's arrival at the app to the end of its answer (streamed bodies included)",
    _LABELS,
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 60.0),
)
UPLOAD_BYTES = Counter("storage_agent_upload_received_bytes", "Bytes of tus PATCH bodies durably written")


def middleware(listener: str) -> Middleware:
    """Outermost middleware of a listener's app: counts every answer, errors included."""

    @web.middleware
    async def metrics(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as e:
            status = e.status
            raise
        finally:
            resource = request.match_info.route.resource
            route = resource.canonical if resource is not None else "<unmatched>"
            method = request.method if request.method in _METHODS else "other"
            labels = (listener, method, route, str(status))
            REQUESTS.labels(*labels).inc()
            LATENCY.labels(*labels).observe(time.perf_counter() - started)

    return metrics


def _sqlite_memory_used() -> Callable[[], int] | None:
    """SQLite's own count of the heap it holds (page caches of every connection included), process-wide.

    Looked up through the ``_sqlite3`` module's handle, so it is the SQLite library that module uses,
    linked statically or not."""
    try:
        import _sqlite3

        fn = ctypes.CDLL(_sqlite3.__file__).sqlite3_memory_used
    except (ImportError, OSError, AttributeError):
        return None
    fn.restype = ctypes.c_int64
    fn.argtypes = []
    return fn


_SQLITE_MEMORY = _sqlite_memory_used()


class _AgentCollector:
    """State figures of one agent, gathered at scrape time (see :func:`render`)."""

    def __init__(self, agent: Agent, open_uploads: int) -> None:
        self.agent = agent
        self.open_uploads = open_uploads

    def collect(self) -> Iterator[Metric]:
        from agent.http.usage import engine_of

        yield GaugeMetricFamily(
            "storage_agent_upload_sessions_open", "tus upload sessions not yet finished", value=self.open_uploads
        )
        # where memory goes, for a growing RSS: SQLite's heap, and the blocks Python's allocator holds
        if _SQLITE_MEMORY is not None:
            yield GaugeMetricFamily(
                "storage_agent_sqlite_memory_bytes", "Heap bytes SQLite holds (all catalogue connections)",
                value=_SQLITE_MEMORY(),
            )
        yield GaugeMetricFamily(
            "storage_agent_python_allocated_blocks", "Memory blocks Python's allocator holds (sys.getallocatedblocks)",
            value=sys.getallocatedblocks(),
        )
        served = GaugeMetricFamily("storage_agent_volume_serving", "1 when a volume is served", labels=["volume"])
        for name, state in self.agent.states.items():
            served.add_metric([name], 1 if state.serving else 0)
        yield served
        engine = engine_of(self.agent)
        if engine is None:
            return
        states = list(engine._vfs.values())
        by_mode = GaugeMetricFamily(
            "storage_agent_usage_vfolders", "vfolders the usage engine tracks, by mode", labels=["mode"]
        )
        for mode in ("watch", "fast", "scan"):
            by_mode.add_metric([mode], sum(1 for st in states if st.mode == mode))
        yield by_mode
        yield GaugeMetricFamily(
            "storage_agent_usage_vfolders_stale", "vfolders whose figure is stale", value=sum(st.stale for st in states)
        )
        yield GaugeMetricFamily(
            "storage_agent_usage_scans_running", "full scans running now", value=sum(st.scanning for st in states)
        )
        yield CounterMetricFamily("storage_agent_usage_scans", "full scans started", value=engine.scans)
        yield CounterMetricFamily(
            "storage_agent_usage_watch_overflows", "watcher event-queue overflows", value=engine.overflows
        )
        yield from _usage_policy_metrics(engine)


def _usage_policy_metrics(engine: UsageEngine) -> Iterator[Metric]:
    """How each volume's figures are kept (policy.py), and the progress of the start-up rescan."""
    modes = GaugeMetricFamily(
        "storage_agent_usage_volume_mode", "1 for the way a volume's usage is kept (watch, fast or scan)",
        labels=["volume", "mode", "fstype"],
    )
    for name, pol in engine.policies.items():
        modes.add_metric([name, pol.mode, pol.fstype], 1)
    yield modes
    yield GaugeMetricFamily(
        "storage_agent_usage_startup_rescan_pending", "vfolders whose start-up rescan has not landed yet",
        value=engine.startup.pending_count(),
    )
    yield GaugeMetricFamily(
        "storage_agent_usage_startup_rescan_done", "vfolders whose start-up rescan has landed",
        value=engine.startup.done,
    )


# -- capacity gauges: volumes (filesystem figures) and quota scopes (the catalogue) ------------------------

FS_USAGE_TTL = 15.0  # seconds a volume's capacity figure is reused: an appliance answers it over REST
FS_USAGE_TIMEOUT = 2.0  # a scrape waits no longer for a volume; the last figure (if any) is shown meanwhile


class _FsUsageCache:
    """The last capacity figure of each volume, refreshed at scrape time when older than FS_USAGE_TTL."""

    def __init__(self) -> None:
        self.figures: dict[str, tuple[float, FSUsage]] = {}

    async def refresh(self, agent: Agent) -> dict[str, FSUsage]:
        now = time.monotonic()
        due = [
            vol for name, vol in agent.volumes.items()
            if (state := agent.states.get(name)) is not None and state.serving
            and now - self.figures.get(name, (-FS_USAGE_TTL, None))[0] >= FS_USAGE_TTL
        ]
        results = await asyncio.gather(
            *(asyncio.wait_for(vol.fs_usage(), FS_USAGE_TIMEOUT) for vol in due), return_exceptions=True
        )
        for vol, result in zip(due, results, strict=True):
            if isinstance(result, FSUsage):
                self.figures[vol.name] = (now, result)
            else:
                log.debug("volume %s: capacity figure not read for /metrics: %r", vol.name, result)
        return {name: fig for name, (_, fig) in self.figures.items() if name in agent.volumes}


_FS_USAGE = _FsUsageCache()


class _CapacityCollector:
    """Per volume capacity/used bytes; per quota scope used/limit bytes (unknown figures are left out)."""

    def __init__(self, fs: dict[str, FSUsage], scopes: list[ScopeGauge]) -> None:
        self.fs = fs
        self.scopes = scopes

    def collect(self) -> Iterator[Metric]:
        capacity = GaugeMetricFamily("storage_agent_volume_capacity_bytes", "Size of a volume's filesystem",
                                     labels=["volume"])
        used = GaugeMetricFamily("storage_agent_volume_used_bytes", "Bytes used on a volume's filesystem",
                                 labels=["volume"])
        for name, fig in sorted(self.fs.items()):
            capacity.add_metric([name], fig.capacity_bytes)
            used.add_metric([name], fig.used_bytes)
        yield capacity
        yield used
        scope_used = GaugeMetricFamily(
            "storage_agent_quota_scope_used_bytes",
            "A quota scope's used bytes as the catalogue holds them (absent until every vfolder is measured)",
            labels=["volume", "qsid"],
        )
        scope_limit = GaugeMetricFamily(
            "storage_agent_quota_scope_limit_bytes", "A quota scope's limit (absent when unlimited)",
            labels=["volume", "qsid"],
        )
        for g in self.scopes:
            if g.used_bytes is not None:
                scope_used.add_metric([g.volume, g.qsid], g.used_bytes)
            if g.limit_bytes is not None:
                scope_limit.add_metric([g.volume, g.qsid], g.limit_bytes)
        yield scope_used
        yield scope_limit


async def _capacity(agent: Agent) -> _CapacityCollector:
    return _CapacityCollector(await _FS_USAGE.refresh(agent), await scope_gauges(agent.catalog))


# -- several processes: prometheus-client's multiprocess mode ---------------------------------------------

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def prepare_multiprocess(directory: Path, *, owner: tuple[int, int] | None = None) -> None:
    """For the supervisor, before it starts any child: an empty ``directory`` for every process's counter
    files (what an earlier run left would be added to this run's totals), named in ``PROMETHEUS_MULTIPROC_DIR``
    of this process's environment, which the children inherit. ``owner`` (uid, gid): the user the children
    run as, when that is not this process's.

    The children must be new interpreters (exec, or multiprocessing's "spawn"): prometheus-client picks
    where its values live when it is imported, and a child forked from a process that imported it before
    the variable was set would count in its own memory only."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    for entry in directory.iterdir():
        if entry.is_file() or entry.is_symlink():
            entry.unlink()
    if owner is not None:
        os.chown(directory, *owner)
    os.environ[MULTIPROC_ENV] = str(directory)


def process_exited(pid: int) -> None:
    """For the supervisor, once a child has exited: prometheus-client's ``mark_process_dead`` (drops the live
    gauges of that pid, if any). Its counters stay: the totals keep what it answered."""
    path = os.environ.get(MULTIPROC_ENV)
    if path:
        multiprocess.mark_process_dead(pid, path)


def multiprocess_dir() -> str | None:
    """The directory this process counts in, or None when it counts in its own memory (single process)."""
    if getattr(values.ValueClass, "_multiprocess", False):
        return os.environ.get(MULTIPROC_ENV) or None
    return None


def _shared_figures(path: str) -> bytes:
    """Every process's counters and histograms, summed from their files, and this process's own figures
    (``process_*``, ``python_*``: the process collectors do not work across processes)."""
    registry = CollectorRegistry(auto_describe=False)
    multiprocess.MultiProcessCollector(registry, path)
    for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        registry.register(collector)
    return generate_latest(registry)


async def render(agent: Agent) -> bytes:
    local = CollectorRegistry(auto_describe=False)
    local.register(_AgentCollector(agent, await agent.catalog.count_upload_sessions("open")))
    local.register(await _capacity(agent))
    path = multiprocess_dir()
    if path is None:
        return generate_latest(REGISTRY) + generate_latest(local)
    return await asyncio.to_thread(_shared_figures, path) + generate_latest(local)


def add_route(app: web.Application) -> None:
    """``GET /metrics`` (the manager app: behind its auth)."""

    @documented(status=200, content_type=CONTENT_TYPE_LATEST.split(";")[0])
    async def metrics(request: web.Request) -> web.Response:
        """Prometheus metrics (text exposition format)."""
        body = await render(agent_of(request))
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app.router.add_get("/metrics", metrics)


def standalone_app(agent: Agent) -> web.Application:
    """``[metrics] service-addr``: ``GET /metrics`` alone, without the manager secret, for a scraper that
    must not hold the key to every user's data. Nothing else is served there."""
    app = web.Application(middlewares=[drain.middleware, middleware("metrics"), error_middleware])
    app[AGENT_KEY] = agent
    app[drain.DRAIN_KEY] = agent.drain
    add_route(app)
    return app
