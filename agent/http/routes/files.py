"""File operations inside a vfolder (/folder/file/*) and the token-issuing calls."""

from __future__ import annotations

import asyncio
import os
import time
from datetime import UTC, datetime

from aiohttp import web

from agent.http import answers, tokens, vfolders
from agent.http.errors import ApiError, from_backend
from agent.http.params import (
    DeleteFilesParams,
    DownloadParams,
    MkdirParams,
    MoveParams,
    RelPathParams,
    RenameParams,
    UploadParams,
    takes,
)
from agent.runtime.context import agent_of
from backends import files
from backends.errors import BackendError, FileOpError
from backends.resolver import VFolderRoot, check_relpath

routes = web.RouteTableDef()
CHUNK = 1 << 20


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=UTC).isoformat()


def _mkdir_each(root: VFolderRoot, relpaths: list[str], *, parents: bool, exist_ok: bool) -> list[BackendError | None]:
    """mkdir of every path in turn, each path's failure kept (a per-path answer), none stopping the rest."""
    outcome: list[BackendError | None] = []
    for relpath in relpaths:
        try:
            files.mkdir(root, relpath, parents=parents, exist_ok=exist_ok)
            outcome.append(None)
        except BackendError as e:
            outcome.append(e)
    return outcome


@routes.post("/folder/file/mkdir")
@takes(
    MkdirParams,
    answer=answers.MkdirResults,
    status=200,
    also=(
        (204, False, "one path, bare quota scope id (23.03.5): made"),
        (207, True, "some of the paths made, the others failed"),
        (422, True, "none of the paths made (also `msg`)"),
    ),
)
async def mkdir(request: web.Request, p: MkdirParams) -> web.Response:
    """Make directories: 204 for one path of a bare id (23.03.5), else per path: 200 all / 207 some / 422 none.

    The per-path answer is 24.03+'s; 23.03.7-23.09 managers read no body, so a typed id always gets it."""
    vol = await agent_of(request).volume(p.volume)
    if isinstance(p.relpath, str) and not p.vfid.typed:
        await vfolders.in_vfolder(vol, p.vfid, files.mkdir, p.relpath, parents=p.parents, exist_ok=p.exist_ok)
        return web.Response(status=204)
    relpaths = [p.relpath] if isinstance(p.relpath, str) else list(p.relpath)
    outcome = await vfolders.in_vfolder(vol, p.vfid, _mkdir_each, relpaths, parents=p.parents, exist_ok=p.exist_ok)
    success = [{"msg": None, "item": path} for path, err in zip(relpaths, outcome, strict=True) if err is None]
    failed = [
        {"msg": from_backend(err).msg, "item": path} for path, err in zip(relpaths, outcome, strict=True) if err
    ]
    body: dict[str, object] = {"results": {"success": success, "failed": failed}}
    if not success:
        body["msg"] = "; ".join(f"{r['item']}: {r['msg']}" for r in failed)
        return web.json_response(body, status=422)
    return web.json_response(body, status=207 if failed else 200)


@routes.post("/folder/file/list")
@takes(RelPathParams, answer=answers.Listing)
async def listdir(request: web.Request, p: RelPathParams) -> web.Response:
    """List a directory's entries (links described, not followed; at most scandir-limit)."""
    agent = agent_of(request)
    vol = await agent.volume(p.volume)
    limit = agent.config.storage_proxy.scandir_limit
    entries = await vfolders.in_vfolder(vol, p.vfid, files.listdir, p.relpath or ".", limit=limit)
    items = [
        {
            "name": e.name,
            "type": e.type,
            "stat": {"mode": e.mode, "size": e.size, "created": _iso(e.ctime), "modified": _iso(e.mtime)},
            "symlink_target": e.symlink_target,
        }
        for e in entries
    ]
    return web.json_response({"items": items})


@routes.post("/folder/file/rename")
@takes(RenameParams)
async def rename(request: web.Request, p: RenameParams) -> web.Response:
    """Rename an entry within its directory (never replaces one)."""
    vol = await agent_of(request).volume(p.volume)
    await vfolders.in_vfolder(vol, p.vfid, files.rename, p.relpath, p.new_name)
    return web.Response(status=204)


@routes.post("/folder/file/move")
@takes(MoveParams)
async def move(request: web.Request, p: MoveParams) -> web.Response:
    """Move an entry elsewhere in the vfolder (never replaces one)."""
    vol = await agent_of(request).volume(p.volume)
    await vfolders.in_vfolder(vol, p.vfid, files.move, p.src_relpath, p.dst_relpath)
    return web.Response(status=204)


@routes.post("/folder/file/delete")
@takes(DeleteFilesParams, answer=answers.StatusOk)
async def delete(request: web.Request, p: DeleteFilesParams) -> web.Response:
    """Delete entries (a directory only with recursive); a link is removed as a link."""
    vol = await agent_of(request).volume(p.volume)
    await vfolders.in_vfolder(vol, p.vfid, files.delete, list(p.relpaths), recursive=p.recursive)
    return web.json_response({"status": "ok"})


@routes.post("/folder/file/fetch")
@takes(RelPathParams, status=200, content_type="application/octet-stream")
async def fetch(request: web.Request, p: RelPathParams) -> web.StreamResponse:
    """A regular file's bytes."""
    vol = await agent_of(request).volume(p.volume)
    try:
        fd, st = await vfolders.in_vfolder(vol, p.vfid, files.open_regular, p.relpath)
    except FileOpError as e:
        if e.errno == 2:
            raise ApiError(404, f"no such file: {p.relpath}", "file-not-found", errno=2, paths=[p.relpath]) from None
        raise
    try:
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        resp.content_length = st.st_size
        await resp.prepare(request)
        while chunk := await asyncio.to_thread(os.read, fd, CHUNK):
            await resp.write(chunk)
        await resp.write_eof()
        return resp
    finally:
        os.close(fd)


@routes.post("/folder/file/download")
@takes(DownloadParams, answer=answers.TokenAnswer)
async def download_token(request: web.Request, p: DownloadParams) -> web.Response:
    """A token for GET /download on the client API."""
    agent = agent_of(request)
    vol = await agent.volume(p.volume)
    check_relpath(p.relpath)
    (await vfolders.open_root(vol, p.vfid)).close()
    sp = agent.config.storage_proxy
    token = tokens.issue(
        sp.secret.get_secret_value(),
        sp.session_expire,
        "download",
        volume=p.volume,
        vfid=str(p.vfid),
        relpath=p.relpath,
        archive=p.archive,
        unmanaged_path=p.unmanaged_path,
    )
    return web.json_response({"token": token})


@routes.post("/folder/file/upload")
@takes(UploadParams, answer=answers.TokenAnswer)
async def upload_token(request: web.Request, p: UploadParams) -> web.Response:
    """A token for a tus upload on the client API."""
    agent = agent_of(request)
    vol = await agent.volume(p.volume)
    check_relpath(p.relpath)
    sp = agent.config.storage_proxy
    if p.size > sp.max_upload_size:
        raise ApiError(413, f"declared size {p.size} exceeds max-upload-size {sp.max_upload_size}", "upload-too-large")
    expires = sp.session_expire
    session = await vfolders.new_upload_session(
        agent, vol, p.vfid, p.relpath, p.size, expires_at=time.time() + expires
    )
    token = tokens.issue(
        sp.secret.get_secret_value(),
        expires,
        "upload",
        volume=p.volume,
        vfid=str(p.vfid),
        relpath=p.relpath,
        session=session.session_id,
        size=p.size,
        inc=session.incarnation,  # the vfolder incarnation: a re-created vfolder id never takes this upload
    )
    return web.json_response({"token": token})
