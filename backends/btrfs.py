"""``btrfs``: each quota scope is a subvolume ``<root>/<qsid>`` with its own qgroup.

The volume root is a plain directory on a btrfs mount. A scope's limit is the
``max referenced`` of its level-0 qgroup (``btrfs qgroup limit``), so a write
past it fails with EDQUOT. Its usage is the qgroup's referenced bytes: the
kernel keeps that up to date, so answering costs one command instead of a walk.
vfolders are directories inside the scope's subvolume, and so is the scope's
staging area (``<root>/<qsid>/.staging``): publishing a clone or an upload is a
rename within one subvolume. Clones reflink (FICLONE in :mod:`backends.copytree`).

Commands and output formats: ``../shared/BACKENDS.md`` (btrfs-progs 6.2).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from backends.base import Capability, HwInfo, PerfMetric, QuotaModel, ScopeUsage
from backends.blockdev import MountInfo, diskstats_rate, mount_of
from backends.errors import (
    ExternalError,
    QuotaExceeded,
    QuotaScopeNotEmpty,
    QuotaScopeNotFound,
    UnsupportedOperation,
)
from backends.ids import VFolderID
from backends.process import CommandFailed, Completed, run
from backends.quotascoped import QuotaScopedVolume
from backends.walk import tree_usage

log = logging.getLogger(__name__)

SUBVOLUME_ROOT_INO = 256  # BTRFS_FIRST_FREE_OBJECTID: the inode number of every subvolume's root directory
_DEVICE_STAT = re.compile(r"^\[(?P<dev>[^\]]+)\]\.(?P<name>\w+)\s+(?P<value>\d+)\s*$")


@dataclass(frozen=True)
class Qgroup:
    qgroupid: str  # "<level>/<id>"
    referenced: int
    exclusive: int
    max_referenced: int | None  # None = no limit
    max_exclusive: int | None
    path: str | None


def _limit_field(value: str) -> int | None:
    return None if value == "none" else int(value)


def parse_qgroup_show(text: str) -> list[Qgroup]:
    """Rows of ``btrfs qgroup show -re --raw``: a header line, a dash line, then one qgroup a line.

    Both header styles are accepted (``Qgroupid Referenced Exclusive Max referenced Max exclusive Path``
    and the older ``qgroupid rfer excl max_rfer max_excl``); the first five columns are positional.
    """
    rows = []
    lines = text.splitlines()
    start = next((i + 1 for i, line in enumerate(lines) if line.strip().startswith("----")), None)
    if start is None or not lines[0].strip().lower().startswith("qgroupid"):
        raise ValueError(f"unexpected `btrfs qgroup show` output: {text[:200]!r}")
    for line in lines[start:]:
        fields = line.split(None, 5)
        if not fields:
            continue
        if len(fields) < 5 or "/" not in fields[0]:
            raise ValueError(f"unexpected `btrfs qgroup show` row: {line!r}")
        rows.append(
            Qgroup(
                qgroupid=fields[0],
                referenced=int(fields[1]),
                exclusive=int(fields[2]),
                max_referenced=_limit_field(fields[3]),
                max_exclusive=_limit_field(fields[4]),
                path=fields[5].strip() if len(fields) > 5 else None,
            )
        )
    return rows


def parse_device_stats(text: str) -> dict[str, dict[str, int]]:
    """``btrfs device stats``: ``[/dev/loop0].write_io_errs    0`` lines → {device: {counter: value}}."""
    out: dict[str, dict[str, int]] = {}
    for line in text.splitlines():
        m = _DEVICE_STAT.match(line.strip())
        if m:
            out.setdefault(m["dev"], {})[m["name"]] = int(m["value"])
    return out


def _scope_kind(path: Path) -> str | None:
    """``subvolume``, ``directory`` or None (missing, or not a directory: never followed)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISDIR(st.st_mode):
        return None
    return "subvolume" if st.st_ino == SUBVOLUME_ROOT_INO else "directory"


class BtrfsQuotaModel(QuotaModel):
    """Scope = subvolume + its level-0 qgroup ``0/<subvolume id>``."""

    def __init__(self, volume: BtrfsVolume) -> None:
        self.volume = volume

    def _not_found(self, qsid: str) -> QuotaScopeNotFound:
        return QuotaScopeNotFound(f"quota scope {qsid!r} does not exist on volume {self.volume.name!r}")

    async def _kind(self, qsid: str) -> str:
        kind = await asyncio.to_thread(_scope_kind, self.volume.scope_path(qsid))
        if kind is None:
            raise self._not_found(qsid)
        return kind

    async def create(self, qsid: str, limit_bytes: int | None) -> None:
        path = self.volume.scope_path(qsid)
        kind = await asyncio.to_thread(_scope_kind, path)
        if kind is not None:  # already there: creating it again only (re)applies the limit
            if limit_bytes is not None:
                await self.update(qsid, limit_bytes)
            return
        await self.volume.btrfs("subvolume", "create", str(path))
        if limit_bytes is None:
            return
        try:
            await self._limit(qsid, limit_bytes)
        except BaseException:
            await asyncio.to_thread(os.rmdir, path)  # nothing half-made: no scope without its limit
            raise

    async def _limit(self, qsid: str, limit_bytes: int | None) -> None:
        value = "none" if limit_bytes is None else str(limit_bytes)
        await self.volume.btrfs("qgroup", "limit", value, str(self.volume.scope_path(qsid)))

    async def qgroup(self, qsid: str) -> Qgroup | None:
        """The scope's level-0 qgroup (None for a scope that is a plain directory, e.g. adopted)."""
        if await self._kind(qsid) != "subvolume":
            return None
        argv = ["qgroup", "show", "-re", "--raw"]
        if self.volume.qgroup_sync:
            argv.append("--sync")  # flush dirty data so referenced bytes include what was just written
        done = await self.volume.btrfs(*argv, "-f", str(self.volume.scope_path(qsid)))
        try:
            rows = parse_qgroup_show(done.text)
        except ValueError as e:
            raise ExternalError(f"btrfs qgroup show for quota scope {qsid!r}: {e}") from None
        level0 = [r for r in rows if r.qgroupid.startswith("0/")]
        if len(level0) != 1:
            raise ExternalError(f"btrfs qgroup show found no qgroup of quota scope {qsid!r} (are quotas enabled?)")
        return level0[0]

    async def describe(self, qsid: str) -> ScopeUsage:
        group = await self.qgroup(qsid)
        if group is None:
            return ScopeUsage(used_bytes=None, limit_bytes=None)
        return ScopeUsage(used_bytes=group.referenced, limit_bytes=group.max_referenced)

    async def update(self, qsid: str, limit_bytes: int | None) -> None:
        if await self._kind(qsid) != "subvolume":
            if limit_bytes is None:
                return
            raise UnsupportedOperation(
                f"quota scope {qsid!r} on volume {self.volume.name!r} is a plain directory, not a btrfs "
                "subvolume, so it cannot have a limit; move its vfolders into a new scope"
            )
        await self._limit(qsid, limit_bytes)

    async def delete(self, qsid: str) -> None:
        """rmdir of an empty subvolume (Linux >= 4.18) checks emptiness atomically, unlike ``subvolume delete``."""
        kind = await self._kind(qsid)
        path = self.volume.scope_path(qsid)
        subvol_id = await self.volume.subvolume_id(path) if kind == "subvolume" else None
        await asyncio.to_thread(_rmdir_scope, self.volume, qsid)
        if subvol_id is not None:
            await self._drop_qgroup(qsid, subvol_id)

    async def _drop_qgroup(self, qsid: str, subvol_id: int) -> None:
        """Wait for the cleaner to drop the subvolume, then destroy its qgroup (newer kernels do it themselves)."""
        root = str(self.volume.root)
        try:
            await self.volume.btrfs("filesystem", "sync", root)  # commit now: the cleaner runs after a commit
            await self.volume.btrfs("subvolume", "sync", root, str(subvol_id), timeout=120)
            done = await self.volume.btrfs("qgroup", "destroy", f"0/{subvol_id}", root, check=False)
        except CommandFailed as e:
            log.warning("quota scope %s: qgroup 0/%d left stale: %s", qsid, subvol_id, e)
            return
        if done.returncode != 0 and b"No such file" not in done.stderr:
            log.warning("quota scope %s: qgroup 0/%d left stale: %s", qsid, subvol_id, done.stderr.decode().strip())


def _rmdir_scope(volume: QuotaScopedVolume, qsid: str) -> None:
    path = volume.prepare_scope_removal(qsid)
    try:
        os.rmdir(path)
    except OSError as e:
        if e.errno == errno.ENOTEMPTY:
            raise QuotaScopeNotEmpty(f"quota scope {qsid!r} still holds vfolders; delete them first") from None
        raise


class BtrfsVolume(QuotaScopedVolume):
    """Options: ``btrfs_cmd`` (argv prefix, default ``["btrfs"]``), ``qgroup_sync`` (default true:
    sync before reading qgroups so usage includes writes not yet committed)."""

    backend = "btrfs"
    capabilities = frozenset({Capability.VFOLDER, Capability.QUOTA, Capability.METRIC})

    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003 - same as Volume
        super().__init__(*args, **kwargs)
        cmd = self.options.get("btrfs_cmd", ["btrfs"])
        self.btrfs_cmd: list[str] = [cmd] if isinstance(cmd, str) else list(cmd)
        self.qgroup_sync = bool(self.options.get("qgroup_sync", True))
        self._quota = BtrfsQuotaModel(self)
        self.mount: MountInfo | None = None

    @property
    def quota(self) -> BtrfsQuotaModel:
        return self._quota

    async def btrfs(self, *args: str, timeout: float = 60.0, check: bool = True) -> Completed:
        return await run([*self.btrfs_cmd, *args], timeout=timeout, check=check)

    async def subvolume_id(self, path: Path) -> int:
        done = await self.btrfs("inspect-internal", "rootid", str(path))
        return int(done.text.strip())

    def _mount_problem(self) -> str | None:
        if self.mount is None:
            return f"volume root {self.root} is not on any mount"
        if self.mount.fstype != "btrfs":
            return f"volume root {self.root} is on {self.mount.fstype} ({self.mount.mount_point}), not btrfs"
        return None

    async def init(self) -> None:
        if not await asyncio.to_thread(self.root.is_dir):  # off the loop: the mount may hang
            return  # the agent reports the missing root
        self.mount = await asyncio.to_thread(mount_of, self.root)
        problem = self._mount_problem()
        if problem:
            log.error("volume %s: %s", self.name, problem)
            return
        try:
            done = await self.btrfs("qgroup", "show", "--raw", str(self.root), check=False)
        except CommandFailed as e:  # btrfs-progs missing: quota scopes will fail with this message
            log.error("volume %s: %s (install btrfs-progs)", self.name, e)
            return
        if done.returncode == 0:
            return
        if b"not enabled" in done.stderr:
            await self.btrfs("quota", "enable", str(self.root))
            log.warning(
                "volume %s: btrfs quotas were not enabled on %s; enabled them (a qgroup rescan runs in the background)",
                self.name,
                self.mount.mount_point if self.mount else self.root,
            )
        else:
            log.error("volume %s: btrfs qgroup show failed: %s", self.name, done.stderr.decode().strip())

    # -- clone: reflinks, with the destination scope's limit checked first ------

    def clone_space_needed(self, src: VFolderID) -> int:
        """Reflinked extents are shared: the volume needs no room for the data (the scope check is below)."""
        return 0

    async def clone_vfolder(self, src: VFolderID, dst: VFolderID, *, work: str | None = None) -> None:
        if src.qsid != dst.qsid:
            # A reflink into another subvolume adds the whole source to that scope's referenced bytes, but the
            # kernel charges it only at commit, after the clone "succeeded"; so check the headroom up front.
            # (Within one scope a reflink adds nothing: the extents are referenced by that subvolume already.)
            group = await self.quota.qgroup(dst.qsid)
            if group is not None and group.max_referenced is not None:
                with self.open_vfolder(src):
                    pass
                need = (await asyncio.to_thread(tree_usage, self.vfolder_path(src))).allocated_bytes
                room = max(0, group.max_referenced - group.referenced)
                if need > room:
                    raise QuotaExceeded(
                        f"clone of {src} would exceed the limit of quota scope {dst.qsid!r}: needs {need} bytes, "
                        f"{room} of its {group.max_referenced} bytes left"
                    )
        await super().clone_vfolder(src, dst, work=work)

    # -- health and metrics -----------------------------------------------------

    async def device_stats(self) -> dict[str, dict[str, int]]:
        return parse_device_stats((await self.btrfs("device", "stats", str(self.root))).text)

    async def hwinfo(self) -> HwInfo:
        base = await super().hwinfo()
        meta = dict(base.metadata)
        if base.status == "unavailable":
            return base
        self.mount = await asyncio.to_thread(mount_of, self.root)
        problem = self._mount_problem()
        if problem:
            return HwInfo("unavailable", problem, meta)
        assert self.mount is not None  # _mount_problem says so otherwise
        meta.update(mount_point=self.mount.mount_point, device=self.mount.source)
        try:
            stats = await self.device_stats()
        except CommandFailed as e:
            return HwInfo("degraded", f"btrfs device stats failed: {e}", meta)
        meta["devices"] = ",".join(sorted(stats))
        errors = [f"{dev} {name}={n}" for dev, counters in sorted(stats.items()) for name, n in counters.items() if n]
        if errors:
            return HwInfo("degraded", "btrfs device errors: " + ", ".join(errors), meta)
        return HwInfo(base.status, base.status_info, meta)

    async def performance_metric(self) -> PerfMetric:
        devices: Sequence[str] = []
        try:
            devices = list(await self.device_stats())
        except CommandFailed:
            pass
        if not devices:
            self.mount = await asyncio.to_thread(mount_of, self.root)
            devices = [self.mount.source] if self.mount else []
        if not devices:
            raise UnsupportedOperation(f"volume {self.name!r}: no block device found for {self.root}")
        return await diskstats_rate(list(devices))
