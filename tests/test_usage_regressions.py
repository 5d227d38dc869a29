"""Failures the usage engine's fuzzer (``bench/usage_fuzz.py``) found in long runs, each minimised to the
fewest operations on a fresh tree that still gave a settled wrong answer (``stale: false``). Each test
failed on the engine before the fix it names; the rule checked is the fuzzer's: once the tree is still, a
settled answer equals a fresh walk and ``du -s -B1``.
"""

from __future__ import annotations

import os
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.support import WATCHERS, AgentProcess, assert_clean_log, make_agent
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


def counted_then_written_back(where: Path, counted: Callable[[], None], volume: Path) -> None:
    """A sparse file in ``where``, counted (``counted`` returns once the answer is settled and right) before the
    kernel writes it back, then written back now with ``fsync`` (no event reports it). Skips where that
    cannot be arranged: a disk so busy every file was written back first, or no block allocated at writeback."""
    for attempt in range(5):  # the engine must count the file before the kernel writes it back
        f = where / f"sparse{attempt}"
        _sparse(f)
        before = os.lstat(f).st_blocks
        counted()
        if os.lstat(f).st_blocks == before:
            break
    else:
        pytest.skip("every file was written back before the engine counted it (a busy disk)")
    fd = os.open(f, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    if os.lstat(f).st_blocks == before:
        pytest.skip(f"{volume} allocates no block at writeback (not ext4 with delalloc)")


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
    counted_then_written_back(p / "quiet", lambda: settled_and_right(vf, quiet=0.3), agent.volume_root())
    settled_and_right(vf)


def test_a_directory_out_and_back_is_not_a_move_within(watched: tuple[AgentProcess, httpx.Client, str]) -> None:
    """Fuzzer seed 2085 (both watchers): ``ln k/w a/d/hl; mv a/d outside``, an append through the outside
    name, ``mv outside b/back``, then ``hl`` replaced by a rename, all before the engine re-read ``a``. Finding
    ``d`` again (same inode) was taken for a move within, so nothing was doubted, and the growth of ``k/w``
    (whose directory saw no event) was never counted. Only a rename the watcher saw stay in the vfolder
    makes a move within now; anything else is doubted and rescanned."""
    agent, api, _ = watched
    vf = _new_vfolder(api, agent)
    p = vf.path
    for d in ("k", "a/d", "b"):
        (p / d).mkdir(parents=True)
    (p / "k" / "w").write_bytes(b"w" * 4000)
    settled_and_right(vf, quiet=0.5)
    away = p.parent / f"{p.name}-away"
    try:
        os.link(p / "k" / "w", p / "a" / "d" / "hl")
        os.rename(p / "a" / "d", away)
        with open(away / "hl", "ab") as f:
            f.write(b"x" * 26_151)
        os.rename(away, p / "b" / "back")
        (p / "b" / "back" / "hl.tmp").write_bytes(b"t" * 10_557)
        os.rename(p / "b" / "back" / "hl.tmp", p / "b" / "back" / "hl")
        settled_and_right(vf, quiet=1.0)
    finally:
        shutil.rmtree(away, ignore_errors=True)


def test_a_subdirectory_moved_out_of_a_directory_that_moved_within(
    watched: tuple[AgentProcess, httpx.Client, str],
) -> None:
    """Found while chasing fuzzer seed 1779 (which turned out to be the inotify limit tested below): ``mv a b``
    (a move within, seen as one), ``ln k/w b/sub/hl; mv b/sub outside``, an append through the outside name, all
    before the engine re-read anything. The parent's re-read dropped ``a`` with ``a/sub`` below it, and the
    walk of ``b`` found no ``sub``: no re-read ever saw ``sub`` leave its parent, and the watcher's report of
    it (by the path ``a/sub`` its parent's watch still had) named a directory the tree held, which was left
    to that re-read. ``k/w``'s growth was never counted. A directory the watcher saw leave and not land in
    the vfolder is doubted now, read or not."""
    agent, api, _ = watched
    vf = _new_vfolder(api, agent)
    p = vf.path
    for d in ("k", "a/sub"):
        (p / d).mkdir(parents=True)
    (p / "k" / "w").write_bytes(b"w" * 4000)
    (p / "a" / "sub" / "f").write_bytes(b"f" * 100)
    settled_and_right(vf, quiet=0.5)
    away = p.parent / f"{p.name}-away"
    try:
        os.rename(p / "a", p / "b")
        os.link(p / "k" / "w", p / "b" / "sub" / "hl")
        os.rename(p / "b" / "sub", away)
        with open(away / "hl", "ab") as f:
            f.write(b"x" * 30_000)
        settled_and_right(vf, quiet=1.0)
    finally:
        shutil.rmtree(away, ignore_errors=True)


def test_a_directory_moved_out_while_a_full_walk_runs(watched: tuple[AgentProcess, httpx.Client, str]) -> None:
    """Found while chasing fuzzer seed 1779, by reading the engine: a full walk runs; it has read the root
    (``w`` a plain file) when ``ln w deep/sub/hl; mv deep/sub outside`` and an append through the outside name
    happen, and it reads ``deep`` after (no ``sub``). The watcher reported the move out during the walk, and
    the walk's landing forgot it with the moves seen before it began: nothing doubted ``w``. Moves seen while
    a walk runs outlive its landing now. A guard, not a proof: it did not fail on the engine before that
    change (another rescan or the walk's order covered it every time here)."""
    agent, api, _ = watched
    vf = _new_vfolder(api, agent)
    p = vf.path
    (p / "w").write_bytes(b"w" * 4000)  # the walk reads the root first
    deep = p.joinpath(*[f"d{i}" for i in range(30)])
    (deep / "sub").mkdir(parents=True)
    for i in range(3000):  # read before the deep directory: the walk takes a while to get there
        (p / "wide" / f"w{i}" / "x").mkdir(parents=True)
    settled_and_right(vf, quiet=0.5)
    away = p.parent / f"{p.name}-away"
    try:
        for attempt in range(3):
            r = api.post("/folder/usage/refresh", json={"volume": "local", "vfid": vf.vfid})
            assert r.status_code == 202, r.text
            time.sleep(0.1)
            os.link(p / "w", deep / "sub" / f"hl{attempt}")
            os.rename(deep / "sub", away)
            with open(away / f"hl{attempt}", "ab") as f:
                f.write(b"x" * 30_000)
            settled_and_right(vf, quiet=1.0)
            os.rename(away, deep / "sub")
            settled_and_right(vf, quiet=1.0)
    finally:
        shutil.rmtree(away, ignore_errors=True)


def test_a_hard_link_in_a_new_directory_moved_out_before_it_was_read(
    watched: tuple[AgentProcess, httpx.Client, str], request: pytest.FixtureRequest
) -> None:
    """What fuzzer seed 1779 (inotify) really was, found with ``--replay 1779`` and the engine's decisions
    logged: ``mkdir -p c/new/sub; ln k/w c/new/sub/hl; mv c/new/sub outside``, an append through the outside
    name, all before the engine read ``c/new``. fanotify sees every step (its mark covers the filesystem) and
    the move out is doubted. inotify sees none: the events happened in directories not yet watched, and a
    new link to ``k/w`` reaches no watch of ``k`` (the kernel tells only the inode); the walk of ``c/new``
    finds it empty. No event tells the engine, so ``k/w``'s growth is uncounted until a rescan: an inotify
    limit, marked as an expected failure (the README says so). Nor could a timestamp flag it: the steps
    usually land within one tick of the kernel's file clock (184 of 200 such ``c/new`` kept mtime == birth
    time after the move out). It passes when something else re-reads ``k`` in time (``w`` was written
    lately, so the settle window's re-reads may), hence not strict."""
    agent, api, watcher = watched
    if watcher == "inotify":
        request.applymarker(pytest.mark.xfail(reason="inotify reports nothing of it (see the docstring)", strict=False))
    vf = _new_vfolder(api, agent)
    p = vf.path
    for d in ("k", "c"):
        (p / d).mkdir()
    (p / "k" / "w").write_bytes(b"w" * 4000)
    settled_and_right(vf, quiet=0.5)
    away = p.parent / f"{p.name}-away"
    try:
        (p / "c" / "new" / "sub").mkdir(parents=True)
        os.link(p / "k" / "w", p / "c" / "new" / "sub" / "hl")
        os.rename(p / "c" / "new" / "sub", away)
        with open(away / "hl", "ab") as f:
            f.write(b"x" * 30_000)
        settled_and_right(vf, quiet=1.0)
    finally:
        shutil.rmtree(away, ignore_errors=True)


@pytest.mark.parametrize("watcher", WATCHERS)
def test_a_subtree_walk_older_than_a_full_walk_is_not_merged(watcher: str, tmp_path: Path) -> None:
    """A settled answer missing 2,999 directories (the hard-link guard above, twice, with the out-and-back
    fix): the walk of a new subtree began, a full walk started and landed while it ran, and the subtree
    walk, ending last, put its older reads over the full walk's: ``big`` as it held one directory, after
    the full walk had counted the ones made since and the re-read their events asked for had found nothing
    new. No event was left to repair it. A subtree walk whose tree was replaced meanwhile is dropped now
    (the full walk read that subtree after the job began). Many scan threads make the full walk overtake
    the subtree's two; it is tried a few times, as the overtaking depends on the machine's load."""
    agent = make_agent(tmp_path / "agent", usage={"watcher": watcher, "scan-threads": 32}).start()
    try:
        with agent.client() as api:
            vf = _new_vfolder(api, agent)
            p = vf.path
            (p / "k").mkdir()
            settled_and_right(vf, quiet=0.5)
            stage = p.parent / f"{p.name}-stage"
            for attempt in range(4):
                big = stage / f"big{attempt}"
                for i in range(20_000):  # a subtree that takes its walk a while
                    (big / "c0" / f"d{i}").mkdir(parents=True)
                os.rename(big, p / big.name)  # the engine walks it as a new subtree
                time.sleep(0.3)  # it has read big itself (one subdirectory) and is below it now
                for i in range(1, 50):
                    (p / big.name / f"c{i}").mkdir()
                r = api.post("/folder/usage/refresh", json={"volume": "local", "vfid": vf.vfid})
                assert r.status_code == 202, r.text
                settled_and_right(vf, quiet=1.0)
    finally:
        agent.stop()
        shutil.rmtree(tmp_path / "agent" / "volume", ignore_errors=True)
    assert_clean_log(agent)


def test_a_directory_read_while_it_was_away_is_read_again(watched: tuple[AgentProcess, httpx.Client, str]) -> None:
    """Fuzzer seed 2317 (fanotify; a subtree lost in a burst of rotations, settled). A directory's events
    make it dirty; its re-read runs while it is renamed away and back (``mv x x.tmp; mv x.tmp x`` in a loop,
    as a rotation does): the read finds nothing (or another directory) at its path, and only asked its
    parent's re-read to settle it. That re-read, after the loop, saw the same directory back at the same
    place and had nothing to do: the change the events announced (here a new subdirectory ``nK``; in the
    fuzzer, a subtree walk below it that had found it moving) was never read. A directory found gone or
    replaced is read again now, besides its parent. Timing decides each try (the re-read must fall inside
    the loop); the loop is placed around the engine's coalescing delay and tried 60 times: before the fix
    it failed in 5 of 6 runs (each watcher), at the 7th to 39th try."""
    agent, api, _ = watched
    vf = _new_vfolder(api, agent)
    p = vf.path
    x = p / "b" / "x"
    x.mkdir(parents=True)
    settled_and_right(vf, quiet=0.5)
    rng = random.Random(2317)
    fd = os.open(x, os.O_RDONLY | os.O_DIRECTORY)  # makes entries in x wherever it is at the time
    try:
        for attempt in range(60):
            os.mkdir(f"n{attempt}", dir_fd=fd)
            time.sleep(rng.uniform(0.02, 0.04))  # the engine re-reads x about 50 ms (coalesce) after this
            end = time.monotonic() + rng.uniform(0.05, 0.07)
            while True:
                os.rename(x, p / "b" / "x.tmp")
                os.rename(p / "b" / "x.tmp", x)
                if time.monotonic() > end:
                    break
            settled_and_right(vf, quiet=0.3)
    finally:
        os.close(fd)
