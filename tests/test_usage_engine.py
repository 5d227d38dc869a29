"""The live usage engine against real inotify / fanotify, a real agent process and real directories.

After every change, the answer of ``/folder/usage`` and ``/folder/used-bytes`` must equal a fresh walk of
the tree (entries and st_size sum, and ``du -s -B1``-style allocated bytes). Polls use a generous deadline:
correctness is asserted here, speed is benchmarked in bench/usage_bench.py.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from backends.rmtree import remove_tree
from backends.walk import tree_usage
from tests.support import AgentProcess, assert_clean_log, eventually, make_agent, walk

DEADLINE = 20.0


class VF:
    def __init__(self, api: httpx.Client, agent: AgentProcess, vfid: str) -> None:
        self.api = api
        self.vfid = vfid
        qsid, hexid = vfid.split("/")
        self.path = agent.volume_root() / qsid / hexid[:2] / hexid[2:4] / hexid[4:]

    def usage(self) -> dict[str, Any]:
        r = self.api.request("GET", "/folder/usage", json={"volume": "local", "vfid": self.vfid})
        assert r.status_code == 200, r.text
        return r.json()

    def used_bytes(self) -> dict[str, Any]:
        r = self.api.request("GET", "/folder/used-bytes", json={"volume": "local", "vfid": self.vfid})
        assert r.status_code == 200, r.text
        return r.json()

    def check(self, settled: bool = False) -> None:
        count, size, alloc = walk(self.path)
        u = self.usage()
        assert (u["file_count"], u["used_bytes"]) == (count, size), (u, count, size)
        if settled:  # and no longer flagged: a rescan the engine asked for (e.g. a tree moved out) has landed
            assert u["stale"] is False, u
        assert self.used_bytes()["used_bytes"] == alloc

    def converges(self, settled: bool = False) -> None:
        eventually(lambda: self.check(settled))


def _new_vfolder(api: httpx.Client, agent: AgentProcess) -> VF:
    qsid = f"qs-{uuid.uuid4().hex[:8]}"
    r = api.post("/quota-scope", json={"volume": "local", "qsid": qsid})
    assert r.status_code == 204, r.text
    vfid = f"{qsid}/{uuid.uuid4().hex}"
    r = api.post("/folder/create", json={"volume": "local", "vfid": vfid})
    assert r.status_code == 204, r.text
    return VF(api, agent, vfid)






def test_usage_follows_every_kind_of_change(watched: tuple[AgentProcess, httpx.Client, str], tmp_path: Path) -> None:
    agent, api, _kind = watched
    vf = _new_vfolder(api, agent)
    u = vf.usage()
    assert (u["file_count"], u["used_bytes"]) == (0, 0)
    p = vf.path

    (p / "a.bin").write_bytes(os.urandom(10_000))  # create
    vf.converges()
    with open(p / "a.bin", "ab") as f:  # append
        f.write(os.urandom(70_000))
    vf.converges()
    os.truncate(p / "a.bin", 5)  # truncate
    vf.converges()
    (p / "d1" / "d2").mkdir(parents=True)  # nested directories, filled right away
    for i in range(20):
        (p / "d1" / "d2" / f"f{i}").write_bytes(b"x" * (i * 1000))
    vf.converges()
    os.rename(p / "a.bin", p / "b.bin")  # rename within a directory
    os.rename(p / "b.bin", p / "d1" / "b.bin")  # ... and across directories
    os.rename(p / "d1" / "d2", p / "d3")  # a directory moved across directories
    vf.converges()
    (p / "d3" / "late.bin").write_bytes(os.urandom(3000))  # the moved directory is still watched
    vf.converges()
    os.link(p / "d1" / "b.bin", p / "d3" / "hard")  # hard links: allocation counted once
    os.link(p / "d3" / "f5", p / "f5-again")
    vf.converges()
    with open(p / "d3" / "hard", "ab") as f:  # grown through one name, seen through both
        f.write(os.urandom(50_000))
    vf.converges()
    os.symlink("d1/b.bin", p / "link")  # symlinks are counted, never followed
    os.symlink("/etc", p / "out-link")
    vf.converges()
    outside = tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    for i in range(30):
        (outside / "sub" / f"o{i}").write_bytes(os.urandom(700))
    os.rename(outside, p / "moved-in")  # a tree moved in from outside the vfolder
    vf.converges()
    (p / "moved-in" / "sub" / "new").write_bytes(b"y" * 123)  # and it is watched
    vf.converges()
    os.rename(p / "moved-in", tmp_path / "moved-out")  # a tree moved out of the vfolder
    vf.converges()
    (tmp_path / "moved-out" / "sub" / "after").write_bytes(b"z" * 999)  # no longer counted
    vf.converges()
    shutil.rmtree(p / "d3")  # delete a tree
    vf.converges(settled=True)
    u = vf.usage()
    assert u["source"] in ("watch", "scan") and u["stale"] is False


def test_a_moved_tree_is_followed_at_its_new_place(watched: tuple[AgentProcess, httpx.Client, str]) -> None:
    """Changes deep inside a directory tree after it moved (within the vfolder, twice, then out of it) are
    counted at the new place: the watchers' knowledge of where a directory is must follow the move."""
    agent, api, _kind = watched
    vf = _new_vfolder(api, agent)
    p = vf.path
    (p / "a" / "b" / "c").mkdir(parents=True)
    (p / "keep" / "deep").mkdir(parents=True)
    (p / "a" / "b" / "c" / "f").write_bytes(b"1" * 100)  # events from every level: their places are known
    (p / "a" / "b" / "g").write_bytes(b"2" * 200)
    (p / "keep" / "deep" / "h").write_bytes(b"3" * 300)
    vf.converges()
    os.rename(p / "a", p / "keep" / "z")
    (p / "keep" / "z" / "b" / "c" / "f2").write_bytes(b"4" * 4000)
    with open(p / "keep" / "deep" / "h", "ab") as f:  # a sibling tree's place stays right
        f.write(b"5" * 500)
    vf.converges()
    os.rename(p / "keep" / "z" / "b", p / "b2")
    with open(p / "b2" / "c" / "f", "ab") as f:
        f.write(b"6" * 6000)
    vf.converges()
    os.rename(p / "b2", p.parent / f"{p.name}-away")  # out of the vfolder: later changes are not counted
    try:
        (p.parent / f"{p.name}-away" / "c" / "late").write_bytes(b"7" * 7000)
        (p / "keep" / "after").write_bytes(b"8" * 80)
        vf.converges()
    finally:
        shutil.rmtree(p.parent / f"{p.name}-away")


def _catalog_commits(api: httpx.Client) -> float:
    r = api.get("/metrics")
    assert r.status_code == 200, r.text
    line = next(x for x in r.text.splitlines() if x.startswith("storage_agent_catalog_commits_total "))
    return float(line.split()[1])


def test_a_burst_of_files_is_coalesced_into_few_catalogue_transactions(
    watched: tuple[AgentProcess, httpx.Client, str], tmp_path: Path
) -> None:
    """``cp -r`` of 6,000 files in 60 directories: the figure ends right, and the catalogue saw a small
    number of transactions (each re-read gathers a burst's events; writes share commits), not one per file."""
    agent, api, _kind = watched
    vf = _new_vfolder(api, agent)
    vf.converges()
    src = tmp_path / "src"
    for d in range(60):
        (src / f"d{d:02}").mkdir(parents=True)
        for f in range(100):
            (src / f"d{d:02}" / f"f{f:03}").write_bytes(b"x" * (d + f))
    files = 60 * 100
    before = _catalog_commits(api)
    subprocess.run(["cp", "-r", str(src), str(vf.path / "copy")], check=True)
    vf.converges()
    commits = _catalog_commits(api) - before
    assert 0 < commits <= files / 20, f"{commits:.0f} catalogue commits for {files} files"


def test_first_sight_of_a_vfolder_made_behind_the_agents_back(agent: AgentProcess, api: httpx.Client) -> None:
    vf = _new_vfolder(api, agent)
    hidden = VF(api, agent, f"{vf.vfid.split('/')[0]}/{uuid.uuid4().hex}")
    (hidden.path / "x" / "y").mkdir(parents=True)
    (hidden.path / "x" / "y" / "z").write_bytes(os.urandom(4321))
    u = hidden.usage()  # never measured: scanned at once, answered within the bounded wait
    assert (u["file_count"], u["used_bytes"]) == walk(hidden.path)[:2]
    hidden.converges()
    r = api.request(
        "GET", "/folder/usage", json={"volume": "local", "vfid": f"{vf.vfid.split('/')[0]}/{uuid.uuid4().hex}"}
    )
    assert 400 <= r.status_code < 500


def test_quota_scope_usage_is_the_sum_of_its_vfolders(agent: AgentProcess, api: httpx.Client) -> None:
    a = _new_vfolder(api, agent)
    qsid = a.vfid.split("/")[0]
    b = VF(api, agent, f"{qsid}/{uuid.uuid4().hex}")
    r = api.post("/folder/create", json={"volume": "local", "vfid": b.vfid})
    assert r.status_code == 204
    (a.path / "one").write_bytes(os.urandom(200_000))
    (b.path / "two").write_bytes(os.urandom(300_000))
    a.converges()
    b.converges()

    def scope_sum() -> None:
        r = api.request("GET", "/quota-scope", json={"volume": "local", "qsid": qsid})
        assert r.status_code == 200
        assert r.json()["used_bytes"] == walk(a.path)[2] + walk(b.path)[2]

    eventually(scope_sum)


def test_deleted_and_cloned_vfolders_are_followed(agent: AgentProcess, api: httpx.Client) -> None:
    vf = _new_vfolder(api, agent)
    (vf.path / "d").mkdir()
    (vf.path / "d" / "f").write_bytes(os.urandom(5000))
    vf.converges()
    clone = VF(api, agent, f"{vf.vfid.split('/')[0]}/{uuid.uuid4().hex}")
    r = api.post("/folder/clone", json={"src_volume": "local", "src_vfid": vf.vfid, "dst_vfid": clone.vfid})
    assert r.status_code == 204, r.text
    clone.converges()
    (clone.path / "d" / "more").write_bytes(os.urandom(100))
    clone.converges()
    r = api.post("/folder/delete", json={"volume": "local", "vfid": vf.vfid})
    assert r.status_code == 204
    r = api.request("GET", "/folder/usage", json={"volume": "local", "vfid": vf.vfid})
    assert 400 <= r.status_code < 500


def _start_with_tiny_inotify_queue(proc: AgentProcess) -> None:
    """The queue size is fixed when the agent creates its inotify instance: lower the (machine-wide) knob
    only for the agent's start, and restore it at once."""
    knob = Path("/proc/sys/fs/inotify/max_queued_events")
    old = knob.read_text()
    try:
        knob.write_text("64\n")
    except OSError as e:
        pytest.skip(f"cannot lower {knob}: {e.strerror}")
    try:
        proc.start()
    finally:
        knob.write_text(old)


def test_queue_overflow_marks_stale_then_the_rescan_lands(tmp_path: Path) -> None:
    proc = make_agent(tmp_path / "agent", usage={"watcher": "inotify", "scan-threads": 1})
    _start_with_tiny_inotify_queue(proc)  # its queue holds 64 events
    try:
        with proc.client() as api:
            vf = _new_vfolder(api, proc)
            for d in range(150):  # enough entries that the rescan takes a while: the stale figure can be seen
                (vf.path / f"d{d}").mkdir()
                for i in range(200):
                    (vf.path / f"d{d}" / f"f{i}").touch()
            vf.converges()
            before = vf.usage()
            proc.proc.send_signal(signal.SIGSTOP)  # the agent reads nothing meanwhile: the queue must overflow
            try:
                for i in range(2000):  # far more events than the queue holds
                    (vf.path / f"f{i}").write_bytes(b"x" * i)
            finally:
                proc.proc.send_signal(signal.SIGCONT)
            want = before["file_count"] + 2000
            answers = [vf.usage()]
            deadline = time.monotonic() + DEADLINE
            while time.monotonic() < deadline and (answers[-1]["stale"] or answers[-1]["file_count"] != want):
                answers.append(vf.usage())
            # while the rescan runs, a figure is still served (never -1), flagged stale
            assert any(u["stale"] for u in answers), answers[:3]
            assert all(u["file_count"] >= before["file_count"] for u in answers)
            vf.converges()
            assert vf.usage()["stale"] is False
    finally:
        proc.stop()
    assert "queue overflowed" in proc.log()
    assert_clean_log(proc)


def _inotify_watches_in_use() -> int:
    """Watches held on the machine now (every process's inotify descriptors): at least root's share."""
    total = 0
    for info in Path("/proc").glob("[0-9]*/fdinfo/*"):
        try:
            total += info.read_text().count("inotify wd:")
        except OSError:  # the process or descriptor went away
            pass
    return total


def test_running_out_of_inotify_watches_flags_stale_and_rescans_on_schedule(tmp_path: Path) -> None:
    """max_user_watches exhausted: the figure is served flagged stale, and the fallback rescans keep it right
    (changes in directories that got no watch included)."""
    knob = Path("/proc/sys/fs/inotify/max_user_watches")
    old = knob.read_text()
    proc = make_agent(tmp_path / "agent", usage={"watcher": "inotify", "fallback-rescan-interval": "1s"})
    try:
        knob.write_text(f"{_inotify_watches_in_use() + 30}\n")  # machine-wide: restored in finally
    except OSError as e:
        pytest.skip(f"cannot lower {knob}: {e.strerror}")
    try:
        proc.start()
        with proc.client() as api:
            vf = _new_vfolder(api, proc)
            for d in range(120):  # far more directories than watches left
                (vf.path / f"d{d:03d}").mkdir()
                (vf.path / f"d{d:03d}" / "f").write_bytes(b"x" * d)
            vf.converges()
            eventually(lambda: vf.usage()["stale"] is True)
            (vf.path / "d119" / "late").write_bytes(b"y" * 1000)  # very likely a directory without a watch
            vf.converges()
            assert vf.usage()["stale"] is True  # still not fully watched: flagged, never -1
    finally:
        knob.write_text(old)
        proc.stop()
    assert "cannot watch all of vfolder" in proc.log()
    assert_clean_log(proc)


def test_kill_during_a_scan_then_restart_gives_right_figures(tmp_path: Path) -> None:
    proc = make_agent(tmp_path / "agent", usage={"watcher": "inotify", "scan-threads": 1})
    proc.start()
    try:
        with proc.client() as api:
            vf = _new_vfolder(api, proc)
            for d in range(200):
                sub = vf.path / f"d{d}"
                sub.mkdir()
                for i in range(50):
                    (sub / f"f{i}").write_bytes(b"x" * i)
            vf.converges()
        proc.stop()
        for d in range(0, 200, 3):  # changed while the agent is down: only a rescan can know
            shutil.rmtree(vf.path / f"d{d}")
        proc.start()  # its start-up scan of 7000 entries is under way ...
        proc.kill()  # ... when it is killed
        proc.start()
        with proc.client() as api:
            vf.api = api
            vf.converges()
            assert vf.usage()["stale"] is False
    finally:
        proc.stop()
    assert_clean_log(proc)


def test_scan_command_rescans_and_records(tmp_path: Path) -> None:
    proc = make_agent(tmp_path / "agent", usage={"watcher": "none"})
    proc.start()
    try:
        with proc.client() as api:
            vf = _new_vfolder(api, proc)
            vf.converges()
            (vf.path / "unseen").write_bytes(os.urandom(9999))  # no watcher: only a scan sees it
            out = subprocess.run(
                [os.sys.executable, "-m", "agent", "scan", "--config", str(proc.config_path), "--vfid", vf.vfid],
                capture_output=True,
                text=True,
                timeout=120,
                cwd=proc.workdir,
            )
            assert out.returncode == 0, out.stderr
            count, size, _ = walk(vf.path)
            assert f"{vf.vfid}" in out.stdout and f"{count} entries" in out.stdout
            vf.converges()  # the running agent picked up the request and rescanned
            assert vf.usage()["used_bytes"] == size
    finally:
        proc.stop()
    assert_clean_log(proc)


def test_a_vfolder_removed_behind_the_agents_back_is_forgotten(watched: tuple[AgentProcess, httpx.Client, str]) -> None:
    agent, api, _kind = watched
    vf = _new_vfolder(api, agent)
    (vf.path / "d").mkdir()
    (vf.path / "d" / "f").write_bytes(os.urandom(1000))
    vf.converges()
    shutil.rmtree(vf.path)

    def gone() -> None:
        r = api.request("GET", "/folder/usage", json={"volume": "local", "vfid": vf.vfid})
        assert 400 <= r.status_code < 500, r.text

    eventually(gone)


def test_changes_deeper_than_path_max_are_counted(watched: tuple[AgentProcess, httpx.Client, str]) -> None:
    """A directory whose path the kernel cannot print (ENAMETOOLONG): the vfolder is rescanned, never crashes."""
    agent, api, _kind = watched
    vf = _new_vfolder(api, agent)

    def check() -> None:  # the reference walk goes by descriptors: the path is too long for path-based calls
        tree = tree_usage(vf.path)
        u = vf.usage()
        assert (u["file_count"], u["used_bytes"]) == (tree.entries, tree.size_bytes), (u, tree)
        assert vf.used_bytes()["used_bytes"] == tree.allocated_bytes

    fd = os.open(vf.path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(1100):  # 1100 * len("dir/") > PATH_MAX (4096)
            os.mkdir("dir", dir_fd=fd)
            nxt = os.open("dir", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nxt
        eventually(check)
        with open(os.open("deep.bin", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd), "wb") as f:
            f.write(os.urandom(50_000))
    finally:
        os.close(fd)
    try:
        eventually(check)
    finally:
        remove_tree(vf.path / "dir")  # pytest's own clean-up recurses and cannot remove such a tree
