"""How the usage engine keeps each volume's figures: watched, polled from the backend, or rescanned.

Chosen once per volume at start-up, from the backend's capabilities, the filesystem type under the volume
root (``backends/fstype.py``) and the volume's options, and logged with its reason; ``storage-agent
status`` shows the same choice (it calls :func:`choose` with the same inputs).

* ``fast``: the backend knows usage itself (``fast-size``), it is polled;
* ``scan`` on a filesystem other nodes write to (NFS, SMB, Lustre, GPFS, CephFS, FUSE, 9p, ...): no local
  event sees their writes, so the vfolders are rescanned every ``usage-rescan-interval`` (default
  ``[usage] remote-rescan-interval``) and answer ``source: scan`` with the time the walk started; the
  walk has many directory reads in flight (``[usage] remote-scan-threads``): on a network filesystem it
  waits on round trips, not on the CPU. ``usage-remote-writers = false`` says this node is the only
  writer (watch it anyway), ``true`` forces the remote treatment on any filesystem;
* ``watch``: a local filesystem watched by inotify/fanotify (``usage-watch = false`` or no watcher:
  ``scan`` on the fallback schedule).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.config import parse_duration
from backends import fstype
from backends.base import Capability

if TYPE_CHECKING:
    from agent.config import UsageConfig


@dataclass(frozen=True)
class VolumePolicy:
    mode: str  # watch | fast | scan
    fstype: str
    remote: bool  # other nodes may write to this volume
    rescan_interval: float | None  # seconds between scheduled rescans (None: none scheduled)
    scan_threads: int  # directory readers per scan (0: picked from the CPU count)
    reason: str


def _flag(options: Mapping[str, Any], key: str) -> bool | None:
    value = options.get(key)
    if value is None or isinstance(value, bool):
        return value
    return str(value).strip().lower() in ("1", "true", "yes", "on")


def choose(
    capabilities: frozenset[Capability] | set[Capability],
    root: Path | str,
    options: Mapping[str, Any],
    settings: UsageConfig,
    *,
    watcher: bool,
) -> VolumePolicy:
    """The mode of one volume, with the reason an operator reads in the log and in ``status``."""
    try:
        fs = fstype.detect(root)
        fs_name, fs_remote = fs.name, fs.remote
    except OSError as e:
        fs_name, fs_remote = f"unknown ({e.strerror})", False
    forced = _flag(options, "usage-remote-writers")
    remote = fs_remote if forced is None else forced
    configured = options.get("usage-rescan-interval")
    interval = parse_duration(configured) if configured is not None else None
    if Capability.FAST_SIZE in capabilities:
        return VolumePolicy("fast", fs_name, remote, None, 0, "the backend reports usage itself (fast-size)")
    if remote:
        why = "usage-remote-writers = true" if forced else f"{fs_name} is written by other nodes too"
        every = interval if interval is not None else settings.remote_rescan_interval
        return VolumePolicy("scan", fs_name, True, every, settings.remote_scan_threads,
                            f"{why}: local events miss their writes; rescanned every {every:g} s")
    if not watcher or _flag(options, "usage-watch") is False:
        why = "usage-watch = false" if _flag(options, "usage-watch") is False else "no watcher available"
        every = interval if interval is not None else settings.fallback_rescan_interval
        return VolumePolicy("scan", fs_name, False, every, 0, f"{why}; rescanned every {every:g} s")
    why = f"{fs_name} is local" + (" (usage-remote-writers = false)" if forced is False else "")
    return VolumePolicy("watch", fs_name, False, interval, 0, f"{why}: every change raises an event here")


def _proc_number(path: str, default: float) -> float:
    try:
        with open(path) as f:
            return float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return default


def settle_window(fs_name: str) -> float:
    """Seconds after a file's last change during which its ``st_blocks`` may still change with no event:
    the kernel allocates delayed blocks (and the extent-tree blocks a fragmented or sparse file needs) when it
    writes the dirty pages back, after ``vm.dirty_expire_centisecs`` plus a flusher period at the latest
    (30 + 5 s by default); XFS also trims speculative preallocation past EOF in the background, every
    ``fs.xfs.speculative_prealloc_lifetime`` (300 s). A margin covers a slow writeback."""
    expire = _proc_number("/proc/sys/vm/dirty_expire_centisecs", 3000) / 100
    flusher = _proc_number("/proc/sys/vm/dirty_writeback_centisecs", 500) / 100
    window = expire + 2 * max(flusher, 1.0) + 5.0
    if fs_name == "xfs":
        window += 2 * _proc_number("/proc/sys/fs/xfs/speculative_prealloc_lifetime", 300)
    return window


__all__ = ["VolumePolicy", "choose", "settle_window"]
