"""The volume root's layout version: ``version.txt`` (3 = ``<root>/<qsid>/aa/bb/rest``).

One place reads it, writes it (atomically) and initialises a new volume, for the agent, the
migration and ``storage-agent status`` alike.
"""

from __future__ import annotations

import os
from pathlib import Path

LAYOUT_VERSION = 3

# What a fresh filesystem may hold before anything was stored on it (mkfs.ext4 makes lost+found).
FRESH_ENTRIES = frozenset({"lost+found"})


def read_version(root: Path) -> int | None:
    """The root's layout version; None without ``version.txt`` (layout 2), -1 when it is unreadable."""
    try:
        text = (root / "version.txt").read_text().strip()
    except FileNotFoundError:
        return None
    return int(text) if text.isdigit() else -1


def write_version(root_fd: int, owner: tuple[int, int] | None = None) -> None:
    """``version.txt`` = 3 via a temporary file, fsync and rename: never half-written."""
    tmp = f".version.txt.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=root_fd)
    try:
        os.write(fd, f"{LAYOUT_VERSION}\n".encode())
        os.fsync(fd)
        if owner is not None:
            os.fchown(fd, *owner)
    finally:
        os.close(fd)
    os.rename(tmp, "version.txt", src_dir_fd=root_fd, dst_dir_fd=root_fd)
    os.fsync(root_fd)


def _holds_nothing(root: Path) -> bool:
    with os.scandir(root) as it:
        return all(e.name in FRESH_ENTRIES for e in it)


def initialise_if_new(root: Path) -> str | None:
    """Give a new volume -- its root missing or empty -- ``version.txt`` = 3; returns how it was new
    ("missing": created now, one level only; "empty"), or None when it is not new. Raises OSError.

    Such a root holds no layout-2 folder, so there is nothing to migrate. A root with any entry and no
    version.txt is left alone: it needs ``storage-agent migrate``. A missing parent is more likely a typo
    or an absent mount than a new volume, so only the root itself is created.
    """
    try:
        root.mkdir(mode=0o755)
        how = "missing"
    except FileExistsError:
        if not root.is_dir() or (root / "version.txt").exists() or not _holds_nothing(root):
            return None
        how = "empty"
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        write_version(fd)
    finally:
        os.close(fd)
    return how
