"""Hand freed heap memory back to the kernel now and then (glibc ``malloc_trim``).

Why it is needed: asyncio reads a socket into a fresh 256 KiB buffer and shrinks it to what arrived.
After the first such buffer is freed, glibc raises its mmap threshold past that size, so later buffers
come from the heap. The shrunk remains of many connections' reads then leave free pages scattered
between live blocks, and ``free`` never gives those back. Under the load bench (200 connections), RSS
grew 2–3.5 MiB a minute and did not level off. With ``malloc_trim(0)`` every ``INTERVAL`` seconds, run in
a worker thread (ctypes drops the GIL for the call), RSS levelled off after the first minute.

Fixing the mmap threshold also stopped the growth, but it doubled the latency under that load: every
socket read became an mmap/munmap pair, and on a VM each munmap's TLB shootdown across CPUs is costly.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from prometheus_client import Counter

if TYPE_CHECKING:
    from agent.context import Agent

log = logging.getLogger(__name__)

INTERVAL = 10.0  # seconds between two trims

TRIMS = Counter("storage_agent_memory_trims", "malloc_trim calls that handed freed heap pages back to the kernel")


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        fn = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


_TRIM = _malloc_trim()
AVAILABLE = _TRIM is not None


def trim() -> bool:
    """Return the free pages of every malloc arena to the kernel; True when some were returned."""
    if _TRIM is None:
        return False
    released = bool(_TRIM(0))
    if released:
        TRIMS.inc()
    return released


class MemoryTrimmer:
    name = "memory trimmer"

    def __init__(self, interval: float = INTERVAL) -> None:
        self.interval = interval
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=self.name)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await asyncio.to_thread(trim)
            except Exception:  # never fatal: memory stays as it is
                log.exception("malloc_trim failed")


def factory(agent: Agent) -> MemoryTrimmer | None:
    """The trimmer, where the C library has ``malloc_trim`` (glibc)."""
    return MemoryTrimmer() if AVAILABLE else None
