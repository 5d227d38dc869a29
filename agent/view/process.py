"""``storage-agent view``: mount the view, follow the catalogue, unmount on SIGTERM/SIGINT."""

from __future__ import annotations

import logging
import os
import resource
import signal
from pathlib import Path

import pyfuse3
import trio

from agent.config import Config
from agent.view import mounts
from agent.view.fs import ViewFS
from catalog.db import CatalogError
from catalog.readonly import ReadOnlyCatalog

log = logging.getLogger(__name__)

POLL_INTERVAL = 2.0  # seconds between catalogue re-reads: new scopes and vfolders appear without a restart
READAHEAD_KB = 4096  # sequential reads reach the view as 1 MiB requests (the kernel's FUSE maximum) not 128 KiB


def mount_options() -> set[str]:
    """Read-only at the VFS level too, and permission checks by the kernel against the mirrored modes.

    Run as a user other than root (the packaged unit, or ``[storage-proxy] user``), the mount also lets
    root in (``allow_root``): a FUSE mount is otherwise closed to everyone but its owner, root included,
    and the view is for node admins."""
    options = {"ro", "default_permissions", f"fsname={mounts.FSNAME}", f"subtype={mounts.SUBTYPE}"}
    if os.geteuid() != 0:
        options.add("allow_root")
    return options


def run(config: Config) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:  # the view keeps one O_PATH descriptor per vfolder it has shown
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    trio.run(serve_view, config)


def prepare(config: Config) -> tuple[ViewFS, ReadOnlyCatalog]:
    """Detach a stale mount left by a crash, make the mount point, open the catalogue read-only."""
    root = config.view.mount_root
    if mounts.detach(root):
        log.warning("detached a stale view mount at %s", root)
    root.mkdir(parents=True, exist_ok=True)
    catalog = ReadOnlyCatalog(config.catalog.path)
    fs = ViewFS(catalog, {name: vc.path for name, vc in config.volume.items()}, config.view)
    fs.refresh()
    return fs, catalog


async def follow_catalog(fs: ViewFS, interval: float = POLL_INTERVAL) -> None:
    while True:
        await trio.sleep(interval)
        try:
            fs.refresh()
        except CatalogError as e:
            log.warning("view: catalogue not readable, keeping the last listing: %s", e)


async def serve_view(config: Config) -> None:
    fs, catalog = prepare(config)
    root = str(config.view.mount_root)
    pyfuse3.init(fs, root, mount_options())
    log.info("view mounted at %s (pid %d)", root, os.getpid())
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(follow_catalog, fs)
            nursery.start_soon(_raise_readahead, config.view.mount_root)
            nursery.start_soon(_stop_on_signal)
            await pyfuse3.main()
            nursery.cancel_scope.cancel()
    finally:
        pyfuse3.close(unmount=True)
        fs.close()
        catalog.close()
        log.info("view unmounted from %s", root)


async def _raise_readahead(root: Path) -> None:
    """The kernel sets the mount's read-ahead when it handles FUSE_INIT, so raise it once that is done."""
    for _ in range(3):
        await trio.sleep(0.5)
        await trio.to_thread.run_sync(mounts.set_readahead, root, READAHEAD_KB)


async def _stop_on_signal() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _ in signals:
            pyfuse3.terminate()
            return
