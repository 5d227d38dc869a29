"""Clones and deletes whose HTTP worker died mid-way: settled at once, not at the next full start.

Under ``num-proc = N`` a clone or a delete runs in an HTTP worker; a worker killed mid-way leaves its staged
tree (a clone's copy, a delete's trash) and its job marked running. The full start-up reconciliation would
take them for leftovers, but an engine (re)started beside live workers skips it: their work in flight is
not leftover. Each job names its staging directory and its process (pid, start time, boot:
agent/runtime/owner.py), so the engine settles exactly the jobs whose process is gone: when the supervisor
tells it a worker died (SIGUSR1), at its own start, and every :data:`PERIOD` seconds in case a word was
missed. Under the vfolder's lifecycle lock, never a job whose process still runs:

- a clone's staged tree is removed and the job failed; a destination published before the death is
  recorded (catalogue row, usage) and the job done;
- a delete whose tree was moved aside is finished (the trash removed, the vfolder forgotten: the move was
  the delete) and its job done; one that died before the move failed, the vfolder kept.

Finished jobs are kept :data:`KEEP_JOBS` seconds (``storage-agent status`` and operators read them), then
forgotten, so the table does not grow with every delete and clone.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import time
from typing import TYPE_CHECKING

from agent.http import usage, vfolders
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
KEEP_JOBS = 7 * 86400.0  # seconds a finished job is kept
PRUNE_EVERY = 3600.0  # seconds between forgetting old finished jobs
LOCK_WAIT = 1.0  # a vfolder busy with a new operation is looked at again later
WAKE = signal.SIGUSR1  # the supervisor's word: a worker died
_WORK = {"clone": re.compile(r"clone-[0-9a-f]{32}"), "delete": re.compile(r"trash-[0-9a-f]{32}")}


class OrphanedJobs:
    name = "orphaned jobs"

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._pruned_at = 0.0

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
                if time.monotonic() - self._pruned_at >= PRUNE_EVERY or not self._pruned_at:
                    self._pruned_at = time.monotonic()
                    await self.agent.catalog.forget_finished_jobs(before=time.time() - KEEP_JOBS)
            except Exception:  # the next word or period tries again
                log.exception("settling the jobs of dead HTTP workers failed")

    async def settle(self) -> int:
        """Settle every running clone and delete whose process is gone; how many were."""
        settled = 0
        for job in await self.agent.catalog.running_jobs():
            who = job.params.get("owner")
            if job.kind in _WORK and isinstance(who, dict) and owner.gone(who):
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
        staged = vol.staging_path(dst.qsid) / work if isinstance(work, str) and _WORK[job.kind].fullmatch(work) \
            else None
        settle = self._settle_clone if job.kind == "clone" else self._settle_delete
        try:
            async with self.agent.locks.hold(wants, what=f"vfolder {dst}", wait=LOCK_WAIT):
                if staged is not None and await asyncio.to_thread(os.path.lexists, staged):
                    await asyncio.to_thread(remove_tree, staged, ignore_errors=True)
                    await asyncio.to_thread(_rmdir_if_empty, staged.parent)
                    await settle(vol, job, dst, pid, staged=True)
                else:
                    await settle(vol, job, dst, pid, staged=False)
                return 1
        except Busy:
            return 0  # a new operation on the destination holds it: next time

    async def _settle_clone(self, vol: MountedVolume, job: JobRow, dst: VFolderID, pid: int, *, staged: bool) -> None:
        catalog = self.agent.catalog
        what = f"clone {job.params.get('src')} -> {job.params['dst']}"
        if staged:
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

    async def _settle_delete(self, vol: MountedVolume, job: JobRow, dst: VFolderID, pid: int, *, staged: bool) -> None:
        catalog = self.agent.catalog
        if not staged and await asyncio.to_thread(os.path.lexists, vol.vfolder_path(dst)):
            await catalog.finish_job(job.id, error=f"interrupted before the tree was moved aside: the HTTP worker "
                                                   f"running it (pid {pid}) died; the vfolder is kept")
            log.warning("volume %s: the delete of vfolder %s was interrupted by the death of its HTTP worker (pid %d) "
                        "before it began; the vfolder is kept", vol.name, dst, pid)
            return
        incarnation = job.params.get("incarnation")
        await vfolders.forget(self.agent, vol, dst, incarnation if isinstance(incarnation, str) else None)
        await catalog.finish_job(job.id)
        log.warning("volume %s: the delete of vfolder %s was interrupted by the death of its HTTP worker (pid %d); "
                    "finished it%s", vol.name, dst, pid, " (removed its trash)" if staged else "")


def _rmdir_if_empty(path: os.PathLike[str]) -> None:
    try:
        os.rmdir(path)
    except OSError:
        pass


def factory(agent: Agent) -> OrphanedJobs:
    return OrphanedJobs(agent)
