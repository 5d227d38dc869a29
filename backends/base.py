"""The one volume interface: capabilities, a quota model and a file-operation model.

Modelled on the upstream proxy's ``abc.py`` split. A volume object is built
once at start-up (:meth:`Volume.init`) and lives for the whole run.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from backends.errors import UnsupportedOperation
from backends.ids import VFolderID
from backends.resolver import VFolderRoot
from backends.walk import TreeUsage


class Capability(enum.StrEnum):
    VFOLDER = "vfolder"
    QUOTA = "quota"
    METRIC = "metric"
    FAST_FS_SIZE = "fast-fs-size"
    FAST_SCAN = "fast-scan"
    FAST_SIZE = "fast-size"


@dataclass(frozen=True)
class FSUsage:
    capacity_bytes: int
    used_bytes: int


@dataclass(frozen=True)
class ScopeUsage:
    """What a backend knows of a quota scope; ``None`` = it does not know (the agent fills in)."""

    used_bytes: int | None
    limit_bytes: int | None


@dataclass(frozen=True)
class HwInfo:
    status: str  # healthy | degraded | unavailable
    status_info: str | None
    metadata: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class PerfMetric:
    iops_read: int
    iops_write: int
    io_bytes_read: int
    io_bytes_write: int
    io_usec_read: float
    io_usec_write: float


class QuotaModel(ABC):
    """Quota scopes: one per user or project, the first directory level of a volume."""

    @abstractmethod
    async def create(self, qsid: str, limit_bytes: int | None) -> None: ...

    @abstractmethod
    async def describe(self, qsid: str) -> ScopeUsage: ...

    @abstractmethod
    async def update(self, qsid: str, limit_bytes: int | None) -> None: ...

    @abstractmethod
    async def delete(self, qsid: str) -> None: ...


class Volume(ABC):
    """One configured volume. File operations inside a vfolder go through :meth:`open_vfolder`."""

    backend: ClassVar[str]
    capabilities: ClassVar[frozenset[Capability]]

    def __init__(self, name: str, root: Path, options: Mapping[str, Any]) -> None:
        self.name = name
        self.root = root
        self.options = dict(options)

    @property
    @abstractmethod
    def quota(self) -> QuotaModel: ...

    async def init(self) -> None:
        """Check the volume and prepare it; called once at start-up."""

    async def shutdown(self) -> None:
        """Release what :meth:`init` acquired."""

    @property
    def fsprefix(self) -> str:
        return ""

    @abstractmethod
    def layout_version(self) -> int | None:
        """The on-disk layout version (``version.txt``), or None when it has none."""

    @abstractmethod
    def vfolder_path(self, vfid: VFolderID) -> Path: ...

    @abstractmethod
    def open_vfolder(self, vfid: VFolderID) -> VFolderRoot:
        """Open an existing vfolder's root (raises VFolderNotFound)."""

    @abstractmethod
    async def create_vfolder(self, vfid: VFolderID) -> None: ...

    @abstractmethod
    async def delete_vfolder(self, vfid: VFolderID, *, work: str | None = None) -> None:
        """``work``: the name of the trash directory the tree is moved to in the scope's staging area (the caller
        records it with its job, so the engine can finish a delete whose process died mid-removal)."""

    @abstractmethod
    async def clone_vfolder(self, src: VFolderID, dst: VFolderID, *, work: str | None = None) -> None: ...

    @abstractmethod
    async def tree_usage(self, vfid: VFolderID) -> TreeUsage:
        """Walk the vfolder (off the event loop) and count it."""

    async def fast_usage(self, vfid: VFolderID) -> TreeUsage | None:
        """The backend's own figure for a vfolder, where it has one (``fast-size``)."""
        return None

    @abstractmethod
    async def fs_usage(self) -> FSUsage: ...

    @abstractmethod
    async def hwinfo(self) -> HwInfo: ...

    async def performance_metric(self) -> PerfMetric:
        raise UnsupportedOperation(f"volume {self.name!r} ({self.backend}) has no performance metrics")

    @abstractmethod
    def scopes_on_disk(self) -> list[str]:
        """Quota scope ids present on disk (for reconciliation)."""

    @abstractmethod
    def vfolders_on_disk(self, qsid: str) -> list[VFolderID]:
        """vfolders present on disk in one scope (for reconciliation)."""
