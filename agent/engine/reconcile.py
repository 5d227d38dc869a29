"""Start-up reconciliation of the catalogue with what is on disk.

A vfolder directory on disk that the catalogue does not know is adopted; one
the catalogue knows but that is gone from disk is marked missing (and logged),
never silently forgotten -- unless its tree is found in the scope's staging
area as the trash of a delete the restart interrupted (same inode as the root
the last usage scan recorded): that delete is finished instead. Leftovers of
interrupted work (clone and trash directories under a scope's staging area,
jobs still marked running) are cleaned up; a clone whose destination was
already published when the agent stopped is recorded as done, and so is a
delete whose job names the vfolder's incarnation and whose tree was moved aside.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass, field

from backends.base import Volume
from backends.mounted import STAGING, MountedVolume
from backends.rmtree import remove_tree
from catalog import Catalog

log = logging.getLogger(__name__)


@dataclass
class Report:
    adopted_scopes: list[str] = field(default_factory=list)
    adopted_vfolders: list[str] = field(default_factory=list)
    missing_scopes: list[str] = field(default_factory=list)
    missing_vfolders: list[str] = field(default_factory=list)
    swept: list[str] = field(default_factory=list)
    finished_deletes: list[str] = field(default_factory=list)
    finished_clones: list[str] = field(default_factory=list)


def _trash_inodes(vol: MountedVolume, qsid: str) -> set[int]:
    """Inodes of the trees interrupted deletes left in a scope's staging area (``trash-*``)."""
    staging = vol.staging_path(qsid)
    found = set()
    try:
        with os.scandir(staging) as it:
            for e in it:
                if e.name.startswith("trash-") and e.is_dir(follow_symlinks=False):
                    found.add(e.stat(follow_symlinks=False).st_ino)
    except (FileNotFoundError, NotADirectoryError):
        pass
    return found


def _sweep_staging(vol: MountedVolume, qsid: str, keep: set[str]) -> list[str]:
    staging = vol.staging_path(qsid)
    swept: list[str] = []
    if not staging.is_dir():
        return swept
    for entry in staging.iterdir():
        if entry.name in keep:
            continue
        remove_tree(entry, ignore_errors=True)
        swept.append(f"{qsid}/{STAGING}/{entry.name}")
    try:
        staging.rmdir()
    except OSError:
        pass
    return swept


async def reconcile(
    catalog: Catalog, vol: Volume, *, keep_staged: set[str] | None = None, sweep: bool = True
) -> Report:
    """``sweep=False`` (an engine restarted beside live HTTP workers, with a new catalogue file): only what is
    on disk is adopted; staged trees, trash and running jobs may be a live worker's and are left alone."""
    report = Report()
    on_disk_scopes = await asyncio.to_thread(vol.scopes_on_disk)
    known_scopes = {s.qsid: s for s in await catalog.quota_scopes(vol.name)}
    for qsid in on_disk_scopes:
        if await catalog.adopt_quota_scope(vol.name, qsid):
            report.adopted_scopes.append(qsid)
    for qsid, row in known_scopes.items():
        if qsid not in on_disk_scopes and row.state != "missing":
            await catalog.mark_quota_scope_missing(vol.name, qsid)
            report.missing_scopes.append(qsid)

    known_vfolders = {f"{r.qsid}/{r.folder_id}": r for r in await catalog.vfolders(vol.name)}
    on_disk: set[str] = set()
    for qsid in on_disk_scopes:
        for vfid in await asyncio.to_thread(vol.vfolders_on_disk, qsid):
            on_disk.add(str(vfid))
            if await catalog.add_vfolder(vol.name, vfid.qsid, vfid.hex):
                report.adopted_vfolders.append(str(vfid))
        if isinstance(vol, MountedVolume) and sweep:
            trash = await asyncio.to_thread(_trash_inodes, vol, qsid)
            if trash:
                gone = {r.folder_id for k, r in known_vfolders.items() if r.qsid == qsid and k not in on_disk}
                roots = await catalog.vfolder_root_inodes(vol.name, qsid)
                for folder_id in sorted(gone):
                    if roots.get(folder_id) in trash:
                        await catalog.remove_vfolder(vol.name, qsid, folder_id)
                        report.finished_deletes.append(f"{qsid}/{folder_id}")
            report.swept += await asyncio.to_thread(_sweep_staging, vol, qsid, keep_staged or set())
    for key, vrow in known_vfolders.items():
        if key not in on_disk and vrow.state != "missing" and key not in report.finished_deletes:
            await catalog.mark_vfolder_missing(vol.name, vrow.qsid, vrow.folder_id)
            report.missing_vfolders.append(key)

    for job in await catalog.running_jobs() if sweep else []:
        if job.volume != vol.name:
            continue
        dst = job.params.get("dst") if job.kind in ("clone", "delete") else None
        if job.kind == "clone" and dst in on_disk:  # published before the stop: only the bookkeeping was left
            await catalog.finish_job(job.id)
            report.finished_clones.append(f"{job.params.get('src')} -> {dst}")
        elif job.kind == "delete" and isinstance(dst, str) and dst not in on_disk:  # moved aside: it happened
            qsid, _, folder_id = dst.partition("/")
            vf = await catalog.get_vfolder(vol.name, qsid, folder_id)
            if vf is not None and vf.incarnation == job.params.get("incarnation"):
                await catalog.remove_vfolder(vol.name, qsid, folder_id)  # its trash went with the sweep above
                report.missing_vfolders = [k for k in report.missing_vfolders if k != dst]
                report.finished_deletes.append(dst)
            await catalog.finish_job(job.id)
        elif job.kind == "delete":
            await catalog.finish_job(job.id, error="interrupted by an agent restart before the tree was moved "
                                                   "aside; the vfolder is kept")
        elif job.kind == "usage-rescan":  # the usage engine starts a new one; nothing was staged
            await catalog.finish_job(job.id, error="interrupted by an agent restart; a new rescan was started")
        else:
            await catalog.finish_job(job.id, error="interrupted by an agent restart; staged work was removed")

    if report.adopted_scopes or report.adopted_vfolders:
        log.info(
            "volume %s: adopted %d quota scope(s) and %d vfolder(s) found on disk",
            vol.name,
            len(report.adopted_scopes),
            len(report.adopted_vfolders),
        )
    for key in report.missing_scopes:
        log.warning("volume %s: quota scope %s is in the catalogue but gone from disk; marked missing", vol.name, key)
    for key in report.missing_vfolders:
        log.warning("volume %s: vfolder %s is in the catalogue but gone from disk; marked missing", vol.name, key)
    for key in report.finished_deletes:
        log.info("volume %s: the delete of vfolder %s was interrupted by the restart; finished it", vol.name, key)
    for what in report.finished_clones:
        log.info("volume %s: clone %s was complete on disk when the agent stopped; recorded it", vol.name, what)
    if report.swept:
        log.info(
            "volume %s: removed %d leftover(s) of interrupted work: %s",
            vol.name,
            len(report.swept),
            ", ".join(report.swept),
        )
    return report
