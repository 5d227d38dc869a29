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

from agent.http.errors import invalid_params, malformed
from agent.http.strict import MAX_INT64, json_body, name_validator
from backends.ids import QuotaScopeID, VFolderID

M = TypeVar("M", bound=BaseModel)

MAX_METADATA = 10 * 2**20


# The two quota scope spellings (backends.ids): bare 23.03.5 ids, and typed ids of 23.03.7+ managers.
_SCOPE_PATTERN = (
    r"(?:[A-Za-z0-9]+(?:[-_][A-Za-z0-9]+)*"
    r"|(?:[Uu][Ss][Ee][Rr]|[Pp][Rr][Oo][Jj][Ee][Cc][Tt]):[0-9a-fA-F]+(?:-[0-9a-fA-F]+)*)"
)
_SCOPE_FORMS = "'user:<uuid>' / 'project:<uuid>' (23.03.7+; its directory: the UUID's hex) or bare (23.03.5)"

VFID = Annotated[
    VFolderID,
    BeforeValidator(VFolderID.parse),
    WithJsonSchema(
        {
            "type": "string",
            "pattern": rf"^{_SCOPE_PATTERN}/(?:[0-9a-fA-F]{{32}}|[0-9a-fA-F-]{{36}})$",
            "description": f"'<quota-scope-id>/<folder-uuid>'; the scope is {_SCOPE_FORMS}",
            "examples": ["user:8a3f2c1e-0b4d-4e6f-9a01-2b3c4d5e6f70/0123456789abcdef0123456789abcdef",
                         "user-1/0123456789abcdef0123456789abcdef"],
        }
    ),
]
QSID = Annotated[
    QuotaScopeID,
    BeforeValidator(QuotaScopeID.parse),
    WithJsonSchema(
        {
            "type": "string",
            "pattern": rf"^{_SCOPE_PATTERN}$",
            "description": f"quota scope id: {_SCOPE_FORMS}",
            "examples": ["user:8a3f2c1e-0b4d-4e6f-9a01-2b3c4d5e6f70", "user-1"],
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


class CreateOptions(Params):
    """``folder/create`` options: the rest is deprecated and ignored (per-vfolder quota is gone)."""

    initial_max_size_for_quota_scope: StrictInt | None = Field(
        default=None,
        ge=0,
        description="23.03.7+ managers: the limit of the quota scope when this create makes it (0 / null: none)",
    )


class VFolderCreate(VFolderParams):
    options: CreateOptions | None = Field(
        default=None, description="with a typed quota scope id, a missing scope is created first, with this limit"
    )


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


MAX_MKDIR_PATHS = 50  # as upstream 24.03+
MAX_RELPATH = 4096


def _one_or_more_paths(value: object) -> object:
    """One path, or a list of 1 to 50 (24.03+); one error naming ``relpath`` instead of one per union arm."""
    paths = value if isinstance(value, list) else [value]
    if not 1 <= len(paths) <= MAX_MKDIR_PATHS or not all(isinstance(p, str) for p in paths):
        raise ValueError(f"relpath must be a path or a list of 1 to {MAX_MKDIR_PATHS} paths")
    checked = [name_validator(MAX_RELPATH)(p) for p in paths]
    return checked if isinstance(value, list) else checked[0]


MkdirPaths = Annotated[
    str | list[str],
    BeforeValidator(_one_or_more_paths),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "maxLength": MAX_RELPATH},
                {
                    "type": "array",
                    "items": {"type": "string", "maxLength": MAX_RELPATH},
                    "minItems": 1,
                    "maxItems": MAX_MKDIR_PATHS,
                },
            ],
            "description": f"a path, or (24.03+ managers) a list of 1 to {MAX_MKDIR_PATHS} paths answered one by one",
        }
    ),
]


class MkdirParams(VFolderParams):
    relpath: MkdirPaths
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


# -- the routes' declared contract (read by agent.http.openapi: one source of truth) ---------------------

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
    also: tuple[tuple[int, bool, str], ...] = ()  # other answers: (status, carries `answer`, when)


def takes(
    body: type[M] | None,
    *,
    answer: type[BaseModel] | None = None,
    status: int | None = None,
    content_type: str = "application/json",
    also: tuple[tuple[int, bool, str], ...] = (),
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
        doc = ApiDoc(
            body=body, answer=answer, status=code, content_type=content_type, summary=_summary(fn), also=also
        )
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
    also: tuple[tuple[int, bool, str], ...] = (),
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
            also=also,
        )
        setattr(fn, API_DOC, doc)
        return fn

    return deco


def api_doc(handler: object) -> ApiDoc | None:
    return getattr(handler, API_DOC, None)


def _summary(fn: Callable[..., Any]) -> str:
    return (fn.__doc__ or fn.__name__.replace("_", " ")).strip().splitlines()[0]
