"""Request parameters: the manager's JSON body (even on GET) checked against pydantic models."""

from __future__ import annotations

import json
from typing import Annotated, Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictInt, ValidationError

from agent.errors import invalid_params, malformed
from backends.ids import VFolderID, parse_qsid

M = TypeVar("M", bound=BaseModel)

MAX_METADATA = 10 * 2**20


def _vfid(value: object) -> VFolderID:
    if isinstance(value, VFolderID):
        return value
    return VFolderID.parse(value)


VFID = Annotated[VFolderID, BeforeValidator(_vfid)]
QSID = Annotated[str, BeforeValidator(parse_qsid)]
RelPath = Annotated[str, Field(max_length=4096)]


class Params(BaseModel):
    model_config = ConfigDict(extra="ignore", arbitrary_types_allowed=True, frozen=True)


class VolumeParams(Params):
    volume: str


class VFolderParams(VolumeParams):
    vfid: VFID


class QuotaOptions(Params):
    limit_bytes: StrictInt | None = Field(default=None, ge=-1)


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
    size_bytes: StrictInt | None = None


class MkdirParams(VFolderParams):
    relpath: RelPath
    parents: StrictBool = True
    exist_ok: StrictBool = False


class RelPathParams(VFolderParams):
    relpath: RelPath


class RenameParams(RelPathParams):
    new_name: Annotated[str, Field(min_length=1, max_length=255)]
    is_dir: Any = None


class MoveParams(VFolderParams):
    src_relpath: RelPath
    dst_relpath: RelPath


class DownloadParams(RelPathParams):
    archive: StrictBool = False
    unmanaged_path: str | None = None


class UploadParams(RelPathParams):
    size: StrictInt = Field(ge=0)


class DeleteFilesParams(VFolderParams):
    relpaths: Annotated[list[RelPath], Field(min_length=1)]
    recursive: StrictBool = False


async def read_body(request: web.Request) -> Any:
    """The request's JSON body, or None when it has none."""
    raw = await request.read()
    if not raw.strip():
        return None
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise malformed(f"request body is not valid JSON: {e}") from None


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
