"""The one error mapper: every failure becomes a JSON problem with a ``msg``.

Handlers raise :class:`ApiError` or let backend exceptions through; the
middleware turns both into answers. Anything unexpected is logged with its
traceback under a request id and answered as a 500 that carries only that id.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import re
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from agent.logs import request_target
from backends import errors as be
from backends.errors import BackendError
from catalog import WriterUnavailable

log = logging.getLogger(__name__)

PROBLEM_BASE = "https://api.backend.ai/probs/storage/"
REQUEST_ID = "request_id"
CLOSE_AFTER = "close_after"  # this request's connection cannot carry another one: its answer closes it


class ApiError(Exception):
    """An error answer: HTTP status, optional problem type and the user-facing message."""

    def __init__(self, status: int, msg: str, problem: str | None = None, **extra: Any) -> None:
        super().__init__(msg)
        self.status = status
        self.msg = msg
        self.problem = problem
        self.extra = extra


def malformed(msg: str) -> ApiError:
    return ApiError(400, msg, "malformed-request")


def invalid_params(fields: dict[str, str]) -> ApiError:
    detail = "; ".join(f"{k}: {v}" for k, v in fields.items())
    return ApiError(400, f"invalid parameters: {detail}", "invalid-api-params", data=fields)


# backend exception -> (status, problem type)
_BACKEND_MAP: dict[type[BackendError], tuple[int, str | None]] = {
    be.InvalidPath: (400, "invalid-api-params"),
    be.VFolderNotFound: (404, "vfolder-not-found"),
    be.VFolderExists: (409, "vfolder-exists"),
    be.QuotaScopeNotFound: (404, "invalid-quota-scope"),
    be.QuotaScopeNotEmpty: (409, "quota-scope-not-empty"),
    be.NotEnoughSpace: (400, "not-enough-space"),
    be.QuotaExceeded: (400, "quota-exceeded"),
    be.UnsupportedOperation: (400, "unsupported-operation"),
    be.VolumeUnavailable: (503, "volume-unavailable"),
    be.ExternalError: (502, "external-error"),
    be.Busy: (409, "conflict"),
    be.StagingLost: (409, "conflict"),
}


# errno of a disk that cannot take the write -> (status, problem type, what the user is told)
_DISK_FAULTS: dict[int, tuple[int, str, str]] = {
    errno.ENOSPC: (400, "not-enough-space", "no space left on the volume"),
    errno.EDQUOT: (400, "quota-exceeded", "quota exceeded"),
    errno.EROFS: (  # 400 like every filesystem error of a file operation (API.md), typed so it stands out
        400,
        "volume-read-only",
        "the volume is mounted read-only: writes are refused until it is remounted read-write",
    ),
}


def from_disk_fault(err: int, strerror: str, paths: list[str]) -> ApiError | None:
    """A full or read-only disk, named (errno and paths kept), or None for any other errno."""
    fault = _DISK_FAULTS.get(err)
    if fault is None:
        return None
    status, problem, what = fault
    return ApiError(status, f"{what} ({strerror})", problem, errno=err, paths=paths)


def from_backend(e: BackendError) -> ApiError:
    if isinstance(e, be.FileOpError):
        return from_disk_fault(e.errno, e.strerror, e.paths) or ApiError(
            400, e.strerror, None, errno=e.errno, paths=e.paths
        )
    for cls in type(e).__mro__:
        if cls in _BACKEND_MAP:
            status, problem = _BACKEND_MAP[cls]
            extra = {"paths": [e.relpath]} if isinstance(e, be.InvalidPath) else {}
            return ApiError(status, str(e), problem, **extra)
    return ApiError(500, str(e), None)


def problem_response(err: ApiError, request_id: str | None = None) -> web.Response:
    body: dict[str, Any] = {}
    if err.problem:
        body["type"] = PROBLEM_BASE + err.problem
        body["title"] = err.msg
    body["msg"] = err.msg
    body.update(err.extra)
    if request_id:
        body["request_id"] = request_id
    content_type = "application/problem+json" if err.problem else "application/json"
    return web.json_response(body, status=err.status, content_type=content_type)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


_SANE_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
# A new id is this process's random prefix and a counter: unique for the agent's life and across restarts,
# and free of a getrandom() syscall per request (under load each syscall of the event loop costs a GIL turn).
_ID_PREFIX = secrets.token_hex(3)
_ID_COUNTER = itertools.count(1)


def _request_id(request: web.Request) -> str:
    """The caller's X-Request-ID when it is a sane token (it reaches logs and bodies), else a new one."""
    given = request.headers.get("X-Request-ID", "")
    return given if _SANE_ID.fullmatch(given) else f"{_ID_PREFIX}{next(_ID_COUNTER):010x}"


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    request[REQUEST_ID] = _request_id(request)
    response = await _answer_or_problem(request, handler)
    if request.get(CLOSE_AFTER):
        response.force_close()
    return response


async def _answer_or_problem(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The handler's answer, or the problem answer its error maps to."""
    request_id = request[REQUEST_ID]

    def answer(err: ApiError) -> web.Response:
        if err.status < 500:  # one line per refused request, under the id the caller sees in the body
            msg = " ".join(err.msg.splitlines())  # the message may quote the caller's input: keep it one line
            target = request_target(request.rel_url.raw_path, request.rel_url.raw_query_string)  # still %-encoded
            log.info("%s %s -> %d %s [request %s]", request.method, target, err.status, msg, request_id)
        return problem_response(err, request_id)

    try:
        return await handler(request)
    except ApiError as e:
        return answer(e)
    except BackendError as e:
        return answer(from_backend(e))
    except WriterUnavailable as e:  # an HTTP worker whose engine is down or stalled: its msg names the engine
        return answer(ApiError(503, str(e), "engine-unavailable"))
    except web.HTTPRequestEntityTooLarge as e:
        return answer(ApiError(413, f"request body too large ({e.text})", "request-too-large"))
    except web.HTTPException as e:
        if e.status < 400:
            raise
        msg = e.reason if e.status != 404 else f"no route {request.method} {request.path}"
        return answer(ApiError(e.status, msg, None))
    except ConnectionResetError:
        raise
    except OSError as e:
        # a write that reached the disk outside a file operation (folder or scope create, delete, ...): a full or
        # read-only volume is named like everywhere else; no host path is shown
        err = from_disk_fault(e.errno or 0, e.strerror or os.strerror(e.errno or 0), [])
        if err is None:
            log.exception("unexpected error in %s %s [request %s]", request.method, request.path, request_id)
            err = ApiError(500, "internal error; see the agent log", None)
        return answer(err)
    except Exception:
        log.exception("unexpected error in %s %s [request %s]", request.method, request.path, request_id)
        return answer(ApiError(500, "internal error; see the agent log", None))
