"""vfolder and quota-scope operations: a backend call plus the catalogue kept in step."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractAsyncContextManager, contextmanager
from typing import TypeVar

from agent.http import uploads, usage
from agent.http.errors import ApiError
from agent.runtime import owner
from agent.runtime.context import Agent
from backends import locks
from backends.base import ScopeUsage, Volume
from backends.errors import (
    BackendError,
    CloneCancelled,
    FileOpError,
    QuotaExceeded,
    QuotaScopeNotEmpty,
    QuotaScopeNotFound,
    VFolderNotFound,
)
from backends.ids import QuotaScopeID, VFolderID
from backends.resolver import VFolderRoot
from backends.settle import through_cancel
from catalog.store import UploadSessionRow

log = logging.getLogger(__name__)
T = TypeVar("T")
RECORD_WAIT = 30.0  # seconds the catalogue records of a cancelled clone may take before the handler gives up


async def in_vfolder(vol: Volume, vfid: VFolderID, fn: Callable[..., T], *args: object, **kwargs: object) -> T:
    """Run a blocking file operation on an open vfolder root in a worker thread."""

    def work() -> T:
        with vol.open_vfolder(vfid) as root:
            try:
                return fn(root, *args, **kwargs)
            except FileOpError as e:
                if e.errno == errno.EDQUOT:
                    what = f"{fn.__name__} {', '.join(e.paths) or '.'} in {vfid}"
                    raise QuotaExceeded.at_limit(vol.name, str(vfid.scope), what) from None
                raise

    return await asyncio.to_thread(work)


async def open_root(vol: Volume, vfid: VFolderID) -> VFolderRoot:
    """An open vfolder root (the caller closes it)."""
    return await asyncio.to_thread(vol.open_vfolder, vfid)


@contextmanager
def scope_named(scope: QuotaScopeID) -> Iterator[None]:
    """Backends name a scope by its directory; a typed request (``user:<uuid>``) is answered in its own words."""
    try:
        yield
    except (QuotaScopeNotFound, QuotaScopeNotEmpty, QuotaExceeded) as e:
        if not scope.typed or repr(scope.name) not in str(e):
            raise
        raise type(e)(str(e).replace(repr(scope.name), repr(str(scope)))) from None


# -- quota scopes ----------------------------------------------------------------


async def create_scope(agent: Agent, vol: Volume, qsid: str, limit_bytes: int | None) -> None:
    await vol.quota.create(qsid, limit_bytes)
    await agent.catalog.add_quota_scope(vol.name, qsid, limit_bytes)


async def describe_scope(agent: Agent, vol: Volume, qsid: str) -> ScopeUsage:
    own = await vol.quota.describe(qsid)  # raises QuotaScopeNotFound
    row = await agent.catalog.get_quota_scope(vol.name, qsid)
    if row is None:
        await agent.catalog.adopt_quota_scope(vol.name, qsid)
    used = own.used_bytes
    if used is None:
        used = await usage.scope_used(agent, vol, qsid)
    limit = own.limit_bytes if own.limit_bytes is not None else (row.limit_bytes if row else None)
    return ScopeUsage(used, limit)


async def update_scope(agent: Agent, vol: Volume, qsid: str, limit_bytes: int | None) -> None:
    await vol.quota.update(qsid, limit_bytes)
    if await agent.catalog.get_quota_scope(vol.name, qsid) is None:
        await agent.catalog.adopt_quota_scope(vol.name, qsid)
    await agent.catalog.set_quota_limit(vol.name, qsid, limit_bytes)


async def delete_scope(agent: Agent, vol: Volume, qsid: str) -> None:
    async with agent.locks.hold([(locks.scope_key(vol.name, qsid), locks.EXCLUSIVE)], what=f"quota scope {qsid!r}"):
        known = [vf for vf in await agent.catalog.vfolders(vol.name, qsid) if vf.state == "ready"]
        if known:
            raise QuotaScopeNotEmpty(f"quota scope {qsid!r} still holds {len(known)} vfolder(s); delete them first")
        await vol.quota.delete(qsid)
        for vf in await agent.catalog.vfolders(vol.name, qsid):
            await agent.catalog.remove_vfolder(vol.name, qsid, vf.folder_id)
        await agent.catalog.remove_quota_scope(vol.name, qsid)


# -- vfolders --------------------------------------------------------------------


async def scope_exists(vol: Volume, qsid: str) -> bool:
    return await asyncio.to_thread(vol.scopes_on_disk().__contains__, qsid)


async def ensure_scope(agent: Agent, vol: Volume, qsid: str, limit_bytes: int | None) -> None:
    """Create a missing scope (with its limit), as 23.03.7+ proxies do on the first vfolder of a scope."""
    if await scope_exists(vol, qsid):
        return
    try:
        await create_scope(agent, vol, qsid, limit_bytes)
    except (BackendError, OSError):
        if not await scope_exists(vol, qsid):  # else a concurrent create of the same scope made it
            raise
        return
    log.info("quota scope %s on %s did not exist: created (limit %s)", qsid, vol.name, limit_bytes)


def held(
    agent: Agent, vol: Volume, vfid: VFolderID, *, source: VFolderID | None = None, mode: int = locks.EXCLUSIVE
) -> AbstractAsyncContextManager[None]:
    """The lifecycle locks of an operation on ``vfid`` (and a clone's ``source``): see backends.locks."""
    wants = [(locks.scope_key(vol.name, vfid.qsid), locks.SHARED), (locks.vfolder_key(vol.name, vfid), mode)]
    if source is not None:
        wants.append((locks.scope_key(vol.name, source.qsid), locks.SHARED))
        wants.append((locks.vfolder_key(vol.name, source), locks.SHARED))
    return agent.locks.hold(wants, what=f"vfolder {vfid}")


async def create_vfolder(
    agent: Agent, vol: Volume, vfid: VFolderID, *, make_scope: bool = False, scope_limit: int | None = None
) -> None:
    """``make_scope``: a missing scope is created first (with ``scope_limit``) instead of refused.

    The scope is made before the vfolder's locks are taken: creating it takes no lock, and holding its
    lock shared across its own creation would gain nothing."""
    if make_scope:
        await ensure_scope(agent, vol, vfid.qsid, scope_limit)
    async with held(agent, vol, vfid):
        if not await scope_exists(vol, vfid.qsid):
            raise QuotaScopeNotFound(
                f"quota scope '{vfid.scope}' does not exist on volume {vol.name!r}; create it first (POST /quota-scope)"
            )
        await vol.create_vfolder(vfid)
        await agent.catalog.add_vfolder(vol.name, vfid.qsid, vfid.hex)
        await usage.registered(agent, vol, vfid, fresh=True)


async def delete_vfolder(agent: Agent, vol: Volume, vfid: VFolderID) -> None:
    """Delete the tree, end the vfolder's upload sessions (staged bytes too), forget it.

    The job names the trash directory and this process (``owner``), like a clone's: should the process die
    mid-removal, the engine finishes the delete as soon as it learns of the death (agent/engine/orphans.py)
    instead of leaving the trash and the catalogue row to the next full start. A cancelled delete (the agent
    stopping) leaves its job running for the same reason: the removal thread cannot be stopped."""
    async with held(agent, vol, vfid):
        row = await agent.catalog.get_vfolder(vol.name, vfid.qsid, vfid.hex)
        if row is None and not await asyncio.to_thread(os.path.lexists, vol.vfolder_path(vfid)):
            raise VFolderNotFound(f"vfolder {vfid} does not exist on volume {vol.name!r}")  # no job for a 404
        work = f"trash-{uuid.uuid4().hex}"
        params = {"dst": str(vfid), "work": work, "owner": owner.this_process(),
                  "incarnation": row.incarnation if row is not None else None}
        job = await agent.catalog.start_job("delete", vol.name, params)
        try:
            try:
                await vol.delete_vfolder(vfid, work=work)
            except VFolderNotFound:
                if row is None:
                    raise
                log.info("vfolder %s on %s was already gone from disk; forgetting it", vfid, vol.name)
            await forget(agent, vol, vfid, row.incarnation if row is not None else None)
        except Exception as e:
            await through_cancel(
                agent.catalog.finish_job(job, error=str(e) or type(e).__name__), RECORD_WAIT, "failing a delete"
            )
            raise
        await agent.catalog.finish_job(job)


async def forget(agent: Agent, vol: Volume, vfid: VFolderID, incarnation: str | None) -> bool:
    """After its tree went: end the vfolder's upload sessions, drop its row and its figure. Only the
    incarnation the delete was for (``None``: whichever row there is): a vfolder created anew under the
    same id after a delete whose process died is not forgotten by the engine finishing that delete."""
    row = await agent.catalog.get_vfolder(vol.name, vfid.qsid, vfid.hex)
    if row is not None and incarnation is not None and row.incarnation != incarnation:
        return False
    await uploads.end_sessions(agent, vol, vfid)
    await agent.catalog.remove_vfolder(vol.name, vfid.qsid, vfid.hex)
    await usage.unregistered(agent, vol, vfid)
    return True


async def clone_vfolder(agent: Agent, vol: Volume, src: VFolderID, dst: VFolderID) -> None:
    """The job names the clone's staging directory and this process (``owner``): should the process die
    mid-copy, the engine rolls the clone back as soon as it learns of the death (agent/engine/orphans.py).
    Cancelled, it ends with its job and the catalogue matching the disk (see MountedVolume.clone_vfolder)."""
    settled = asyncio.get_running_loop().create_future()
    agent.settling.add(settled)
    try:
        await _clone_held(agent, vol, src, dst)
    finally:
        agent.settling.discard(settled)
        settled.set_result(None)


async def _clone_held(agent: Agent, vol: Volume, src: VFolderID, dst: VFolderID) -> None:
    async with held(agent, vol, dst, source=src):
        work = f"clone-{uuid.uuid4().hex}"
        params = {"src": str(src), "dst": str(dst), "work": work, "owner": owner.this_process()}
        job = await agent.catalog.start_job("clone", vol.name, params)

        async def recorded() -> None:
            await agent.catalog.add_vfolder(vol.name, dst.qsid, dst.hex)
            await usage.registered(agent, vol, dst, fresh=False)
            await agent.catalog.finish_job(job)

        try:
            await vol.clone_vfolder(src, dst, work=work)
        except CloneCancelled as e:  # the copy stopped; the records follow the disk, still under the lock
            if e.published:
                await through_cancel(recorded(), RECORD_WAIT, f"recording the clone {dst}")
            else:
                error = "cancelled (the request was abandoned or the agent stopped); its staged copy was removed"
                await through_cancel(agent.catalog.finish_job(job, error=error), RECORD_WAIT, "failing a clone")
            raise
        except BaseException as e:
            await through_cancel(
                agent.catalog.finish_job(job, error=str(e) or type(e).__name__), RECORD_WAIT, "failing a clone"
            )
            raise
        _, cancelled = await through_cancel(recorded(), RECORD_WAIT, f"recording the clone {dst}")
        if cancelled:
            raise asyncio.CancelledError


async def new_upload_session(
    agent: Agent, vol: Volume, vfid: VFolderID, relpath: str, size: int, *, expires_at: float
) -> UploadSessionRow:
    """An upload session bound to the vfolder's current incarnation; under its lock, so a delete running
    meanwhile either comes first (404 here) or ends this session too. Shared: a clone of the vfolder
    (which holds it shared for the whole copy) does not hold up an upload to it."""
    async with held(agent, vol, vfid, mode=locks.SHARED):
        (await open_root(vol, vfid)).close()
        row = await agent.catalog.get_vfolder(vol.name, vfid.qsid, vfid.hex)
        if row is None:
            raise VFolderNotFound(f"vfolder {vfid} is not known on volume {vol.name!r}")
        return await agent.catalog.create_upload_session(
            vol.name, vfid.qsid, vfid.hex, relpath, size, expires_at=expires_at, incarnation=row.incarnation
        )


def cross_volume(src_volume: str, dst_volume: str | None) -> None:
    if dst_volume is not None and dst_volume != src_volume:
        raise ApiError(
            400,
            f"cannot clone across volumes ({src_volume!r} to {dst_volume!r}); clone within one volume",
            "unsupported-operation",
        )
