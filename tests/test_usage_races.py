"""Issue 22: the usage engine under renames racing with queued events, odd names, hard links across the
vfolder boundary and in-flight lag. Each test failed on the engine before the fix it covers.

The rule checked everywhere: once the tree stops changing, an answer that says ``stale: false`` (and no
``pending``) equals a fresh walk; a figure the engine has reason to doubt is never served as fresh.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx
import pytest

from tests.support import AgentProcess, walk
from tests.test_usage_engine import VF, _new_vfolder

SETTLE = 30.0


def settled_and_right(vf: VF, deadline: float = SETTLE, quiet: float = 0.0) -> None:
    """Poll until the answer is fresh; every fresh answer seen must equal a fresh walk (the tree is still).
    ``quiet``: seconds to let the engine catch up first (tests of other defects than lag)."""
    time.sleep(quiet)
    end = time.monotonic() + deadline
    while True:
        count, size, alloc = walk(vf.path)
        u = vf.usage()
        ub = vf.used_bytes()
        if not u["stale"] and not u.get("pending"):
            assert (u["file_count"], u["used_bytes"]) == (count, size), ("served as fresh", u, count, size)
        if not ub.get("stale") and not ub.get("pending") and not u["stale"] and not u.get("pending"):
            assert ub["used_bytes"] == alloc, ("used-bytes served as fresh", ub, alloc)
            return
        assert time.monotonic() < end, ("never settled", u, ub)
        time.sleep(0.1)




def _ckpt(d: Path, n: int) -> None:
    (d / "sub").mkdir(parents=True)
    for i in range(n):
        (d / f"f{i}").write_bytes(os.urandom(1000 * (i + 1)))
        (d / "sub" / f"g{i}").write_bytes(os.urandom(5000 * (i + 1)))


def test_directory_rotations_in_a_loop(watched: tuple[AgentProcess, httpx.Client, str]) -> None:
    """``mv ckpt ckpt.old; mv ckpt.new ckpt; mv ckpt.old ckpt.new`` for 2 s: no subtree lost or doubled."""
    agent, api, _ = watched
    vf = _new_vfolder(api, agent)
    p = vf.path
    _ckpt(p / "ckpt", 2)
    _ckpt(p / "ckpt.new", 3)
    settled_and_right(vf, quiet=2.0)
    for _round in range(3):
        end = time.monotonic() + 2.0
        i = 0
        while time.monotonic() < end:
            os.rename(p / "ckpt", p / "ckpt.old")
            os.rename(p / "ckpt.new", p / "ckpt")
            os.rename(p / "ckpt.old", p / "ckpt.new")
            i += 1
            if i % 7 == 0:  # a trainer writing the next checkpoint meanwhile
                with open(p / "ckpt.new" / "sub" / "g0", "ab") as f:
                    f.write(b"c" * 100)
                (p / "ckpt.new" / f"step{i % 5}").write_bytes(b"s" * (i % 3000))
        settled_and_right(vf, quiet=2.0)


def test_names_that_are_not_utf8_are_counted(watched: tuple[AgentProcess, httpx.Client, str]) -> None:
    """A directory named with byte 0xff (and files with Latin-1 names) is counted like any other, at the
    first scan and through events; nothing raises (the fixture checks the log)."""
    agent, api, _ = watched
    vf = _new_vfolder(api, agent)
    root = os.fsencode(vf.path)
    os.mkdir(root + b"/\xff")
    with open(root + b"/\xff/caf\xe9", "wb") as f:
        f.write(b"x" * 3000)
    settled_and_right(vf, quiet=1.0)
    os.mkdir(root + b"/\xff/sub\xfe")
    with open(root + b"/\xff/sub\xfe/\x80", "wb") as f:
        f.write(b"y" * 5000)
    os.rename(root + b"/\xff", root + b"/moved\xfa")
    settled_and_right(vf, quiet=1.0)
    os.rename(root + b"/moved\xfa/sub\xfe", root + b"/\xfb")
    settled_and_right(vf, quiet=1.0)


def test_lag_is_visible_during_a_burst(watched: tuple[AgentProcess, httpx.Client, str]) -> None:
    """Issue 22 item 7: an answer asked right after a burst of creates and deletes is either exact or says
    ``pending`` (and stale); it never serves the lagging figure as settled."""
    agent, api, _ = watched
    vf = _new_vfolder(api, agent)
    p = vf.path
    flagged = 0
    for burst in range(8):
        d = p / f"b{burst}"
        d.mkdir()
        for i in range(400):
            (d / f"f{i}").write_bytes(b"x" * i)
        for i in range(0, 400, 2):
            (d / f"f{i}").unlink()
        u = vf.usage()  # no pause: the engine has not applied the burst yet
        count, size, _ = walk(p)
        if u["stale"] or u.get("pending"):
            flagged += 1
        else:
            assert (u["file_count"], u["used_bytes"]) == (count, size), ("lag served as settled", u, count, size)
    settled_and_right(vf)
    assert flagged, "every answer was already exact: the burst did not exercise lag"


def test_a_hard_link_written_through_a_name_outside_the_vfolder(
    watched: tuple[AgentProcess, httpx.Client, str], tmp_path: Path
) -> None:
    """Issue 22 item 6: a subtree holding one name of a hard-linked file moves out of the vfolder; an
    append through that outside name grows the file still named inside, and the figures follow."""
    agent, api, _ = watched
    vf = _new_vfolder(api, agent)
    p = vf.path
    (p / "d").mkdir()
    (p / "keep").write_bytes(b"k" * 10_000)
    os.link(p / "keep", p / "d" / "alias")
    settled_and_right(vf, quiet=1.0)
    away = p.parent / f"{p.name}-away"
    os.rename(p / "d", away)
    try:
        settled_and_right(vf, quiet=1.0)
        with open(away / "alias", "ab") as f:
            f.write(os.urandom(200_000))
        settled_and_right(vf, quiet=1.0)
        os.truncate(away / "alias", 10)
        settled_and_right(vf, quiet=1.0)
    finally:
        for name in os.listdir(away):
            os.unlink(away / name)
        os.rmdir(away)


def test_a_hard_link_into_a_sibling_vfolder_written_there(watched: tuple[AgentProcess, httpx.Client, str]) -> None:
    """Issue 22 item 6: a file of one vfolder gets a second name in a sibling vfolder; an append through the
    sibling's name grows the first vfolder's file too, and both vfolders' figures follow."""
    agent, api, _ = watched
    vf, sib = _new_vfolder(api, agent), _new_vfolder(api, agent)
    (vf.path / "f").write_bytes(b"f" * 5000)
    settled_and_right(vf, quiet=1.0)
    os.link(vf.path / "f", sib.path / "f")
    settled_and_right(sib, quiet=1.0)
    with open(sib.path / "f", "ab") as f:
        f.write(os.urandom(300_000))
    settled_and_right(sib, quiet=1.0)
    settled_and_right(vf)


@pytest.mark.parametrize("fresh_dir", [False, True], ids=["old-dir", "new-dir"])
def test_a_hard_link_made_just_before_its_directory_moves_out(
    watched: tuple[AgentProcess, httpx.Client, str], fresh_dir: bool
) -> None:
    """Found by the fuzzer (seeds 13, 29, 39): ``ln keep d/alias; mv d outside`` before the engine read
    ``d``: the link reached no event it could read, yet ``keep`` now has a name outside; an append through
    it must show (the engine rescans, stale meanwhile, when a directory leaves the vfolder)."""
    agent, api, _ = watched
    vf = _new_vfolder(api, agent)
    p = vf.path
    (p / "keep").write_bytes(b"k" * 7000)
    if not fresh_dir:
        (p / "d").mkdir()
        settled_and_right(vf, quiet=1.0)
    else:
        (p / "d").mkdir()
    os.link(p / "keep", p / "d" / "alias")
    away = p.parent / f"{p.name}-away"
    os.rename(p / "d", away)
    try:
        with open(away / "alias", "ab") as f:
            f.write(os.urandom(100_000))
        settled_and_right(vf, quiet=1.0)
        with open(away / "alias", "ab") as f:
            f.write(os.urandom(50_000))
        settled_and_right(vf, quiet=0.5)
    finally:
        os.unlink(away / "alias")
        os.rmdir(away)


def _scans(api: httpx.Client) -> float:
    r = api.get("/metrics")
    assert r.status_code == 200, r.text
    return float(next(x for x in r.text.splitlines() if x.startswith("storage_agent_usage_scans_total ")).split()[1])


def test_moves_within_the_vfolder_cost_no_rescan(watched: tuple[AgentProcess, httpx.Client, str]) -> None:
    """The doubts above are for moves *out*: a directory renamed within the vfolder (and a file created in
    it first) is followed by walking it at its new place, never by a full rescan."""
    agent, api, _ = watched
    vf = _new_vfolder(api, agent)
    p = vf.path
    _ckpt(p / "a", 2)
    (p / "deep" / "er").mkdir(parents=True)
    settled_and_right(vf, quiet=1.0)
    before = _scans(api)
    here, there = p / "a", p / "deep" / "er" / "a"
    for i in range(6):
        (here / f"n{i}").write_bytes(b"n" * 100)
        os.rename(here, there)
        here, there = there, here
        settled_and_right(vf, quiet=0.3)
    assert _scans(api) == before


def _kernel_watched_inodes(inotify_fd: int) -> set[int]:
    """The inodes the kernel holds a watch on for this inotify descriptor (``/proc/self/fdinfo``)."""
    inos = set()
    with open(f"/proc/self/fdinfo/{inotify_fd}") as f:
        for line in f:
            if line.startswith("inotify"):
                fields = dict(kv.split(":", 1) for kv in line.split()[1:])
                inos.add(int(fields["ino"], 16))
    return inos


def test_a_watch_renewed_at_a_new_path_survives_forgetting_the_old_one(tmp_path: Path) -> None:
    """A directory renamed within the vfolder is walked at its new path (a scanner thread adds its watch
    again: the kernel answers the same descriptor) while the event loop forgets its old path. The watcher
    used to let the forget remove the kernel's watch between the two, and still record the directory as
    watched: no event from it ever again (fuzzer, inotify: entries lost with ``stale: false``). Racy by
    nature, so the two sides are run against each other many times (bounded to a few seconds)."""
    import threading

    from agent.engine.usage.watch_inotify import InotifyWatcher

    watcher = InotifyWatcher()
    vf = "vf"
    d = tmp_path / "d"
    d.mkdir()
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    ino = os.fstat(fd).st_ino
    try:
        end = time.monotonic() + 3.0
        rounds = 0
        while time.monotonic() < end:
            old, new = f"old{rounds}", f"new{rounds}"
            watcher.watch(vf, old, fd)
            go = threading.Event()

            def renew(new: str = new, go: threading.Event = go) -> None:
                go.wait()
                watcher.watch(vf, new, fd)

            t = threading.Thread(target=renew)
            t.start()
            go.set()
            for _ in range(200):  # hold the GIL on the forgetting side, as a busy event loop does
                watcher.forget(vf, [(old, ino)])
            t.join()
            recorded = any(entry[3] == ino for entry in watcher._by_wd.values())  # noqa: SLF001
            kernel = ino in _kernel_watched_inodes(watcher._ino.fd)  # noqa: SLF001
            assert not recorded or kernel, f"round {rounds}: recorded as watched, but the kernel has no watch"
            rounds += 1
    finally:
        os.close(fd)
        watcher.close()


def test_forgetting_a_directory_that_left_keeps_the_watch_of_one_met_at_its_path(tmp_path: Path) -> None:
    """During a rotation a walk meets directory B at the path ``ckpt`` the tree gives A (and adds B's watch
    there); the walk is discarded and B stays in the tree at ``ckpt.new``. When A later leaves ``ckpt``,
    the watcher used to drop whatever watch was last added at that path: B's, so B's changes reached no
    event again while it stayed in the vfolder. Only the directory that left loses its watch."""
    from agent.engine.usage.watch_inotify import InotifyWatcher

    watcher = InotifyWatcher()
    vf = "vf"
    fds = {}
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        fds[name] = os.open(tmp_path / name, os.O_RDONLY | os.O_DIRECTORY)
    ino_a, ino_b = os.fstat(fds["a"]).st_ino, os.fstat(fds["b"]).st_ino
    try:
        watcher.watch(vf, "ckpt", fds["a"])
        watcher.watch(vf, "ckpt.new", fds["b"])
        watcher.watch(vf, "ckpt", fds["b"])  # the discarded walk met B at ckpt; the tree keeps B at ckpt.new
        watcher.forget(vf, [("ckpt", ino_a)])  # A left ckpt
        watched = _kernel_watched_inodes(watcher._ino.fd)  # noqa: SLF001
        assert ino_b in watched, "the watch of B (still in the vfolder) was dropped"
        assert ino_a not in watched, "the watch of A (gone) was kept"
    finally:
        for fd in fds.values():
            os.close(fd)
        watcher.close()
