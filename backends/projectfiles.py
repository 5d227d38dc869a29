"""XFS project files: ``projid`` (``<name>:<id>``) and ``projects`` (``<id>:<abs path>``).

Several agents (or an admin's editor) may touch them, so every change takes an
exclusive ``flock`` on a lock file next to ``projid``, re-reads both files and
rewrites each atomically (temp file in the same directory, fsync, rename).
Lines that are not ours (comments, other projects) are kept verbatim; ours
are matched exactly by name or id, never by substring (upstream's ``sed
/<qsid>/d`` also removed ``qs10`` with ``qs1``).
"""

from __future__ import annotations

import fcntl
import os
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_local_lock = threading.Lock()  # flock excludes other processes; this serialises the agent's own threads


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except FileNotFoundError:
        return []


def _split(line: str) -> tuple[str, str] | None:
    """``a:b`` of a non-comment line, else None."""
    text = line.strip()
    if not text or text.startswith("#"):
        return None
    left, sep, right = text.partition(":")
    return (left.strip(), right.strip()) if sep else None


def _write_atomic(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write("".join(line + "\n" for line in lines))
            f.flush()
            os.fchmod(f.fileno(), 0o644)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


class ProjectFiles:
    def __init__(self, projects: Path, projid: Path) -> None:
        self.projects = projects
        self.projid = projid
        self.lock_path = projid.with_name(projid.name + ".lock")

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        with _local_lock:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)  # releases the flock

    def ids(self) -> dict[str, int]:
        """Project name → id, from ``projid``."""
        out = {}
        for line in _read_lines(self.projid):
            pair = _split(line)
            if pair and pair[1].isdigit():
                out[pair[0]] = int(pair[1])
        return out

    def paths(self) -> dict[int, list[str]]:
        """Project id → paths, from ``projects``."""
        out: dict[int, list[str]] = {}
        for line in _read_lines(self.projects):
            pair = _split(line)
            if pair and pair[0].isdigit():
                out.setdefault(int(pair[0]), []).append(pair[1])
        return out

    def id_of(self, name: str) -> int | None:
        return self.ids().get(name)

    def add(self, name: str, path: str) -> int:
        """Register project ``name`` for ``path``; returns its id (the existing one when already registered)."""
        with self._locked():
            ids, paths = self.ids(), self.paths()
            pid = ids.get(name)
            if pid is None:
                pid = _first_free(set(ids.values()) | set(paths))
                _write_atomic(self.projid, [*_read_lines(self.projid), f"{name}:{pid}"])
            if path not in paths.get(pid, []):
                _write_atomic(self.projects, [*_read_lines(self.projects), f"{pid}:{path}"])
            return pid

    def remove(self, name: str) -> int | None:
        """Forget project ``name`` (its ``projid`` line and its ``projects`` lines); returns its id."""
        with self._locked():
            pid = self.ids().get(name)
            if pid is None:
                return None
            kept = [line for line in _read_lines(self.projects) if not _is_project(line, str(pid))]
            _write_atomic(self.projects, kept)
            kept = [line for line in _read_lines(self.projid) if (_split(line) or ("", ""))[0] != name]
            _write_atomic(self.projid, kept)
            return pid


def _is_project(line: str, pid: str) -> bool:
    pair = _split(line)
    return pair is not None and pair[0] == pid


def _first_free(used: set[int]) -> int:
    """The smallest id >= 1 not in use (project 0 is the default project of every file)."""
    pid = 1
    while pid in used:
        pid += 1
    return pid
