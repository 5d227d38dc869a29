"""Awaiting work that must finish even when its awaiter is cancelled (a clone's copy thread, the catalogue
records that make its outcome match the disk): a cancellation is remembered, not acted on, until then."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import Any, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


async def through_cancel(aw: Awaitable[T], timeout: float, what: str) -> tuple[T | None, bool]:
    """Run ``aw`` to its end (at most ``timeout`` seconds), cancellations of the caller meanwhile waited
    through; its result (None when it did not end in time) and whether the caller was cancelled. Its own
    error is raised."""
    fut = asyncio.ensure_future(aw)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    cancelled = False
    while not fut.done():
        left = deadline - loop.time()
        if left <= 0:
            log.warning("%s did not end within %g s; left to finish on its own", what, timeout)
            fut.add_done_callback(_retrieve)
            return None, cancelled
        try:
            await asyncio.wait({fut}, timeout=left)
        except asyncio.CancelledError:
            cancelled = True
    return fut.result(), cancelled


def _retrieve(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.warning("work left to finish on its own failed: %s", fut.exception())
