"""The client API: ``GET /download`` and tus ``OPTIONS``/``HEAD``/``PATCH /upload``.

End users' browsers and SDKs call these with a token the manager obtained
from the manager API. The token is verified before anything touches a file;
the paths it carries (and ``dst_dir`` from the query) are then resolved by the
one resolver beneath the vfolder root, so a valid token is never a way out.
"""

from __future__ import annotations

import asyncio
import errno
import os
import stat
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from agent.http import downloads, metrics, strict, tokens, uploads
from agent.http.errors import ApiError, malformed
from agent.http.params import DownloadQuery, TokenQuery, documented
from agent.http.socket_body import SocketBody
from agent.runtime.context import agent_of
from backends.base import Volume
from backends.ids import VFolderID
from backends.resolver import VFolderRoot, check_relpath, fs_errors
from backends.safeopen import NotRegular, open_in_root

routes = web.RouteTableDef()

TUS_VERSION = "1.0.0"
TUS_CONTENT_TYPE = "application/offset+octet-stream"
CORS_HEADERS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "GET, HEAD, OPTIONS, PATCH",
    "Access-Control-Allow-Headers": (
        "Authorization, Content-Type, Range, If-Range, Tus-Resumable, Upload-Offset, Upload-Length, "
        "Upload-Metadata, X-Requested-With, X-HTTP-Method-Override"
    ),
    "Access-Control-Expose-Headers": (
        "Upload-Offset, Upload-Length, Tus-Resumable, Tus-Version, Tus-Max-Size, Content-Disposition, "
        "Content-Range, Content-Length, Last-Modified, ETag"
    ),
    "Access-Control-Max-Age": "86400",
}


async def add_cors_headers(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare`` hook of the client app: browsers may call every route (and read its errors)."""
    for key, value in CORS_HEADERS.items():
        response.headers.setdefault(key, value)


def _flag(request: web.Request, name: str) -> bool | None:
    return strict.flag(strict.query(request).get(name), name)


def _claims(request: web.Request, op: tokens.Op) -> dict[str, Any]:
    agent = agent_of(request)
    return tokens.verify(agent.config.storage_proxy.secret.get_secret_value(), strict.query(request).get("token"), op)


def _claim_str(claims: dict[str, Any], name: str) -> str:
    value = claims.get(name)
    if not isinstance(value, str):
        raise ApiError(403, f"invalid token: the {name} claim is missing or not a string", "invalid-token")
    try:
        return strict.check_name_form(value)
    except ValueError as e:
        raise ApiError(403, f"invalid token: the {name} claim {e}", "invalid-token") from None


def _dst_dir(request: web.Request) -> str | None:
    return strict.query_name(request, "dst_dir")


def _join(dst_dir: str | None, relpath: str) -> str:
    check_relpath(relpath)
    if not dst_dir:
        return relpath
    check_relpath(dst_dir)
    return f"{dst_dir.rstrip('/')}/{relpath}"


# -- download ---------------------------------------------------------------------


def _open_root(vol: Volume, claims: dict[str, Any]) -> tuple[VFolderRoot, str]:
    """The root the token grants (its vfolder, or the manager's unmanaged host path) and a fallback name."""
    if claims.get("unmanaged_path") is not None:
        unmanaged = _claim_str(claims, "unmanaged_path")
        if "\0" in unmanaged or not os.path.isabs(unmanaged):
            raise ApiError(403, "invalid token: unmanaged_path must be an absolute path without NUL", "invalid-token")
        try:
            fd = os.open(unmanaged, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise ApiError(
                404, f"unmanaged path {unmanaged} is not a directory: {e.strerror}", "file-not-found"
            ) from None
        return VFolderRoot(fd, unmanaged), os.path.basename(unmanaged.rstrip("/")) or "download"
    try:
        vfid = VFolderID.parse(claims.get("vfid"))
    except ValueError:
        raise ApiError(403, "invalid token: bad vfid claim", "invalid-token") from None
    return vol.open_vfolder(vfid), vfid.hex


def _open_entry(root: VFolderRoot, path: str) -> tuple[int, os.stat_result]:
    """Open what ``path`` names beneath the root: a regular file or a directory (never blocks: safeopen)."""
    with fs_errors(path):
        try:
            return open_in_root(root, path, dirs=True)
        except (FileNotFoundError, NotADirectoryError):
            raise ApiError(404, f"no such file: {path}", "file-not-found", errno=errno.ENOENT, paths=[path]) from None
        except NotRegular:
            raise ApiError(
                400, f"{path} is not a regular file or directory", "invalid-api-params", paths=[path]
            ) from None


def _open_download(vol: Volume, claims: dict[str, Any], path: str) -> tuple[int, os.stat_result, str]:
    root, fallback = _open_root(vol, claims)
    with root:
        fd, st = _open_entry(root, path)
    name = path.rstrip("/").rpartition("/")[2]
    return fd, st, fallback if name in ("", ".", "..") else name


@routes.options("/download")
@documented()
async def download_options(request: web.Request) -> web.Response:
    """CORS preflight (a browser sending Range from another origin asks first); the headers come from the hook."""
    return web.Response(status=204)


@routes.get("/download")
@documented(query=DownloadQuery, status=200, content_type="application/octet-stream", headers=("Range", "If-Range"))
async def download(request: web.Request) -> web.StreamResponse:
    """A file (Range, If-Range) or, with archive, a directory as a zip streamed on the fly."""
    claims = _claims(request, "download")
    agent = agent_of(request)
    path = _join(_dst_dir(request), _claim_str(claims, "relpath"))
    archive = _flag(request, "archive")
    if archive is None:
        archive = claims.get("archive") is True
    no_cache = bool(_flag(request, "no_cache"))
    vol = await agent.volume(_claim_str(claims, "volume"))
    fd, st, name = await asyncio.to_thread(_open_download, vol, claims, path)
    if stat.S_ISDIR(st.st_mode):
        if not archive:
            os.close(fd)
            raise ApiError(
                400,
                f"{path} is a directory; ask for it with archive=true to get a zip",
                "invalid-api-params",
                paths=[path],
            )
        with fs_errors(path):
            return await downloads.send_zip(request, fd, name, no_cache=no_cache)
    try:
        return await downloads.send_file(request, fd, st, name, no_cache=no_cache)
    finally:
        os.close(fd)


# -- tus upload -------------------------------------------------------------------------


def _tus_headers(**extra: str) -> dict[str, str]:
    return {"Tus-Resumable": TUS_VERSION, **extra}


def _check_tus_version(request: web.Request) -> None:
    version = request.headers.get("Tus-Resumable")
    if version is not None and version.strip() != TUS_VERSION:
        raise ApiError(
            412,
            f"Tus-Resumable {version!r} is not supported; this server speaks {TUS_VERSION}",
            "unsupported-tus-version",
            tus_version=TUS_VERSION,
        )


@routes.options("/upload")
@documented()
async def upload_options(request: web.Request) -> web.Response:
    """tus discovery: versions, extensions and the size limit."""
    max_size = agent_of(request).config.storage_proxy.max_upload_size
    return web.Response(status=204, headers=_tus_headers(**{"Tus-Version": TUS_VERSION, "Tus-Max-Size": str(max_size)}))


@routes.head("/upload")
@documented(query=TokenQuery, status=200, headers=("Tus-Resumable",))
async def upload_head(request: web.Request) -> web.Response:
    """tus: the durable offset of an upload (resume from here)."""
    claims = _claims(request, "upload")
    _check_tus_version(request)
    agent = agent_of(request)
    upload = await uploads.open_upload(agent, claims, _dst_dir(request))
    offset = await uploads.offset_of(agent, upload)
    headers = _tus_headers(
        **{"Upload-Offset": str(offset), "Upload-Length": str(upload.row.size), "Cache-Control": "no-store"}
    )
    return web.Response(status=200, headers=headers)


@routes.patch("/upload")
@documented(query=TokenQuery, raw_body=TUS_CONTENT_TYPE, headers=("Tus-Resumable", "Upload-Offset"))
async def upload_patch(request: web.Request) -> web.Response:
    """tus: append bytes at the current offset; the file is published when complete."""
    claims = _claims(request, "upload")
    _check_tus_version(request)
    content_type = request.headers.get("Content-Type", "").split(";")[0].strip().lower()
    if content_type != TUS_CONTENT_TYPE:
        raise ApiError(
            415,
            f"a tus PATCH body must be {TUS_CONTENT_TYPE}, not {content_type or 'untyped'}",
            "unsupported-media-type",
        )
    offset = strict.uint(request.headers.get("Upload-Offset"), "the Upload-Offset header")
    agent = agent_of(request)
    spliced = SocketBody.of(request)  # before the first await: the client keeps sending meanwhile (socket_body.py)
    upload = await uploads.open_upload(agent, claims, _dst_dir(request), check=False)
    try:
        new = await uploads.append(agent, upload, offset, request.content, request.content_length, spliced)
    except (ConnectionError, HttpProcessingError):  # the body broke off; what arrived was kept and HEAD reports it
        raise malformed("the connection was lost before the whole PATCH body arrived") from None
    metrics.UPLOAD_BYTES.inc(max(0, new - offset))
    return web.Response(status=204, headers=_tus_headers(**{"Upload-Offset": str(new)}))
