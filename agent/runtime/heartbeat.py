"""The engine's heartbeat: a small file beside the catalogue whose mtime the engine renews every second.

HTTP workers answer usage from the catalogue's rows, which only a living engine keeps right; once the
heartbeat is older than :data:`STALE_AFTER` they flag every answer ``stale`` (a dead or stalled engine
never stalls their answers). A file, not a catalogue row: renewing it costs no commit.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from agent.runtime.services import Periodic

if TYPE_CHECKING:
    from agent.runtime.context import Agent

log = logging.getLogger(__name__)

PERIOD = 1.0  # seconds between beats
STALE_AFTER = 5.0  # seconds without a beat before the engine's figures are served as stale


def path_for(catalog_path: Path) -> Path:
    return catalog_path.with_name(catalog_path.name + ".engine")


def age(path: Path) -> float:
    """Seconds since the last beat (infinite when there is no heartbeat file)."""
    try:
        return max(0.0, time.time() - os.stat(path).st_mtime)
    except OSError:
        return float("inf")


class Heartbeat(Periodic):
    """The ``heartbeat`` service of the engine process (the file holds the engine's pid, for people)."""

    def __init__(self, path: Path) -> None:
        super().__init__("heartbeat", PERIOD, self._beat)
        self.path = path

    async def start(self) -> None:
        self.path.write_text(f"{os.getpid()}\n")
        await super().start()

    async def stop(self) -> None:
        await super().stop()
        try:
            self.path.unlink()  # a stopped engine: the workers flag at once, not after STALE_AFTER
        except OSError:
            pass

    async def _beat(self) -> None:
        try:
            os.utime(self.path)
        except FileNotFoundError:
            self.path.write_text(f"{os.getpid()}\n")


def factory(agent: Agent) -> Heartbeat:
    return Heartbeat(path_for(agent.config.catalog.path))
