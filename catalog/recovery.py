"""A corrupt or deleted catalogue at start-up: keep the bad file, start a new one, say so.

Only corruption is set aside -- SQLite reporting ``SQLITE_CORRUPT`` or ``SQLITE_NOTADB``
while opening or upgrading, or ``PRAGMA quick_check`` finding damage. A catalogue that
cannot be opened for any other reason (permissions, a lock held too long, a read-only
mount, a newer schema) is refused as before: moving it aside would lose a good file.

The bad file is renamed, never copied or deleted, to ``<name>.corrupt-<UTC time>`` and
its ``-wal``/``-shm``/``-journal`` companions to ``<name>.corrupt-<UTC time>-wal`` etc.,
so ``sqlite3 <name>.corrupt-<time>`` opens the copy together with its own WAL. A WAL
left without its database (the catalogue was deleted while the agent was down) is set
aside the same way (``.orphan-<time>-wal``): SQLite would otherwise replay it into the
new, empty file.

Corruption is looked for first through a read-only connection (``PRAGMA quick_check``):
a writable one would, on closing, checkpoint a killed run's WAL into the damaged file and
delete the WAL, so the copy kept would no longer be what was found.

What is on disk (quota scopes, vfolders, usage) is rebuilt by the caller's start-up
reconciliation and usage scans; what only the catalogue held is gone (see ``LOST``).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

log = logging.getLogger(__name__)

SQLITE_CORRUPT = 11
SQLITE_NOTADB = 26
COMPANIONS = ("-wal", "-shm", "-journal")

LOST = (
    "vfolder metadata payloads",
    "open upload sessions (clients must start those uploads again; their staged bytes are removed)",
    "job history (clones, migrations)",
    "records of vfolders and quota scopes already gone from disk",
)


def is_corruption(exc: BaseException | None) -> bool:
    """Whether a DB-API error is SQLite saying the file itself is damaged or not a database."""
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and (code & 0xFF) in (SQLITE_CORRUPT, SQLITE_NOTADB)


@dataclass
class Recovery:
    """What happened to the catalogue file at start-up (``None`` on a :class:`Catalog`: nothing)."""

    path: Path
    reason: str  # what SQLite said about the bad file, or "missing"
    kept: list[Path] = field(default_factory=list)  # the renamed bad file and its companions

    @property
    def corrupt(self) -> bool:
        return self.reason != "missing"


def _stamp() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())


def _free_base(path: Path, tag: str) -> str:
    """``<path>.<tag>-<time>``, with ``-2``, ``-3`` … when a copy of that second is already there."""
    base = f"{path}.{tag}-{_stamp()}"
    candidate, n = base, 1
    while any(os.path.lexists(candidate + s) for s in ("", *COMPANIONS)):
        n += 1
        candidate = f"{base}-{n}"
    return candidate


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def find_corruption(path: Path, busy_timeout_ms: int) -> str | None:
    """What is wrong with the file at ``path`` (None: nothing found), read-only, changing nothing.

    quick_check reads every page once but skips the index cross-checks of a full integrity_check:
    linear in the file's size and cheap enough for every start. Errors other than corruption
    (cannot open, locked, …) return None: the normal open reports them.
    """
    uri = f"file:{quote(str(path.resolve()))}?mode=ro"
    had = {s for s in COMPANIONS if os.path.lexists(f"{path}{s}")}
    try:
        con = sqlite3.connect(uri, uri=True, isolation_level=None)
    except sqlite3.Error:
        return None
    try:
        con.execute(f"PRAGMA busy_timeout = {busy_timeout_ms}")
        rows = [r[0] for r in con.execute("PRAGMA quick_check")]
    except sqlite3.Error as e:
        return str(e) if is_corruption(e) else None
    finally:
        con.close()
        for s in set(COMPANIONS) - had:  # a read-only connection to a WAL file leaves empty ones behind
            try:
                os.unlink(f"{path}{s}")
            except FileNotFoundError:
                pass
    if rows == ["ok"]:
        return None
    return (
        "quick_check: "
        + "; ".join(str(r) for r in rows[:3])
        + (f" (and {len(rows) - 3} more)" if len(rows) > 3 else "")
    )


def set_aside(path: Path, tag: str) -> list[Path]:
    """Rename ``path`` and its SQLite companions to ``<path>.<tag>-<time>[-wal|-shm|-journal]``."""
    base = _free_base(path, tag)
    kept = []
    for suffix in ("", *COMPANIONS):
        src = Path(f"{path}{suffix}")
        if not os.path.lexists(src):
            continue
        dst = Path(base + suffix)
        os.rename(src, dst)
        kept.append(dst)
    if kept:
        _fsync_dir(path.parent)
    return kept


def orphan_companions(path: Path) -> tuple[bool, list[Path]]:
    """Whether the database file is missing; a WAL/SHM/journal it left is set aside before a new file is made."""
    if os.path.lexists(path):
        return False, []
    if not any(os.path.lexists(f"{path}{s}") for s in COMPANIONS):
        return True, []
    kept = set_aside(path, "orphan")
    log.info(
        "catalogue %s is gone but its %s remained: kept as %s",
        path,
        "/".join(COMPANIONS),
        ", ".join(str(p) for p in kept),
    )
    return True, kept


__all__ = ["LOST", "Recovery", "find_corruption", "is_corruption", "orphan_companions", "set_aside"]
