"""The terminal side of ``storage-agent migrate``: mapping source, progress bar, report, exit status."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from agent.config import Config
from agent.migrate import (
    MigrationError,
    Progress,
    Report,
    mapping_from_csv,
    mapping_from_postgres,
    migrate,
    refuse_unmovable_backend,
)
from catalog import Catalog
from catalog.db import CatalogError

SHOWN = 20  # folder ids listed per problem kind; --json lists them all


def _match_owner(db_path: Path) -> None:
    """Run as root, keep the catalogue files owned by the user that owns their directory (the agent's)."""
    if os.geteuid() != 0:
        return
    st = os.stat(db_path.parent)
    for suffix in ("", "-wal", "-shm"):
        path = Path(f"{db_path}{suffix}")
        try:
            if path.stat().st_uid != st.st_uid:
                os.chown(path, st.st_uid, st.st_gid)
        except FileNotFoundError:
            pass


def _wants_progress(args: argparse.Namespace) -> bool:
    """A bar only for a person watching a real run: stderr (where it is drawn) is a terminal, no --json."""
    return sys.stderr.isatty() and not args.json and not args.dry_run


@contextmanager
def _progress_bar(enabled: bool) -> Iterator[Progress | None]:
    """Drawn on stderr, the stream checked by :func:`_wants_progress`: stdout stays the report alone."""
    if not enabled:
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(
        TextColumn("migrating"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        console=Console(stderr=True), transient=False,
    ) as bar:
        task = bar.add_task("migrate", total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


async def _open_catalog(db_path: Path, dry_run: bool) -> Catalog | None:
    """Read-write for a run. A dry run changes nothing: read-only, and not opened at all when there is none yet."""
    if not dry_run:
        catalog = await Catalog.open(db_path)
        _match_owner(db_path)
        return catalog
    if not await asyncio.to_thread(db_path.exists):
        return None
    try:
        return await Catalog.open(db_path, readonly=True)
    except CatalogError as e:  # e.g. older than this version: only a real run may upgrade it
        print(f"storage-agent: migrate: dry run without the catalogue's journal: {e}", file=sys.stderr)
        return None


async def _run(config: Config, args: argparse.Namespace, mapping: dict[str, str], progress: Progress | None) -> Report:
    db_path = Path(config.catalog.path)
    catalog = await _open_catalog(db_path, args.dry_run)
    try:
        return await migrate(
            config.volume[args.volume].path,
            args.volume,
            catalog,
            mapping,
            dry_run=args.dry_run,
            progress=progress,
            max_rate=args.max_rate,
        )
    finally:
        if catalog is not None:
            await catalog.close()
        _match_owner(db_path)  # a read-only open may still create the empty -wal/-shm files SQLite reads through


def _print(report: Report) -> None:
    def listing(title: str, items: list[str]) -> None:
        if not items:
            return
        print(f"{title} ({len(items)}):")
        for item in items[:SHOWN]:
            print(f"  {item}")
        if len(items) > SHOWN:
            print(f"  ... and {len(items) - SHOWN} more (--json lists all)")

    if report.already_migrated:
        print(f"volume {report.volume}: {report.root} is already at layout 3; nothing to do")
        return
    verb = "would move" if report.dry_run else "moved"
    print(
        f"volume {report.volume}: {report.found} old-layout folder(s) found, {verb} "
        f"{report.planned if report.dry_run else report.moved}"
        + (f", {report.recovered} finished from an interrupted run" if report.recovered else "")
        + f" in {report.seconds:.1f} s"
    )
    listing("NOT in the mapping, left in place", report.unmapped)
    listing("conflicts, left in place", report.conflicts)
    listing("failed", report.failed)
    if report.version_written:
        print(f"wrote {report.root}/version.txt = 3: the agent serves this volume "
              "(a running one from its next request)")
    elif not report.dry_run:
        print("version.txt NOT written: fix the mapping or the problems above and run migrate again")


def run_migrate(config: Config, args: argparse.Namespace) -> int:
    if args.volume not in config.volume:
        print(f"storage-agent: no volume {args.volume!r} in the config (have: {', '.join(config.volume)})",
              file=sys.stderr)
        return 2
    try:
        refuse_unmovable_backend(args.volume, config.volume[args.volume].backend)
        mapping = mapping_from_csv(args.mapping) if args.mapping else mapping_from_postgres(args.dsn)
        with _progress_bar(_wants_progress(args)) as progress:
            report = asyncio.run(_run(config, args, mapping, progress))
    except MigrationError as e:
        print(f"storage-agent: migrate: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(dataclasses.asdict(report) | {"complete": report.complete}, indent=2))
    else:
        _print(report)
    return 0 if report.complete else 4


__all__ = ["run_migrate"]
