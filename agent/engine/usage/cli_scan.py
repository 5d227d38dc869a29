"""``storage-agent scan [--volume V] [--vfid X]``: force a full scan from the command line.

The scan runs in this process (so it works whether or not an agent is serving), records the per-directory
aggregates and totals in the catalogue, and leaves a rescan request that a running agent picks up within
a couple of seconds (its in-memory figures are then rebuilt from its own walk). On a terminal a progress
display shows directories and entries as they are counted.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time

from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from agent.config import Config
from agent.engine.usage.aggregates import VFolderTree
from agent.engine.usage.engine import _row
from agent.engine.usage.scanner import ScanProgress, scan
from backends import build_volume
from backends.base import Volume
from backends.errors import VFolderNotFound
from backends.ids import VFolderID
from catalog import Catalog
from catalog.usage_store import Totals, UsageStore, VFolderChange


def _targets(vols: list[Volume], vfid: str | None) -> list[tuple[Volume, VFolderID]]:
    found = []
    for vol in vols:
        if vfid is not None:
            vf = VFolderID.parse(vfid)
            try:
                vol.open_vfolder(vf).close()
            except VFolderNotFound:
                continue
            found.append((vol, vf))
        else:
            found += [(vol, vf) for qsid in vol.scopes_on_disk() for vf in vol.vfolders_on_disk(qsid)]
    return found


async def _scan_one(vol: Volume, vfid: VFolderID, threads: int, progress: Progress | None) -> tuple[VFolderTree, float]:
    counters = ScanProgress()
    cancel = threading.Event()

    def work() -> VFolderTree:
        with vol.open_vfolder(vfid) as root:
            dirs = scan(root.fd, "", threads=threads, cancel=cancel, progress=counters)
        tree = VFolderTree()
        for rel, agg in dirs.items():
            tree.put(rel, agg)
        return tree

    started = time.monotonic()
    task = asyncio.ensure_future(asyncio.to_thread(work))
    bar = progress.add_task(f"{vol.name} {vfid}", total=None) if progress is not None else None
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=0.1)
            if progress is not None and bar is not None:
                progress.update(bar, description=f"{vol.name} {vfid}: {counters.dirs} dirs, {counters.entries} entries")
    except BaseException:
        cancel.set()
        raise
    return task.result(), time.monotonic() - started


async def run(config: Config, volume: str | None, vfid: str | None) -> int:
    if volume is not None and volume not in config.volume:
        print(
            f"storage-agent scan: unknown volume {volume!r} (configured: {', '.join(config.volume)})", file=sys.stderr
        )
        return 2
    if vfid is not None:
        try:
            VFolderID.parse(vfid)
        except ValueError as e:
            print(f"storage-agent scan: --vfid {vfid!r}: {e}", file=sys.stderr)
            return 2
    catalog = await Catalog.open(config.catalog.path)
    vols = [build_volume(n, vc.backend, vc.path, vc.options) for n, vc in config.volume.items() if volume in (None, n)]
    try:
        for vol in vols:
            await vol.init()
        targets = await asyncio.to_thread(_targets, vols, vfid)
        if vfid is not None and not targets:
            print(f"storage-agent scan: vfolder {vfid} not found on any volume", file=sys.stderr)
            return 2  # a bad argument, like an unknown volume (1 is an operating-system error)
        store = UsageStore(catalog.db)
        threads = config.usage.scan_threads
        progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), transient=True)
        live = sys.stdout.isatty()
        if live:
            progress.start()
        try:
            for vol, vf in targets:
                tree, took = await _scan_one(vol, vf, threads, progress if live else None)
                count, used, alloc = tree.totals()
                key = (vol.name, vf.qsid, vf.hex)
                rows = [_row(rel, agg) for rel, agg in tree.dirs.items()]
                totals = Totals(count, used, alloc, "scan", False, time.time())
                await store.apply([VFolderChange(key, totals, rows, [], replace_all=True)])
                await store.request_rescan(key)
                line = (
                    f"{vol.name} {vf}: {count} entries, {used} bytes, {alloc} allocated bytes "
                    f"({len(tree.dirs)} directories, {took:.2f} s)"
                )
                if live:
                    progress.console.print(line)
                else:
                    print(line, flush=True)
        finally:
            if live:
                progress.stop()
        return 0
    finally:
        for vol in vols:
            await vol.shutdown()
        await catalog.close()
