"""Background services that live beside the HTTP listeners for the whole run of ``serve``.

Each feature that needs a long-running task (the usage engine, the upload
sweeper, the FUSE view supervisor, ...) provides a :class:`Service`; the server
starts them after reconciliation, in order, and stops them in reverse order.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from agent.runtime.context import Agent

log = logging.getLogger(__name__)


class Service(Protocol):
    name: str

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


ServiceFactory = Callable[["Agent"], "Service | None"]


async def cancel_and_wait(task: asyncio.Task[None] | None) -> None:
    """Cancel a service's background task and wait until it has ended."""
    if task is None:
        return
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass


class Periodic:
    """Run ``tick`` every ``interval`` seconds until stopped. A failing tick is logged, never fatal: the
    next one comes on time."""

    def __init__(self, name: str, interval: float, tick: Callable[[], Awaitable[object]]) -> None:
        self.name = name
        self.interval = interval
        self._tick = tick
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=self.name)

    async def stop(self) -> None:
        await cancel_and_wait(self._task)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self._tick()
            except Exception:
                log.exception("%s failed", self.name)
