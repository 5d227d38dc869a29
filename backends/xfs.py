"""``xfs``: each quota scope is a directory that is an XFS project with a block limit.

Project ids live in the projid/projects files (:mod:`backends.projectfiles`,
paths configurable: ``projects_file``, ``projid_file``) and every
``xfs_quota`` call names them with ``-D`` / ``-P``, so the files the agent
keeps are exactly the ones xfs_quota reads. Usage of a scope comes from the
project report (``report -p -b -N``, KiB), a ``fast`` answer with no walk.

Options: ``xfs_quota_cmd`` (argv prefix, default ``["xfs_quota"]``; upstream
used ``sudo``), ``projects_file`` (``/etc/projects``), ``projid_file``
(``/etc/projid``), ``mount_point`` (default: the mount holding the volume root).
Commands and formats: ``../shared/BACKENDS.md``.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from backends.base import Capability, HwInfo, PerfMetric, ScopeUsage
from backends.blockdev import MountInfo, diskstats_rate, mount_of
from backends.errors import ExternalError, UnsupportedOperation, VolumeUnavailable
from backends.process import Completed, run
from backends.projectfiles import ProjectFiles
from backends.quotascoped import QuotaScopedVolume
from backends.vfs import DirectoryQuotaModel

log = logging.getLogger(__name__)
PROJECT_QUOTA_OPTIONS = {"prjquota", "pquota", "pqnoenforce"}


@dataclass(frozen=True)
class ProjectReport:
    name: str  # project name, or "#<id>" when it has none
    used_bytes: int
    soft_bytes: int
    hard_bytes: int


def parse_project_report(text: str) -> list[ProjectReport]:
    """``xfs_quota -x -c "report -p -b -N"``: ``<name|#id> used soft hard warn grace`` in KiB.

    Only the first four fields are read: an active grace period prints as ``[6 days]`` (two tokens).
    """
    rows = []
    for line in text.splitlines():
        fields = line.split()
        if not fields:
            continue
        if len(fields) < 6 or not all(f.isdigit() for f in fields[1:4]):
            raise ValueError(f"unexpected xfs_quota report row: {line!r}")
        rows.append(ProjectReport(fields[0], int(fields[1]) * 1024, int(fields[2]) * 1024, int(fields[3]) * 1024))
    return rows


class XfsQuotaModel(DirectoryQuotaModel):
    volume: XfsVolume

    async def create(self, qsid: str, limit_bytes: int | None) -> None:
        path = self.volume.scope_path(qsid)
        made = not await asyncio.to_thread(os.path.lexists, path)
        await super().create(qsid, limit_bytes)
        pid = await asyncio.to_thread(self.volume.files.id_of, qsid)
        if not made and pid is not None:  # already a project: creating it again only (re)applies a limit asked for
            if limit_bytes is not None:
                await self._limit(pid, limit_bytes)
            return
        try:
            await self._set_up(qsid, limit_bytes)
        except BaseException:
            if made:  # nothing half-made: no scope directory without its project
                await asyncio.to_thread(self.volume.files.remove, qsid)
                await asyncio.to_thread(_rmdir_quietly, path)
            raise

    # Commands name the project by its id: xfs_quota reads an all-digit name (a valid qsid) as an id.

    async def _set_up(self, qsid: str, limit_bytes: int | None) -> None:
        pid = await asyncio.to_thread(self.volume.files.add, qsid, str(self.volume.scope_path(qsid)))
        await self.volume.xfs_quota(f"project -s {pid}")
        await self._limit(pid, limit_bytes)

    async def _limit(self, pid: int, limit_bytes: int | None) -> None:
        n = limit_bytes or 0  # 0 = no limit
        await self.volume.xfs_quota(f"limit -p bsoft={n} bhard={n} {pid}")

    async def report(self) -> list[ProjectReport]:
        done = await self.volume.xfs_quota("report -p -b -N")
        try:
            return parse_project_report(done.text)
        except ValueError as e:
            raise ExternalError(f"xfs_quota report on {self.volume.mount_point}: {e}") from None

    async def describe(self, qsid: str) -> ScopeUsage:
        await super().describe(qsid)  # raises QuotaScopeNotFound
        pid = await asyncio.to_thread(self.volume.files.id_of, qsid)
        if pid is None:  # a plain directory (e.g. adopted): not a project
            return ScopeUsage(used_bytes=None, limit_bytes=None)
        for row in await self.report():
            if row.name in (qsid, f"#{pid}"):
                return ScopeUsage(row.used_bytes, row.hard_bytes or None)
        return ScopeUsage(used_bytes=0, limit_bytes=None)  # no dquot yet: nothing charged, no limit

    async def update(self, qsid: str, limit_bytes: int | None) -> None:
        await super().update(qsid, limit_bytes)  # raises QuotaScopeNotFound
        pid = await asyncio.to_thread(self.volume.files.id_of, qsid)
        if pid is None:
            await self._set_up(qsid, limit_bytes)  # adopt a plain directory as a project
        else:
            await self._limit(pid, limit_bytes)

    async def delete(self, qsid: str) -> None:
        await super().delete(qsid)  # 409 unless empty; removes the directory
        pid = await asyncio.to_thread(self.volume.files.id_of, qsid)
        if pid is not None:
            await self._limit(pid, None)  # so a later project reusing the id starts unlimited
            await asyncio.to_thread(self.volume.files.remove, qsid)


def _rmdir_quietly(path: Path) -> None:
    try:
        os.rmdir(path)
    except OSError:
        pass


class XfsVolume(QuotaScopedVolume):
    backend = "xfs"
    capabilities = frozenset({Capability.VFOLDER, Capability.QUOTA, Capability.METRIC})

    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003 - same as Volume
        super().__init__(*args, **kwargs)
        cmd = self.options.get("xfs_quota_cmd", ["xfs_quota"])
        self.xfs_quota_cmd: list[str] = [cmd] if isinstance(cmd, str) else list(cmd)
        self.files = ProjectFiles(
            Path(self.options.get("projects_file", "/etc/projects")),
            Path(self.options.get("projid_file", "/etc/projid")),
        )
        self._mount_point: str | None = self.options.get("mount_point")
        self.mount: MountInfo | None = None
        self._quota = XfsQuotaModel(self)

    @property
    def quota(self) -> XfsQuotaModel:
        return self._quota

    @property
    def mount_point(self) -> str:
        if self._mount_point is None:
            self.mount = mount_of(self.root)
            if self.mount is None:
                raise VolumeUnavailable(f"volume {self.name!r}: {self.root} is not on any mount")
            self._mount_point = self.mount.mount_point
        return self._mount_point

    async def xfs_quota(self, command: str) -> Completed:
        files = self.files
        argv = [*self.xfs_quota_cmd, "-x", "-D", str(files.projects), "-P", str(files.projid), "-c", command]
        done = await run([*argv, self.mount_point], timeout=120)
        if done.stderr.strip():  # xfs_quota exits 0 after most failures ("foreign filesystem", EPERM, ...)
            err = done.stderr.decode(errors="replace").strip()
            raise ExternalError(f"xfs_quota -c {command!r} on {self.mount_point} failed: {err}")
        return done

    def _mount_problem(self) -> str | None:
        self.mount = mount_of(self.root)
        if self.mount is None:
            return f"volume root {self.root} is not on any mount"
        if self.mount.fstype != "xfs":
            return f"volume root {self.root} is on {self.mount.fstype} ({self.mount.mount_point}), not XFS"
        if not self.mount.options & PROJECT_QUOTA_OPTIONS:
            return f"XFS at {self.mount.mount_point} is not mounted with project quotas (mount -o prjquota)"
        return None

    async def init(self) -> None:
        if not await asyncio.to_thread(self.root.is_dir):  # off the loop: the mount may hang
            return
        problem = await asyncio.to_thread(self._mount_problem)
        if problem:
            log.error("volume %s: %s; quota limits will not be enforced", self.name, problem)

    async def hwinfo(self) -> HwInfo:
        base = await super().hwinfo()
        if base.status == "unavailable":
            return base
        meta = dict(base.metadata, projects_file=str(self.files.projects), projid_file=str(self.files.projid))
        problem = await asyncio.to_thread(self._mount_problem)
        if problem:
            return HwInfo("degraded", problem, meta)
        assert self.mount is not None
        meta.update(mount_point=self.mount.mount_point, device=self.mount.source)
        return HwInfo(base.status, base.status_info, meta)

    async def performance_metric(self) -> PerfMetric:
        self.mount = await asyncio.to_thread(mount_of, self.root)
        if self.mount is None or not self.mount.source.startswith("/dev/"):
            raise UnsupportedOperation(f"volume {self.name!r}: no block device found for {self.root}")
        return await diskstats_rate([self.mount.source])
