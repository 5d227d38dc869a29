"""Finding and detaching the view's mount without ever touching the mounted filesystem.

A FUSE mount whose process is stopped hangs every ``stat`` on it, and one whose
process died answers ENOTCONN; so the mount table is read from
``/proc/self/mountinfo`` (no path lookup on the mount) and a stale mount is
detached with ``umount2(MNT_DETACH)``, which does not wait for the FUSE process.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
from pathlib import Path

FSNAME = "storage-agent"
SUBTYPE = "storage-agent-view"
MNT_DETACH = 2

_libc = ctypes.CDLL(None, use_errno=True)


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal (``\\040``)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def fuse_mounts_at(path: Path) -> list[str]:
    """The fstype of each FUSE mount stacked at ``path`` (lexically normalised, no symlink resolution)."""
    return [fstype for _, fstype in _view_mounts(path)]


def _view_mounts(path: Path) -> list[tuple[str, str]]:
    """(major:minor, fstype) of each FUSE mount stacked at ``path``."""
    target = os.path.normpath(os.path.abspath(path))
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            head, _, tail = line.partition(" - ")
            fields = head.split()
            fstype = tail.split()[0] if tail else ""
            if len(fields) >= 5 and _unescape(fields[4]) == target and fstype.startswith("fuse"):
                found.append((fields[2], fstype))
    return found


def set_readahead(path: Path, kb: int) -> bool:
    """Raise the read-ahead of the view's mount (its bdi is named after the mount's device number)."""
    for dev, fstype in _view_mounts(path):
        if fstype == f"fuse.{SUBTYPE}":
            try:
                Path(f"/sys/class/bdi/{dev}/read_ahead_kb").write_text(f"{kb}\n")
                return True
            except OSError:
                return False
    return False


def is_view_mounted(path: Path) -> bool:
    return f"fuse.{SUBTYPE}" in fuse_mounts_at(path)


def detach(path: Path) -> bool:
    """Lazily unmount every view mount at ``path``; True when something was detached."""
    detached = False
    for _ in range(16):  # mounts can be stacked; each call detaches the top one
        if not is_view_mounted(path):
            break
        if _libc.umount2(os.fsencode(os.path.abspath(path)), MNT_DETACH) != 0:
            err = ctypes.get_errno()
            if err != errno.EINVAL:  # EINVAL: raced with another unmount
                raise OSError(err, os.strerror(err), str(path))
        detached = True
    return detached
