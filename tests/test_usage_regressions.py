"""Failures the usage engine's fuzzer (``bench/usage_fuzz.py``) found in long runs, each minimised to the
fewest operations on a fresh tree that still gave a settled wrong answer (``stale: false``). Each test
failed on the engine before the fix it names; the rule checked is the fuzzer's: once the tree is still, a
settled answer equals a fresh walk and ``du -s -B1``.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import httpx
import pytest

from tests.support import AgentProcess
from tests.test_usage_engine import _new_vfolder
from tests.test_usage_races import _scans, settled_and_right


def test_a_new_directory_does_not_cancel_an_unread_move_out(watched: tuple[AgentProcess, httpx.Client, str]) -> None:
    """Fuzzer seed 1148 (both watchers): ``mkdir a/new; ln k/keep a/new/hl; mv a/new outside`` before the
    engine read ``a/new``, then an append through the outside name and an unrelated ``mkdir b``. The walk of
    the new ``b`` was taken for the moved directory found at a new place (a move within), so the move out
    was never doubted and ``keep``'s growth never counted."""
    agent, api, _ = watched
    vf = _new_vfolder(api, agent)
    p = vf.path
    (p / "a").mkdir()
    (p / "k").mkdir()  # not re-read by the events below: nothing shows that ``keep`` got a second name
    (p / "k" / "keep").write_bytes(b"k" * 3000)
    settled_and_right(vf, quiet=0.5)
    away = p.parent / f"{p.name}-away"
    try:
        (p / "a" / "new").mkdir()
        os.link(p / "k" / "keep", p / "a" / "new" / "hl")
        os.rename(p / "a" / "new", away)
        with open(away / "hl", "ab") as f:
            f.write(b"w" * 25_000)
        (p / "b").mkdir()
        settled_and_right(vf, quiet=1.0)
    finally:
        shutil.rmtree(away, ignore_errors=True)


def test_a_new_directory_moved_within_costs_no_rescan(watched: tuple[AgentProcess, httpx.Client, str]) -> None:
    """The other side of the fix above: a directory the engine never read, renamed within the vfolder, is
    known to have stayed by the rename itself (inotify: MOVED_FROM/MOVED_TO paired by cookie; fanotify:
    FAN_RENAME), so it costs no full rescan."""
    agent, api, _ = watched
    vf = _new_vfolder(api, agent)
    p = vf.path
    (p / "a").mkdir()
    (p / "deep" / "er").mkdir(parents=True)
    settled_and_right(vf, quiet=0.5)
    before = _scans(api)
    for i in range(5):
        d = p / "a" / f"new{i}"
        d.mkdir()
        (d / "f").write_bytes(b"n" * 100 * (i + 1))
        os.rename(d, p / "deep" / "er" / f"new{i}")
        settled_and_right(vf, quiet=0.3)
    assert _scans(api) == before


def test_hard_links_made_while_a_full_scan_runs(watched: tuple[AgentProcess, httpx.Client, str]) -> None:
    """Fuzzer seeds 1110, 1158, 1638, 1701, 2518 (inotify; allocated bytes too high, settled): ``ln a/fN
    deep/.../gN`` while a full scan runs. The scan read ``a`` before the link (``fN`` a plain file) and the
    deep directory after it (``gN`` a hard link): the inode's blocks were counted twice, and the re-read of
    the deep directory its event asked for saw a link the tree already held, so nothing looked for the
    older name. A guard, not a proof: the interleaving depends on the walk's timing and this test did not
    catch it on the engine before the fix; the long fuzzer is the evidence."""
    agent, api, _ = watched
    vf = _new_vfolder(api, agent)
    p = vf.path
    (p / "a").mkdir()
    deep = p.joinpath(*[f"d{i}" for i in range(40)])
    deep.mkdir(parents=True)
    for i in range(3000):  # enough directories for the walk to take a while
        (p / "wide" / f"w{i}" / "x").mkdir(parents=True)
    n = 40
    for i in range(n):
        (p / "a" / f"f{i}").write_bytes(b"f" * 9000)
    settled_and_right(vf, quiet=0.5)
    for _ in range(3):
        r = api.post("/folder/usage/refresh", json={"volume": "local", "vfid": vf.vfid})
        assert r.status_code == 202, r.text
        for i in range(n):  # spread over the walk: some links fall between the reads of a and of deep
            os.link(p / "a" / f"f{i}", deep / f"g{i}")
            time.sleep(0.02)
        settled_and_right(vf, quiet=1.0)
        for i in range(n):
            os.unlink(deep / f"g{i}")
        settled_and_right(vf, quiet=1.0)


def _sparse(path: Path) -> None:
    """Six 4 KiB blocks with holes between them: six extents, more than an ext4 inode holds (4), so the
    kernel adds an extent-tree block when it allocates the delayed blocks at writeback."""
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    try:
        for i in range(6):
            os.pwrite(fd, b"s" * 4096, i * 8192)
    finally:
        os.close(fd)


def test_allocation_that_changes_at_writeback(watched: tuple[AgentProcess, httpx.Client, str]) -> None:
    """Fuzzer seeds 2444, 2445 (inotify; the sibling vfolder, allocated bytes only, settled): a file's
    ``st_blocks`` changed after its last event. With delayed allocation the blocks of a write are reserved
    at once and allocated when the kernel writes the pages back (up to ~35 s later), and a sparse or
    fragmented file then gains an extent-tree block: no event says so. The engine had counted the blocks at
    the write's events and served them as fresh for good (a quiet directory is never re-read)."""
    agent, api, _ = watched
    vf = _new_vfolder(api, agent)
    p = vf.path
    (p / "quiet").mkdir()
    settled_and_right(vf, quiet=0.3)
    for attempt in range(5):  # the engine must count the file before the kernel writes it back
        f = p / "quiet" / f"sparse{attempt}"
        _sparse(f)
        before = os.lstat(f).st_blocks
        settled_and_right(vf, quiet=0.3)
        if os.lstat(f).st_blocks == before:
            break
    else:
        pytest.skip("every file was written back before the engine counted it (a busy disk)")
    fd = os.open(f, os.O_RDONLY)
    try:
        os.fsync(fd)  # the writeback, now (no event reports it)
    finally:
        os.close(fd)
    if os.lstat(f).st_blocks == before:
        pytest.skip(f"{agent.volume_root()} allocates no block at writeback (not ext4 with delalloc)")
    settled_and_right(vf)
