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
    """Unknown usage or no limit: -1 for a bare scope id (23.03.5 contract), null for a typed one (as 23.03.7+)."""

    used_bytes: int | None = Field(description="-1 / null when not known")
    limit_bytes: int | None = Field(description="-1 / null when the scope has no limit")


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


class RefreshAccepted(Answer):
    """``POST /folder/usage/refresh`` (an extension of the contract): the rescan is under way."""

    status: Literal["accepted"]


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


class ItemResult(Answer):
    msg: str | None = Field(description="null on success; what went wrong otherwise")
    item: str = Field(description="the path as it was sent")


class ResultSet(Answer):
    success: list[ItemResult]
    failed: list[ItemResult]


class MkdirResults(Answer):
    """mkdir as 24.03+ proxies answer it: 200 every path made, 207 some, 422 none (then also ``msg``)."""

    results: ResultSet
    msg: str | None = None


class HealthCheck(Answer):
    service_group: str = Field(description="`volume`: one check per configured volume")
    component_id: str = Field(description="the volume's name")
    is_healthy: bool = Field(description="the volume is served")
    last_checked_at: str
    error_message: str | None = Field(description="why the volume is not served")


class Connectivity(Answer):
    overall_healthy: bool
    connectivity_checks: list[HealthCheck]
    timestamp: str


class Health(Answer):
    """The shape of upstream's /health, /livez and /readyz (26.4+; status, version and component since 25.15)."""

    status: Literal["ok", "degraded", "error"]
    version: str
    component: Literal["storage-proxy"]
    connectivity: Connectivity


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
