"""vfolder lifecycle and queries: create, delete, clone, mount, metadata, usage."""

from __future__ import annotations

from aiohttp import web

from agent.http import answers, usage, vfolders
from agent.http.errors import ApiError
from agent.http.params import MetadataSet, MountParams, VFolderClone, VFolderCreate, VFolderParams, takes
from agent.runtime.context import agent_of
from backends import files
from backends.errors import VFolderNotFound

routes = web.RouteTableDef()


@routes.post("/folder/create")
@takes(VFolderCreate)
async def create(request: web.Request, p: VFolderCreate) -> web.Response:
    """Create a vfolder; its quota scope must exist, unless the id is typed (23.03.7+: the scope is made)."""
    agent = agent_of(request)
    limit = p.options.initial_max_size_for_quota_scope if p.options is not None else None
    with vfolders.scope_named(p.vfid.scope):
        await vfolders.create_vfolder(
            agent, await agent.volume(p.volume), p.vfid, make_scope=p.vfid.typed, scope_limit=limit or None
        )
    return web.Response(status=204)


@routes.post("/folder/delete")
@takes(VFolderParams)
async def delete(request: web.Request, p: VFolderParams) -> web.Response:
    """Delete a vfolder, its whole tree and its upload sessions (an unknown one: 404, or 204 for a typed id, as
    23.03.7+ proxies; 409 while another operation holds it)."""
    agent = agent_of(request)
    try:
        await vfolders.delete_vfolder(agent, await agent.volume(p.volume), p.vfid)
    except VFolderNotFound:
        if not p.vfid.typed:
            raise
    return web.Response(status=204)


@routes.post("/folder/clone")
@takes(VFolderClone)
async def clone(request: web.Request, p: VFolderClone) -> web.Response:
    """Copy a vfolder (staged, published only when complete; 409 if its staging was removed meanwhile)."""
    agent = agent_of(request)
    vfolders.cross_volume(p.src_volume, p.dst_volume)
    with vfolders.scope_named(p.dst_vfid.scope):
        await vfolders.clone_vfolder(agent, await agent.volume(p.src_volume), p.src_vfid, p.dst_vfid)
    return web.Response(status=204)


@routes.get("/folder/mount")
@takes(MountParams, answer=answers.MountAnswer)
async def mount(request: web.Request, p: MountParams) -> web.Response:
    """The host path of a vfolder (the subpath must exist inside it)."""
    vol = await agent_of(request).volume(p.volume)
    try:
        await vfolders.in_vfolder(vol, p.vfid, files.require, p.subpath)  # the subpath must exist inside it
    except VFolderNotFound as e:
        raise ApiError(400, str(e), "vfolder-not-found") from None
    return web.json_response({"path": str(vol.vfolder_path(p.vfid))})


async def _existing(request: web.Request, params: VFolderParams) -> None:
    vol = await agent_of(request).volume(params.volume)
    (await vfolders.open_root(vol, params.vfid)).close()


@routes.get("/folder/metadata")
@takes(VFolderParams, answer=answers.MetadataAnswer)
async def get_metadata(request: web.Request, p: VFolderParams) -> web.Response:
    """The metadata payload stored for a vfolder."""
    await _existing(request, p)
    payload = await agent_of(request).catalog.get_metadata(p.volume, p.vfid.qsid, p.vfid.hex)
    return web.json_response({"status": "ok", "payload": payload})


@routes.post("/folder/metadata")
@takes(MetadataSet, answer=answers.StatusOk)
async def set_metadata(request: web.Request, p: MetadataSet) -> web.Response:
    """Store a vfolder's metadata payload (10 MiB at most)."""
    await _existing(request, p)
    await agent_of(request).catalog.set_metadata(p.volume, p.vfid.qsid, p.vfid.hex, p.payload)
    return web.json_response({"status": "ok"})


@routes.get("/folder/usage")
@takes(VFolderParams, answer=answers.FolderUsage)
async def folder_usage(request: web.Request, p: VFolderParams) -> web.Response:
    """Entries and st_size sum below the vfolder root, from the catalogue."""
    agent = agent_of(request)
    u = await usage.get(agent, await agent.volume(p.volume), p.vfid)
    return web.json_response(usage.as_json(u))


@routes.post("/folder/usage/refresh")
@takes(VFolderParams, answer=answers.RefreshAccepted, status=202)
async def refresh_usage(request: web.Request, p: VFolderParams) -> web.Response:
    """Extension: rescan the vfolder now; answers at once, later usage answers say stale: true until it lands."""
    agent = agent_of(request)
    await usage.refresh(agent, await agent.volume(p.volume), p.vfid)
    return web.json_response({"status": "accepted"}, status=202)


@routes.get("/folder/used-bytes")
@takes(VFolderParams, answer=answers.UsedBytes)
async def used_bytes(request: web.Request, p: VFolderParams) -> web.Response:
    """Allocated bytes of the vfolder (like du -s -B1), from the catalogue."""
    agent = agent_of(request)
    u = await usage.get(agent, await agent.volume(p.volume), p.vfid)
    return web.json_response(
        {
            "used_bytes": u.allocated_bytes,
            "measured_at": u.measured_at,
            "source": u.source,
            "stale": u.stale,
            "pending": u.pending,
        }
    )
