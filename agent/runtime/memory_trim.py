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
from collections.abc import Callable
from typing import TYPE_CHECKING

from prometheus_client import Counter

from agent.runtime.services import Periodic

if TYPE_CHECKING:
    from agent.runtime.context import Agent

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


def trimmer(interval: float = INTERVAL) -> Periodic:
    """The service: a trim every ``interval`` seconds, in a worker thread."""
    return Periodic("memory trimmer", interval, lambda: asyncio.to_thread(trim))


def factory(agent: Agent) -> Periodic | None:
    """The trimmer, where the C library has ``malloc_trim`` (glibc)."""
    return trimmer() if AVAILABLE else None
