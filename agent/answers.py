"""The JSON answers of the API as pydantic models: what the OpenAPI document says each route returns.

Handlers build their answers as dicts; ``tests/test_api_contract.py`` checks real answers against these
models through the document, so they cannot drift apart silently.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from backends.base import PerfMetric


class Answer(BaseModel):
    model_config = ConfigDict(extra="allow")


class StatusOk(Answer):
    status: Literal["ok"]


class VolumeInfo(Answer):
    name: str
    backend: str
    path: str
    fsprefix: str
    capabilities: list[str]
    status: Literal["serving", "unavailable"]
    status_info: str | None


class Volumes(Answer):
    volumes: list[VolumeInfo]


class HwInfoAnswer(Answer):
    status: Literal["healthy", "degraded", "unavailable"]
    status_info: str | None
    metadata: dict[str, str]


class PerfMetricAnswer(Answer):
    metric: PerfMetric  # the backend's own dataclass: one definition of the figures


class FsUsage(Answer):
    capacity_bytes: int
    used_bytes: int


class ScopeUsage(Answer):
    used_bytes: int = Field(description="-1 when not known")
    limit_bytes: int = Field(description="-1 when the scope has no limit")


class MountAnswer(Answer):
    path: str


class MetadataAnswer(Answer):
    status: Literal["ok"]
    payload: str | None


class FolderUsage(Answer):
    file_count: int
    used_bytes: int
    measured_at: float | None
    source: str
    stale: bool
    pending: bool


class UsedBytes(Answer):
    used_bytes: int
    measured_at: float | None
    source: str
    stale: bool
    pending: bool


class EntryStat(Answer):
    mode: int
    size: int
    created: str
    modified: str


class DirEntry(Answer):
    name: str
    type: str
    stat: EntryStat
    symlink_target: str | None


class Listing(Answer):
    items: list[DirEntry]


class TokenAnswer(Answer):
    token: str


class Problem(Answer):
    """Every error answer: ``msg`` names the problem; ``type``/``title`` for typed problems (problem+json)."""

    msg: str
    type: str | None = None
    title: str | None = None
    request_id: str | None = None
    data: dict[str, Any] | None = None
    paths: list[str] | None = None
    errno: int | None = None
