"""Which mount a volume lives on, and its block devices' I/O counters.

Backends on a local filesystem (btrfs, xfs) need the mount point and type (to
check the volume is what its configuration says), its options (XFS project
quotas) and its devices (``performance-metric`` from ``/proc/diskstats``, read
through psutil).
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from pathlib import Path

import psutil

from backends.base import PerfMetric
from backends.errors import UnsupportedOperation

MOUNTINFO = "/proc/self/mountinfo"


@dataclass(frozen=True)
class MountInfo:
    mount_point: str
    fstype: str
    source: str
    options: frozenset[str]  # mount options and superblock options together


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal ``\\NNN``."""
    if "\\" not in field:
        return field
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[MountInfo]:
    mounts = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        lf, rf = left.split(), right.split()
        if len(lf) < 6 or len(rf) < 3:
            continue
        opts = set(lf[5].split(",")) | set(rf[2].split(","))
        mounts.append(MountInfo(_unescape(lf[4]), rf[0], _unescape(rf[1]), frozenset(opts)))
    return mounts


def mount_of(path: str | os.PathLike[str]) -> MountInfo | None:
    """The mount holding ``path`` (the last-mounted one with the longest matching mount point)."""
    real = os.path.realpath(path)
    best: MountInfo | None = None
    for m in parse_mountinfo(Path(MOUNTINFO).read_text()):
        mp = m.mount_point
        inside = real == mp or real.startswith(mp.rstrip("/") + "/")
        if inside and (best is None or len(mp) >= len(best.mount_point)):
            best = m
    return best


def disk_name(device: str) -> str | None:
    """``/dev/loop0`` or ``/dev/mapper/x`` → the kernel name psutil / diskstats use (``loop0``, ``dm-0``)."""
    if not device.startswith("/dev/"):
        return None
    try:
        return os.path.basename(os.path.realpath(device))
    except OSError:
        return None


async def diskstats_rate(devices: list[str], interval: float = 0.5) -> PerfMetric:
    """I/O rates of ``devices`` (summed) over ``interval`` seconds: ops/s, bytes/s and µs per op."""
    names = {n for n in (disk_name(d) for d in devices) if n}

    def sample() -> tuple[int, int, int, int, int, int]:
        stats = psutil.disk_io_counters(perdisk=True, nowrap=True) or {}
        found = [stats[n] for n in names if n in stats]
        if not found:
            raise UnsupportedOperation(f"no I/O counters for devices {sorted(devices)} in /proc/diskstats")
        return (
            sum(s.read_count for s in found),
            sum(s.write_count for s in found),
            sum(s.read_bytes for s in found),
            sum(s.write_bytes for s in found),
            sum(s.read_time for s in found),
            sum(s.write_time for s in found),
        )

    a = await asyncio.to_thread(sample)
    await asyncio.sleep(interval)
    b = await asyncio.to_thread(sample)
    reads, writes, rbytes, wbytes, rms, wms = (y - x for x, y in zip(a, b, strict=True))
    return PerfMetric(
        iops_read=round(reads / interval),
        iops_write=round(writes / interval),
        io_bytes_read=round(rbytes / interval),
        io_bytes_write=round(wbytes / interval),
        io_usec_read=rms * 1000 / reads if reads else 0.0,
        io_usec_write=wms * 1000 / writes if writes else 0.0,
    )
