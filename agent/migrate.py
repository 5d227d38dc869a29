"""Layout-2 -> 3 migration: ``<root>/aa/bb/rest`` becomes ``<root>/<qsid>/aa/bb/rest``, by renames only.

Crash safety comes from the catalogue journal (:mod:`catalog.layout_moves`):
each batch's intent is committed before its renames and marked done after, so
a run killed at any point (``kill -9``) is resumed by the next one, which
checks both locations of every folder left in ``intent``. Renames use
``RENAME_NOREPLACE``: a folder is never moved onto another. ``version.txt`` is
written last (atomically), and only when no old-layout folder is left.

``--max-rate`` paces each rename (never a burst to catch up); the journal is
still written per batch, a batch being at most about one second of renames.
Only backends whose quota scope is a plain directory can be migrated so.
"""

from __future__ import annotations

import asyncio
import csv
import errno
import fcntl
import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from backends.ids import is_hex_part, parse_folder_id, scope_dir
from backends.layout import LAYOUT_VERSION, read_version, write_version
from backends.resolver import rename_noreplace
from catalog import Catalog
from catalog.layout_moves import LayoutMoves

log = logging.getLogger(__name__)

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

Progress = Callable[[int, int], None]


class MigrationError(Exception):
    """The migration cannot start: bad mapping, wrong layout, unsupported backend, another run in progress."""


# Backends whose quota scope is more than a directory. migrate makes each scope with mkdir and renames folders
# into it: there the scope would carry no quota, and a rename into a real scope fails (EXDEV).
UNMOVABLE_BACKENDS = {
    "btrfs": "a quota scope is a btrfs subvolume with its own qgroup, and a rename cannot cross subvolumes",
    "xfs": "a quota scope is a directory tree with its own XFS project quota, and a rename cannot cross projects",
    "gpfs": "a quota scope is a Storage Scale fileset, and a rename cannot cross filesets",
    "netapp": "a quota scope is an ONTAP qtree, and a rename cannot cross qtrees",
}
UNMOVABLE_BACKENDS["spectrumscale"] = UNMOVABLE_BACKENDS["gpfs"]


def refuse_unmovable_backend(volume: str, backend: str) -> None:
    """Checked before anything is read or moved: on these backends a finished run would leave scopes without quota."""
    reason = UNMOVABLE_BACKENDS.get(backend)
    if reason is not None:
        raise MigrationError(
            f"volume {volume!r} has backend {backend!r}, which migrate cannot handle: {reason}; renaming "
            "folders into plain directories would leave every scope without its quota. Nothing was moved"
        )


@dataclass
class Report:
    volume: str
    root: str
    found: int = 0  # old-layout folders on disk at the start of this run
    planned: int = 0  # of those, mapped and free to move
    moved: int = 0  # renamed by this run
    recovered: int = 0  # renamed by an interrupted run, confirmed and recorded by this one
    unmapped: list[str] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    dry_run: bool = False
    already_migrated: bool = False
    version_written: bool = False
    job_id: str | None = None
    seconds: float = 0.0

    @property
    def complete(self) -> bool:
        return self.already_migrated or self.version_written or (
            self.dry_run and not (self.unmapped or self.conflicts or self.failed)
        )


# -- the mapping --------------------------------------------------------------


def normalize_qsid(value: str) -> str:
    """The on-disk quota scope name for a mapping value (``user:<uuid>`` -> the UUID's hex, as the manager
    stores typed scopes; see :mod:`backends.ids`)."""
    return scope_dir(value.strip())


def _add(mapping: dict[str, str], errors: list[str], where: str, fid: str, qsid: str) -> None:
    try:
        key = parse_folder_id(fid.strip()).hex
        mapping[key] = normalize_qsid(qsid)
    except ValueError as e:
        errors.append(f"{where}: {e}")


def _raise_if(errors: list[str], source: str) -> None:
    if errors:
        shown = "; ".join(errors[:5]) + (f"; and {len(errors) - 5} more" if len(errors) > 5 else "")
        raise MigrationError(f"{source}: {len(errors)} bad mapping row(s): {shown}")


def mapping_from_csv(path: Path) -> dict[str, str]:
    """``folder_id,qsid`` rows; a header row and blank lines are allowed."""
    mapping: dict[str, str] = {}
    errors: list[str] = []
    try:
        with open(path, newline="") as f:
            for lineno, row in enumerate(csv.reader(f), 1):
                if not row or all(not c.strip() for c in row):
                    continue
                if lineno == 1 and row[0].strip().lower() in ("folder_id", "id", "vfolder_id"):
                    continue
                if len(row) != 2:
                    errors.append(f"line {lineno}: expected 'folder_id,qsid', got {len(row)} field(s)")
                    continue
                if not row[1].strip():
                    continue  # a folder without a quota scope (NULL in the manager's table): unmapped
                _add(mapping, errors, f"line {lineno}", row[0], row[1])
    except FileNotFoundError:
        raise MigrationError(f"{path}: no such file") from None
    _raise_if(errors, str(path))
    return mapping


def mapping_from_postgres(dsn: str) -> dict[str, str]:
    """The manager's ``vfolders`` table (``id``, ``quota_scope_id``), read in one query."""
    try:
        import psycopg
    except ImportError:
        raise MigrationError("--dsn needs psycopg: pip install 'storage-agent[postgres]'") from None
    mapping: dict[str, str] = {}
    errors: list[str] = []
    try:
        with psycopg.connect(dsn, connect_timeout=10) as conn:
            rows = conn.execute(
                "SELECT id::text, quota_scope_id::text FROM vfolders WHERE quota_scope_id IS NOT NULL"
            ).fetchall()
    except psycopg.Error as e:
        raise MigrationError(f"cannot read the manager's vfolders table: {str(e).strip()}") from None
    for fid, qsid in rows:
        _add(mapping, errors, f"vfolder {fid}", fid, qsid)
    _raise_if(errors, "vfolders table")
    return mapping


# -- the disk -----------------------------------------------------------------


def _subdirs(dir_fd: int, length: int) -> list[str]:
    """Subdirectories named like a piece of a folder id's ``aa/bb/rest`` split (``length`` hex digits)."""
    with os.scandir(dir_fd) as it:
        return sorted(e.name for e in it if is_hex_part(e.name, length) and e.is_dir(follow_symlinks=False))


def scan_old_layout(root_fd: int) -> list[str]:
    """Folder ids (32 hex) of every ``aa/bb/rest`` directory below the root."""
    found = []
    for a in _subdirs(root_fd, 2):
        a_fd = os.open(a, _DIR_FLAGS, dir_fd=root_fd)
        try:
            for b in _subdirs(a_fd, 2):
                b_fd = os.open(b, _DIR_FLAGS, dir_fd=a_fd)
                try:
                    found += [a + b + rest for rest in _subdirs(b_fd, 28)]
                finally:
                    os.close(b_fd)
        finally:
            os.close(a_fd)
    return found


def _old(fid: str) -> tuple[str, ...]:
    return (fid[0:2], fid[2:4], fid[4:])


def _new(fid: str, qsid: str) -> tuple[str, ...]:
    return (qsid, fid[0:2], fid[2:4], fid[4:])


def _exists(root_fd: int, parts: Iterable[str]) -> bool:
    try:
        os.stat(os.path.join(*parts), dir_fd=root_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    except NotADirectoryError:
        return False
    return True


class _Tree:
    """Opens (and creates) parent directories below the root without following symlinks."""

    def __init__(self, root_fd: int) -> None:
        self.root_fd = root_fd
        st = os.fstat(root_fd)
        # As root, new directories get the volume root's owner so the agent's own user can manage them.
        self.owner = (st.st_uid, st.st_gid) if os.geteuid() == 0 else None
        self._made: set[tuple[str, ...]] = set()  # directories this run created or found (skip mkdir)

    def open(self, parts: Iterable[str], *, create: bool) -> int:
        fd = os.dup(self.root_fd)
        path: tuple[str, ...] = ()
        try:
            for name in parts:
                path += (name,)
                if create and path not in self._made:
                    try:
                        os.mkdir(name, 0o755, dir_fd=fd)
                        if self.owner is not None:
                            os.chown(name, *self.owner, dir_fd=fd, follow_symlinks=False)
                    except FileExistsError:
                        pass
                    self._made.add(path)
                nfd = os.open(name, _DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = nfd
        except BaseException:
            os.close(fd)
            raise
        return fd

    def rename(self, fid: str, qsid: str) -> None:
        src = self.open(_old(fid)[:2], create=False)
        try:
            dst = self.open(_new(fid, qsid)[:3], create=True)
            try:
                rename_noreplace(src, fid[4:], dst, fid[4:])
            finally:
                os.close(dst)
        finally:
            os.close(src)

    def rmdir_if_empty(self, parts: tuple[str, ...]) -> None:
        try:
            os.rmdir(os.path.join(*parts), dir_fd=self.root_fd)
        except OSError:
            pass

    def write_version(self) -> None:
        write_version(self.root_fd, self.owner)


def _sweep_empty_prefixes(tree: _Tree) -> None:
    """Remove the old layout's empty ``aa/bb`` and ``aa`` directories (this run's and a killed run's)."""
    for a in _subdirs(tree.root_fd, 2):
        a_fd = os.open(a, _DIR_FLAGS, dir_fd=tree.root_fd)
        try:
            names = _subdirs(a_fd, 2)
        finally:
            os.close(a_fd)
        for b in names:
            tree.rmdir_if_empty((a, b))
        tree.rmdir_if_empty((a,))


# -- the run ------------------------------------------------------------------


async def _recover(tree: _Tree, moves: LayoutMoves | None, job_id: str | None, report: Report) -> set[str]:
    """Settle the folders a killed run left in ``intent``: done if only the new location exists.

    Returns the folders found in both locations (reported as conflicts, not to be planned again).
    A dry run without a catalogue has no journal to read.
    """
    blocked: set[str] = set()
    settled: list[tuple[str, str]] = []
    vanished: list[str] = []
    for row in await moves.intents() if moves is not None else []:
        at_old = _exists(tree.root_fd, _old(row.folder_id))
        at_new = _exists(tree.root_fd, _new(row.folder_id, row.qsid))
        if at_new and not at_old:
            settled.append((row.folder_id, row.qsid))
        elif at_new and at_old:
            report.conflicts.append(f"{row.folder_id}: present both in the old layout and under {row.qsid}/")
            blocked.add(row.folder_id)
        elif not at_new and not at_old:
            vanished.append(row.folder_id)
            report.failed.append(f"{row.folder_id}: gone from both locations (removed outside the migration?)")
        # only at the old location: the rename never happened; the scan below plans it again
    report.recovered = len(settled)
    if report.dry_run or moves is None:
        return blocked
    if settled:
        await moves.record_done(job_id or "", settled)
    await moves.forget_intent(vanished)
    return blocked


def _plan(root_fd: int, mapping: dict[str, str], blocked: set[str], report: Report) -> list[tuple[str, str]]:
    """The old-layout folders free to move, as ``(folder_id, qsid)``; the others are reported."""
    old_ids = [fid for fid in scan_old_layout(root_fd) if fid not in blocked]
    report.found = len(old_ids)
    plan: list[tuple[str, str]] = []
    for fid in old_ids:
        qsid = mapping.get(fid)
        if qsid is None:
            report.unmapped.append(fid)
        elif _exists(root_fd, _new(fid, qsid)):
            report.conflicts.append(f"{fid}: already exists under {qsid}/ and in the old layout")
        else:
            plan.append((fid, qsid))
    report.planned = len(plan)
    return plan


class _Pacer:
    """Spaces renames at least ``1/max_rate`` s apart, so a slow stretch is never made up by a burst."""

    def __init__(self, max_rate: float | None) -> None:
        self.interval = 1 / max_rate if max_rate else 0.0
        self.next = time.monotonic()

    async def wait(self) -> None:
        if not self.interval:
            return
        delay = self.next - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        self.next = time.monotonic() + self.interval


def _batch_size(batch_size: int, max_rate: float | None) -> int:
    """At most about one second of paced renames per journal batch, so the journal and the progress stay current."""
    return max(1, min(batch_size, int(max_rate))) if max_rate else batch_size


async def _move_batch(tree: _Tree, moves: LayoutMoves, job_id: str, chunk: list[tuple[str, str]], pacer: _Pacer,
                      report: Report) -> int:
    """Journal the batch's intent, rename folder by folder at the paced rate, journal what was done."""
    await moves.record_intent(job_id, chunk)
    renamed: list[tuple[str, str]] = []
    skipped: list[str] = []
    for fid, qsid in chunk:
        await pacer.wait()
        try:
            tree.rename(fid, qsid)
        except OSError as e:
            reason = "target exists" if e.errno == errno.EEXIST else (e.strerror or str(e))
            report.failed.append(f"{fid}: {reason}")
            skipped.append(fid)
            continue
        renamed.append((fid, qsid))
    done = await moves.record_done(job_id, renamed)
    await moves.forget_intent(skipped)
    report.moved += len(renamed)
    return done


async def _move_all(tree: _Tree, moves: LayoutMoves, catalog: Catalog, job_id: str, plan: list[tuple[str, str]],
                    report: Report, progress: Progress | None, batch_size: int, max_rate: float | None) -> None:
    done_before = await moves.job_done(job_id)
    total = done_before + len(plan)
    await catalog.update_job(job_id, total=total)
    if progress:
        progress(done_before, total)
    pacer = _Pacer(max_rate)
    size = _batch_size(batch_size, max_rate)
    for start in range(0, len(plan), size):
        done = await _move_batch(tree, moves, job_id, plan[start : start + size], pacer, report)
        if progress:
            progress(done, total)


async def _finish(tree: _Tree, catalog: Catalog, job_id: str, report: Report) -> None:
    """Write ``version.txt`` only when nothing is left in the old layout and nothing went wrong."""
    _sweep_empty_prefixes(tree)
    left = scan_old_layout(tree.root_fd)
    if left or report.unmapped or report.conflicts or report.failed:
        problems = len(report.unmapped) + len(report.conflicts) + len(report.failed)
        await catalog.finish_job(job_id, error=f"{len(left)} old-layout folder(s) left, {problems} problem(s)")
    else:
        tree.write_version()
        report.version_written = True
        await catalog.finish_job(job_id)


def _open_locked(root: Path) -> int:
    """The root's descriptor, locked against a concurrent run (a dry run takes the lock too: it reads a still tree)."""
    try:
        root_fd = os.open(root, _DIR_FLAGS)
    except FileNotFoundError:
        raise MigrationError(f"volume root {root} does not exist") from None
    try:
        fcntl.flock(root_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(root_fd)
        raise MigrationError(f"another migration of {root} is running") from None
    return root_fd


async def migrate(
    root: Path,
    volume: str,
    catalog: Catalog | None,
    mapping: dict[str, str],
    *,
    dry_run: bool = False,
    progress: Progress | None = None,
    batch_size: int = 256,
    max_rate: float | None = None,
) -> Report:
    """Migrate ``root`` to layout 3; see the module docstring. Never raises for a single folder.

    A dry run only reads: ``catalog`` is then opened read-only, or None when there is none yet.
    """
    started = time.monotonic()
    report = Report(volume=volume, root=str(root), dry_run=dry_run)
    version = read_version(root)
    if version == LAYOUT_VERSION:
        report.already_migrated = True
        return report
    if version not in (None, 2):
        raise MigrationError(f"{root}/version.txt says layout {version}: only layout 2 can be migrated")
    if catalog is None and not dry_run:
        raise ValueError("a migration needs the catalogue")
    root_fd = _open_locked(root)
    try:
        tree = _Tree(root_fd)
        moves = LayoutMoves(catalog, volume) if catalog is not None else None
        if dry_run:
            _plan(root_fd, mapping, await _recover(tree, moves, None, report), report)
            return report
        assert catalog is not None and moves is not None
        job_id = await moves.running_job() or await catalog.start_job("migrate", volume, {"root": str(root)})
        report.job_id = job_id
        plan = _plan(root_fd, mapping, await _recover(tree, moves, job_id, report), report)
        await _move_all(tree, moves, catalog, job_id, plan, report, progress, batch_size, max_rate)
        await _finish(tree, catalog, job_id, report)
        return report
    finally:
        os.close(root_fd)
        report.seconds = time.monotonic() - started


__all__ = [
    "UNMOVABLE_BACKENDS",
    "MigrationError",
    "Report",
    "mapping_from_csv",
    "mapping_from_postgres",
    "migrate",
    "normalize_qsid",
    "refuse_unmovable_backend",
    "scan_old_layout",
]
