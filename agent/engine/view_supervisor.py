"""``serve``'s side of the view: spawn ``storage-agent view`` as a child and keep it running.

The API process never looks at the mount through a path (a stopped FUSE
process would hang that lookup); it only reads ``/proc/self/mountinfo`` and
detaches with ``umount2(MNT_DETACH)``, both off the event loop, and only here,
never on a request path. The view gets the config as JSON on stdin (secrets
masked: it needs none).
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
from typing import TYPE_CHECKING

from agent.config import Config, masked
from agent.runtime.parent import child_env
from agent.runtime.services import cancel_and_wait
from agent.view import mounts
from backends import process

if TYPE_CHECKING:
    from agent.runtime.context import Agent

log = logging.getLogger(__name__)

BACKOFF_MIN = 0.5
BACKOFF_MAX = 30.0
HEALTHY_RUN = 60.0  # a view that ran this long restarts at once after a crash (back-off reset)
STOP_GRACE = 10.0


class ViewSupervisor:
    name = "fuse-view"

    def __init__(self, config: Config) -> None:
        self.config = config
        self.proc: asyncio.subprocess.Process | None = None
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._detach_stale()
        self._task = asyncio.create_task(self._keep_running(), name="fuse-view-supervisor")

    async def stop(self) -> None:
        self._stopping.set()
        proc = self.proc
        if proc is not None and proc.returncode is None:
            proc.terminate()
            proc.send_signal(signal.SIGCONT)  # a view stopped with SIGSTOP handles SIGTERM only once continued
            try:
                await asyncio.wait_for(proc.wait(), STOP_GRACE)
            except TimeoutError:  # stopped (SIGSTOP) or hung: SIGKILL always works
                log.warning("view pid %d did not stop within %g s; killing it", proc.pid, STOP_GRACE)
                proc.kill()
                await proc.wait()
        await cancel_and_wait(self._task)
        await self._detach_stale()

    async def _detach_stale(self) -> None:
        root = self.config.view.mount_root
        try:
            if await asyncio.to_thread(mounts.detach, root):
                log.warning("detached a view mount left at %s", root)
        except OSError as e:
            log.error("cannot detach the view mount at %s: %s", root, e)

    async def _spawn(self) -> asyncio.subprocess.Process:
        proc = await process.spawn(
            [sys.executable, "-m", "agent", "view", "--config", "-"], stdin=asyncio.subprocess.PIPE,
            env=child_env()
        )
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(masked(self.config)).encode())
        await proc.stdin.drain()
        proc.stdin.close()
        return proc

    async def _keep_running(self) -> None:
        loop = asyncio.get_running_loop()
        delay = BACKOFF_MIN
        while not self._stopping.is_set():
            began = loop.time()
            try:
                self.proc = await self._spawn()
                log.info("view started (pid %d), mounting at %s", self.proc.pid, self.config.view.mount_root)
                rc = await self.proc.wait()
            except OSError as e:
                rc = None
                log.error("view could not be started: %s", e)
            if self._stopping.is_set():
                return
            if loop.time() - began >= HEALTHY_RUN:
                delay = BACKOFF_MIN
            log.warning("view exited (status %s); restarting in %.1f s", rc, delay)
            await self._detach_stale()
            try:
                await asyncio.wait_for(self._stopping.wait(), delay)
                return
            except TimeoutError:
                pass
            delay = min(delay * 2, BACKOFF_MAX)


def factory(agent: Agent) -> ViewSupervisor | None:
    """The view runs beside ``serve`` only when ``[view] enabled = true``."""
    return ViewSupervisor(agent.config) if agent.config.view.enabled else None
