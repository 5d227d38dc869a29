"""What every request handler reaches: the config, the catalogue and the volumes."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web

from agent.config import Config
from agent.http.drain import Drain
from agent.http.errors import ApiError
from agent.http.upload_sessions import UploadSessions
from agent.runtime.services import Service
from backends import cpu_placement, layout
from backends.base import Volume
from backends.daemon_pool import DaemonPool
from backends.errors import VolumeUnavailable
from backends.layout import LAYOUT_VERSION
from backends.locks import LifecycleLocks
from catalog import Catalog

if TYPE_CHECKING:
    from agent.http.usage import UsageSource

log = logging.getLogger(__name__)

def initialise_if_new(name: str, root: Path) -> str | None:
    """Initialise a new (missing or empty) volume root at layout 3; returns why it could not."""
    try:
        how = layout.initialise_if_new(root)
    except OSError as e:
        return f"volume root {root} is new but cannot be initialised: {e.strerror}"
    if how is not None:
        log.info("volume %s: root %s was %s: initialised as a new volume (version.txt = %d)", name, root, how,
                 layout.LAYOUT_VERSION)
    return None


@dataclass
class VolumeState:
    serving: bool
    info: str | None = None
    answered: bool = True  # False: the check did not come back within CHECK_TIMEOUT (a hung mount?)


CHECK_TIMEOUT = 5.0  # start-up, probes, /volumes and /volume/hwinfo go on after this even when a volume's mount hangs


@dataclass
class Agent:
    config: Config
    catalog: Catalog
    volumes: dict[str, Volume]
    states: dict[str, VolumeState] = field(default_factory=dict)
    walks: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(8))
    services: list[Service] = field(default_factory=list)
    usage: UsageSource | None = None  # set by whoever runs the usage engine or reads its figures (http/usage.py)
    worker: int | None = None  # this HTTP worker's index under num-proc = N (None: the single process)
    _checking: dict[str, asyncio.Future[VolumeState]] = field(default_factory=dict, init=False, repr=False)
    _looked: set[str] = field(default_factory=set, init=False, repr=False)  # volumes a check came back for
    uploads: UploadSessions = field(default_factory=UploadSessions)  # this process's side of the tus sessions
    # lifecycle operations still settling their records (a cancelled clone): stopping waits for them
    # before it closes the catalogue (agent/runtime/server.py stop)
    settling: set[asyncio.Future[None]] = field(default_factory=set, init=False, repr=False)
    drain: Drain = field(default_factory=Drain, init=False, repr=False)  # requests in flight; the listeners' stop
    locks: LifecycleLocks = field(default=None)  # type: ignore[assignment]  # set in __post_init__

    # a thread per volume for its checks (at most one in flight each): a check stuck in a hung mount holds
    # neither a thread the requests need nor the process's stop (daemon threads, never joined past a bound)
    _checks: DaemonPool = field(default=None, init=False, repr=False)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        self._checks = DaemonPool(
            max(1, len(self.volumes)), "storage-agent-check", initializer=cpu_placement.background_thread
        )
        if self.locks is None:  # lock files beside the catalogue: shared by every agent process of this node
            path = self.config.catalog.path
            self.locks = LifecycleLocks(path.with_name(path.name + ".locks"))

    def configured(self, name: str) -> Volume:
        """A configured volume, served or not, or the 404 naming it."""
        vol = self.volumes.get(name)
        if vol is None:
            raise ApiError(404, f"unknown volume {name!r}", "invalid-volume")
        return vol

    async def volume(self, name: str) -> Volume:
        """A volume that is being served, or the 503 naming the problem. A volume not served is looked at
        again (`storage-agent migrate` may have finished since start-up) off the event loop, bounded by
        CHECK_TIMEOUT: a mount that hangs holds this request, never the others."""
        vol = self.configured(name)
        state = self.states.get(name)
        if state is not None and not state.serving:
            state = await self.checked_state(vol)
        if state is not None and not state.serving:
            raise VolumeUnavailable(f"volume {name!r} is not served: {state.info}")
        return vol

    async def checked_state(self, vol: Volume) -> VolumeState:
        """Whether ``vol`` can be served, read off the event loop (a hung mount blocks a thread, never the loop)
        and bounded by CHECK_TIMEOUT; while an earlier check of the volume has not come back, no new one is
        started. Recorded in :attr:`states` either way: a check that did not answer leaves the volume not
        served (never a stale "serving") until a later check comes back."""
        pending = self._checking.get(vol.name)
        if pending is None or pending.done():
            pending = self._checking[vol.name] = asyncio.ensure_future(self._check(vol))
        try:
            return await asyncio.wait_for(asyncio.shield(pending), CHECK_TIMEOUT)
        except TimeoutError:
            if pending.done() and not pending.cancelled() and pending.exception() is None:
                return pending.result()  # came back as the bound fell: its answer is already recorded
            state = self.states[vol.name] = VolumeState(
                False, f"volume root {vol.root} has not answered for {CHECK_TIMEOUT:g} s or more", answered=False
            )
            return state

    def stop_checks(self) -> None:
        """At the stop: idle check threads end; one stuck in a hung mount is left to the kernel at exit."""
        self._checks.shutdown(wait=False)

    async def _check(self, vol: Volume) -> VolumeState:
        """One check on the volumes' own daemon threads (``_checks``); its answer recorded here, on the loop, so
        that it always follows (and replaces) the "has not answered" a bound that fell before it recorded."""
        first = vol.name not in self._looked
        state = await asyncio.get_running_loop().run_in_executor(self._checks, self._probe, vol, first)
        self._looked.add(vol.name)
        self.states[vol.name] = state
        return state

    def _probe(self, vol: Volume, first: bool = False) -> VolumeState:
        """Whether ``vol`` can be served, read from its root (blocking: call :meth:`checked_state`). The
        ``first`` check that comes back (at start-up, or later when the mount hung then) initialises a new,
        empty volume."""
        problem = initialise_if_new(vol.name, vol.root) if first else None
        if problem is not None:
            return VolumeState(False, problem)
        if not vol.root.is_dir():
            return VolumeState(False, f"volume root {vol.root} does not exist")
        try:
            version = vol.layout_version()
        except OSError as e:  # e.g. EIO from a soft NFS mount whose server is gone
            return VolumeState(False, f"volume root {vol.root} cannot be read: {e.strerror}")
        if version != LAYOUT_VERSION:
            return VolumeState(
                False,
                f"volume root {vol.root} has layout version {version or 2} and needs migration "
                f"(storage-agent migrate --volume {vol.name})",
            )
        return VolumeState(True)


AGENT_KEY = web.AppKey("agent", Agent)


def agent_of(request: web.Request) -> Agent:
    return request.app[AGENT_KEY]
