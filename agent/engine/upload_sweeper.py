"""What runs once per node for the tus upload sessions: the start-up reconciliation of their staged files and
the periodic sweep of expired sessions (the HTTP side, agent/http/uploads.py, serves HEAD and PATCH).

Both hold each session as a PATCH does (``Agent.uploads.hold``: a lock here and ``flock`` on the staged file,
never waited for), so they never touch a session that an HTTP worker of the node is writing; such a session
is left for the next round, or, at start-up, needs nothing: its process is alive.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from agent.http.upload_sessions import Held, settle_held
from agent.runtime.owner import boot_id
from agent.runtime.services import Periodic
from backends.mounted import MountedVolume

if TYPE_CHECKING:
    from agent.runtime.context import Agent
    from catalog.store import UploadSessionRow

log = logging.getLogger(__name__)


async def reconcile(agent: Agent) -> None:
    """At start-up: bring every open session's staged file in line with what its row says can be trusted.

    Killed in this boot: every acknowledged byte is still in the page cache, so it is made durable. After a
    reboot: only the bytes recorded as synced are, so the file is cut back to them (see agent/http/uploads.py).
    """
    this_boot = boot_id()
    for row in await agent.catalog.upload_sessions(state="open"):
        vol = agent.volumes.get(row.volume)
        if not isinstance(vol, MountedVolume):
            continue
        state = agent.states.get(row.volume)
        if state is not None and not state.serving:
            continue
        try:
            async with agent.uploads.hold(vol, row.qsid, row.session_id) as held:
                if held is None:
                    continue  # a live process is writing it: nothing of it was left behind
                fresh = await agent.catalog.get_upload_session(row.session_id)
                if fresh is None or fresh.state != "open":
                    continue
                await _reconcile_one(agent, fresh, held, this_boot)
        except OSError as e:
            log.warning("upload %s: cannot check its staged file: %s", row.session_id, e)


async def _reconcile_one(agent: Agent, row: UploadSessionRow, held: Held, this_boot: str | None) -> None:
    if await agent.catalog.get_vfolder(row.volume, row.qsid, row.folder_id) is None:
        # its vfolder was deleted (the agent died before the delete ended its sessions): end it now
        await agent.catalog.delete_upload_session(row.session_id)
        if held.fd is not None:
            await asyncio.to_thread(held.drop)
        return
    rebooted = row.synced < row.received and (this_boot is None or row.boot_id != this_boot)
    trusted = row.synced if rebooted else row.received
    if held.fd is None:
        if row.received == row.size and row.size > 0:
            await agent.uploads.record(agent, row, received=row.size, synced=row.size, state="complete")
        elif row.received:
            log.warning("upload %s: staged bytes are gone; the client must start again", row.session_id)
            await agent.uploads.record(agent, row, received=0, synced=0)
        return
    length = await asyncio.to_thread(settle_held, held, trusted)
    if length > trusted:
        where = "the last durable offset (written before a reboot)" if rebooted else "the recorded offset"
        log.info("upload %s: cut %d byte(s) back to %s %d", row.session_id, length - trusted, where, trusted)
    if length < trusted:
        log.warning(
            "upload %s: staged file holds %d of %d recorded bytes; resuming from %d",
            row.session_id,
            length,
            trusted,
            length,
        )
    kept = min(length, trusted)
    if (kept, kept) != (row.received, row.synced):
        await agent.uploads.record(agent, row, received=kept, synced=kept)


async def sweep(agent: Agent, now: float | None = None) -> int:
    """Remove expired sessions (open or complete) and their staged bytes; returns how many."""
    now = time.time() if now is None else now
    swept = 0
    for row in await agent.catalog.upload_sessions(expired_before=now):
        vol = agent.volumes.get(row.volume)
        if not isinstance(vol, MountedVolume):
            await agent.catalog.delete_upload_session(row.session_id)
            swept += 1
            continue
        try:
            async with agent.uploads.hold(vol, row.qsid, row.session_id) as held:
                if held is None:
                    continue  # a PATCH is running; the next round gets it
                # the row first: a PATCH that creates the staged file after its removal finds no session
                await agent.catalog.delete_upload_session(row.session_id)
                if held.fd is not None:
                    await asyncio.to_thread(held.drop)
                swept += 1
        except OSError as e:  # start-up removes staged files no session names
            log.warning("upload %s: cannot remove its staged file: %s", row.session_id, e)
    if swept:
        log.info("swept %d expired upload session(s)", swept)
    return swept


class UploadSweeper:
    """Reconciles staged uploads at start-up, then removes expired sessions periodically."""

    name = "upload sweeper"

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        # a quarter of the session lifetime, between one second and five minutes
        interval = min(300.0, max(1.0, agent.config.storage_proxy.session_expire / 4))
        self._sweeps = Periodic("sweeping expired upload sessions", interval, lambda: sweep(agent))

    async def start(self) -> None:
        await reconcile(self.agent)
        await sweep(self.agent)
        await self._sweeps.start()

    async def stop(self) -> None:
        await self._sweeps.stop()


def factory(agent: Agent) -> UploadSweeper:
    return UploadSweeper(agent)
