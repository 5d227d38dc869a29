"""Request parameters: the manager's JSON body (even on GET) checked against pydantic models."""

from __future__ import annotations

import functools
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

from aiohttp import web
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    StrictBool,
    StrictInt,
    ValidationError,
    WithJsonSchema,
)

from agent.errors import invalid_params, malformed
from agent.strict import MAX_INT64, json_body, name_validator
from backends.ids import VFolderID, parse_qsid

M = TypeVar("M", bound=BaseModel)

MAX_METADATA = 10 * 2**20


def _vfid(value: object) -> VFolderID:
    if isinstance(value, VFolderID):
        return value
    return VFolderID.parse(value)


VFID = Annotated[
    VFolderID,
    BeforeValidator(_vfid),
    WithJsonSchema(
        {
            "type": "string",
            "pattern": r"^[A-Za-z0-9]+([-_][A-Za-z0-9]+)*/([0-9a-fA-F]{32}|[0-9a-fA-F-]{36})$",
            "description": "'<quota-scope-id>/<folder-uuid>'",
            "examples": ["user-1/0123456789abcdef0123456789abcdef"],
        }
    ),
]
QSID = Annotated[
    str,
    BeforeValidator(parse_qsid),
    WithJsonSchema(
        {
            "type": "string",
            "pattern": r"^[A-Za-z0-9]+([-_][A-Za-z0-9]+)*$",
            "description": "quota scope id: letters and digits, optionally joined by single '-' or '_'",
        }
    ),
]
_NAME_FORM = (
    "bytes that are not UTF-8 travel as lone surrogates U+DC80..U+DCFF, as the listing gives them "
    "(README: Names that are not UTF-8)"
)
RelPath = Annotated[
    str,
    PlainValidator(name_validator(4096)),
    WithJsonSchema({"type": "string", "maxLength": 4096, "description": f"a path inside the vfolder; {_NAME_FORM}"}),
]
FileName = Annotated[
    str,
    PlainValidator(name_validator(255, min_length=1)),
    WithJsonSchema({"type": "string", "minLength": 1, "maxLength": 255, "description": f"a name; {_NAME_FORM}"}),
]


def _host_path(value: object) -> str:
    path = name_validator(4096)(value)
    if "\0" in path:
        raise ValueError("contains a NUL byte")
    if not os.path.isabs(path):
        raise ValueError("must be an absolute host path")
    return path


HostPath = Annotated[
    str,
    PlainValidator(_host_path),
    WithJsonSchema({"type": "string", "maxLength": 4096, "description": f"an absolute host path; {_NAME_FORM}"}),
]


class Params(BaseModel):
    model_config = ConfigDict(extra="ignore", arbitrary_types_allowed=True, frozen=True)


class VolumeParams(Params):
    volume: str


class VFolderParams(VolumeParams):
    vfid: VFID


class QuotaOptions(Params):
    limit_bytes: StrictInt | None = Field(default=None, ge=-1, le=MAX_INT64)


class QuotaScopeParams(VolumeParams):
    qsid: QSID


class QuotaScopeCreate(QuotaScopeParams):
    options: QuotaOptions | None = None


class QuotaScopeUpdate(QuotaScopeParams):
    options: QuotaOptions


class VFolderCreate(VFolderParams):
    options: Any = None


class VFolderClone(Params):
    src_volume: str
    src_vfid: VFID
    dst_volume: str | None = None
    dst_vfid: VFID
    options: Any = None


class MountParams(VFolderParams):
    subpath: RelPath = "."


class MetadataSet(VFolderParams):
    payload: Annotated[str, Field(max_length=MAX_METADATA)]


class VolumeQuotaParams(VFolderParams):
    size_bytes: StrictInt | None = Field(default=None, le=MAX_INT64)


class MkdirParams(VFolderParams):
    relpath: RelPath
    parents: StrictBool = True
    exist_ok: StrictBool = False


class RelPathParams(VFolderParams):
    relpath: RelPath


class RenameParams(RelPathParams):
    new_name: FileName
    is_dir: Any = None


class MoveParams(VFolderParams):
    src_relpath: RelPath
    dst_relpath: RelPath


class DownloadParams(RelPathParams):
    archive: StrictBool = False
    unmanaged_path: HostPath | None = None


class UploadParams(RelPathParams):
    size: StrictInt = Field(ge=0, le=MAX_INT64)


class DeleteFilesParams(VFolderParams):
    relpaths: Annotated[list[RelPath], Field(min_length=1)]
    recursive: StrictBool = False


class TokenQuery(Params):
    """The client API's query string: the token the manager obtained, and where to put the file."""

    token: str = Field(description="a JWT issued by /folder/file/download or /folder/file/upload")
    dst_dir: RelPath | None = Field(default=None, description="a directory inside the vfolder the path is joined to")


class DownloadQuery(TokenQuery):
    archive: bool | None = Field(default=None, description="a directory as a zip (true/false; default: the token's)")
    no_cache: bool | None = Field(default=None, description="answer with Cache-Control: no-store")


async def read_body(request: web.Request) -> Any:
    """The request's JSON body, or None when it has none."""
    raw = await request.read()
    if not raw.strip():
        return None
    return json_body(raw)


async def parse(request: web.Request, model: type[M]) -> M:
    body = await read_body(request)
    if body is None:
        raise malformed(f"{request.method} {request.path} needs a JSON object body with its parameters")
    if not isinstance(body, dict):
        raise malformed("request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        fields: dict[str, str] = {}
        for err in e.errors():
            key = ".".join(str(p) for p in err["loc"]) or "body"
            msg = "field required" if err["type"] == "missing" else err["msg"].removeprefix("Value error, ")
            fields.setdefault(key, msg)
        raise invalid_params(fields) from None


async def no_body(request: web.Request) -> None:
    body = await read_body(request)
    if body is not None and body != {}:
        raise malformed(f"{request.method} {request.path} takes no parameters")


# -- the routes' declared contract (read by agent.openapi: one source of truth) ---------------------

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
API_DOC = "__api_doc__"


@dataclass(frozen=True)
class ApiDoc:
    """What a route takes and answers, recorded on its handler for the OpenAPI document."""

    body: type[BaseModel] | None = None  # the JSON body the handler is given, parsed
    query: type[BaseModel] | None = None  # query-string parameters (client API)
    answer: type[BaseModel] | None = None  # the JSON answer on success; None = no body
    status: int = 200
    content_type: str = "application/json"  # of a successful answer with a body
    summary: str = ""
    raw_body: str | None = None  # media type of a streamed (non-JSON) request body
    headers: tuple[str, ...] = ()  # request headers the route reads


def takes(
    body: type[M] | None,
    *,
    answer: type[BaseModel] | None = None,
    status: int | None = None,
    content_type: str = "application/json",
) -> Callable[[Callable[..., Awaitable[web.StreamResponse]]], Handler]:
    """Parse the JSON body into ``body`` and call ``handler(request, params)``; ``None``: no parameters
    allowed, ``handler(request)``. The model is also what the OpenAPI document shows."""

    def deco(fn: Callable[..., Awaitable[web.StreamResponse]]) -> Handler:
        @functools.wraps(fn)
        async def handler(request: web.Request) -> web.StreamResponse:
            if body is None:
                await no_body(request)
                return await fn(request)
            return await fn(request, await parse(request, body))

        code = status if status is not None else (200 if answer is not None else 204)
        doc = ApiDoc(body=body, answer=answer, status=code, content_type=content_type, summary=_summary(fn))
        setattr(handler, API_DOC, doc)
        return handler

    return deco


def documented(
    *,
    query: type[BaseModel] | None = None,
    answer: type[BaseModel] | None = None,
    status: int | None = None,
    content_type: str = "application/json",
    raw_body: str | None = None,
    headers: tuple[str, ...] = (),
) -> Callable[[Handler], Handler]:
    """Record what a handler that reads its own input (query string, headers, stream) takes and answers."""

    def deco(fn: Handler) -> Handler:
        code = status if status is not None else (200 if answer is not None else 204)
        doc = ApiDoc(
            query=query,
            answer=answer,
            status=code,
            content_type=content_type,
            summary=_summary(fn),
            raw_body=raw_body,
            headers=headers,
        )
        setattr(fn, API_DOC, doc)
        return fn

    return deco


def api_doc(handler: object) -> ApiDoc | None:
    return getattr(handler, API_DOC, None)


def _summary(fn: Callable[..., Any]) -> str:
    return (fn.__doc__ or fn.__name__.replace("_", " ")).strip().splitlines()[0]
