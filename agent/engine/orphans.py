"""Clones whose HTTP worker died mid-copy: rolled back (or recorded, when already published) at once.

Under ``num-proc = N`` a clone runs in an HTTP worker; a worker killed mid-copy leaves its staged tree and
its job marked running. The full start-up reconciliation would take them for leftovers, but an engine
(re)started beside live workers skips it: their clones in flight are not leftovers. Each clone's job
names its staging directory and its process (pid, start time, boot: agent/runtime/owner.py), so the
engine settles exactly the clones whose process is gone: when the supervisor tells it a worker died
(SIGUSR1), at its own start, and every :data:`PERIOD` seconds in case a word was missed. Under the
vfolder's lifecycle lock: a staged tree is removed and the job failed; a destination published before
the death is recorded (catalogue row, usage) and the job done; never a clone whose process still runs.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
from typing import TYPE_CHECKING

from agent.http import usage
from agent.runtime import owner
from agent.runtime.services import cancel_and_wait
from backends import locks
from backends.errors import Busy
from backends.ids import VFolderID
from backends.mounted import MountedVolume
from backends.rmtree import remove_tree
from catalog.store import JobRow

if TYPE_CHECKING:
    from agent.runtime.context import Agent

log = logging.getLogger(__name__)

PERIOD = 10.0  # seconds between looks without a word from the supervisor
LOCK_WAIT = 1.0  # a vfolder busy with a new operation is looked at again later
WAKE = signal.SIGUSR1  # the supervisor's word: a worker died
_WORK = re.compile(r"clone-[0-9a-f]{32}")


class OrphanedClones:
    name = "orphaned clones"

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        asyncio.get_running_loop().add_signal_handler(WAKE, self._wake.set)
        self._wake.set()  # the first look at once: workers that died while no engine ran
        self._task = asyncio.create_task(self._run(), name=self.name)

    async def stop(self) -> None:
        asyncio.get_running_loop().remove_signal_handler(WAKE)
        signal.signal(WAKE, signal.SIG_IGN)  # a late word while stopping must not end the process
        await cancel_and_wait(self._task)

    async def _run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), PERIOD)
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                await self.settle()
            except Exception:  # the next word or period tries again
                log.exception("settling the clones of dead HTTP workers failed")

    async def settle(self) -> int:
        """Settle every running clone whose process is gone; how many were."""
        settled = 0
        for job in await self.agent.catalog.running_jobs("clone"):
            who = job.params.get("owner")
            if isinstance(who, dict) and owner.gone(who):
                settled += await self._settle(job, who["pid"])
        return settled

    async def _settle(self, job: JobRow, pid: int) -> int:
        vol = self.agent.volumes.get(job.volume)
        state = self.agent.states.get(job.volume)
        if not isinstance(vol, MountedVolume) or state is None or not state.serving:
            return 0  # settled at the volume's next full start
        dst = VFolderID.parse(job.params["dst"])
        work = job.params.get("work")
        wants = [(locks.scope_key(vol.name, dst.qsid), locks.SHARED),
                 (locks.vfolder_key(vol.name, dst), locks.EXCLUSIVE)]
        try:
            async with self.agent.locks.hold(wants, what=f"vfolder {dst}", wait=LOCK_WAIT):
                return await self._settle_held(vol, job, dst, work, pid)
        except Busy:
            return 0  # a new operation on the destination holds it: next time

    async def _settle_held(self, vol: MountedVolume, job: JobRow, dst: VFolderID, work: object, pid: int) -> int:
        catalog = self.agent.catalog
        what = f"clone {job.params.get('src')} -> {job.params['dst']}"
        staging = vol.staging_path(dst.qsid)
        staged = staging / work if isinstance(work, str) and _WORK.fullmatch(work) else None
        if staged is not None and await asyncio.to_thread(os.path.lexists, staged):
            await asyncio.to_thread(remove_tree, staged, ignore_errors=True)
            await asyncio.to_thread(_rmdir_if_empty, staging)
            await catalog.finish_job(job.id, error=f"interrupted: the HTTP worker running it (pid {pid}) died; "
                                                   "its staged copy was removed")
            log.warning("volume %s: %s was interrupted by the death of its HTTP worker (pid %d); removed its "
                        "staged copy", vol.name, what, pid)
        elif await asyncio.to_thread(os.path.isdir, vol.vfolder_path(dst)):  # published before the death
            if await catalog.get_vfolder(vol.name, dst.qsid, dst.hex) is None:
                await catalog.add_vfolder(vol.name, dst.qsid, dst.hex)
                await usage.registered(self.agent, vol, dst, fresh=False)
            await catalog.finish_job(job.id)
            log.info("volume %s: %s was complete on disk when its HTTP worker (pid %d) died; recorded it",
                     vol.name, what, pid)
        else:
            await catalog.finish_job(job.id, error=f"interrupted: the HTTP worker running it (pid {pid}) died")
            log.warning("volume %s: %s was interrupted by the death of its HTTP worker (pid %d)", vol.name, what, pid)
        return 1


def _rmdir_if_empty(path: os.PathLike[str]) -> None:
    try:
        os.rmdir(path)
    except OSError:
        pass


def factory(agent: Agent) -> OrphanedClones:
    return OrphanedClones(agent)
