"""A clone whose staging directory is removed or replaced while it copies (another process's start-up
reconciliation, an operator cleaning ``.staging``): the clone fails with 409 naming its staging directory,
publishes nothing at any moment, leaves its job failed and no catalogue row, and never removes a tree
someone else put under its staging name. Asked again, it succeeds. A real agent, real files.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import sqlite3
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest

from backends.copytree import CancelFlag, CopyCancelled, copy_tree
from tests.support import AgentProcess, assert_clean_log, eventually, filled_vfolder, make_agent, walk

DIRS, FILES = 60, 200  # 12,060 entries: a copy of several seconds here, room to act in the middle


def _root(agent: AgentProcess, vfid: str) -> Path:
    qsid, folder = vfid.split("/")
    return agent.volume_root() / qsid / folder[:2] / folder[2:4] / folder[4:]


def _rows(agent: AgentProcess, sql: str, *args: object) -> list[tuple[object, ...]]:
    con = sqlite3.connect(f"file:{agent.workdir / 'catalog.db'}?mode=ro", uri=True, timeout=10)
    try:
        return con.execute(sql, args).fetchall()
    finally:
        con.close()


def _big_clone(agent: AgentProcess) -> tuple[Path, str, Path, Path, dict[str, str]]:
    """A source vfolder of DIRS x FILES entries and what a clone of it needs: (source root, destination
    vfid, destination root, the scope's staging directory, the clone request's body)."""
    with agent.client() as api:
        src_vfid, src = filled_vfolder(agent, api, DIRS, FILES)
    dst_vfid = f"qs/{uuid.uuid4().hex}"
    body = {"src_volume": "local", "src_vfid": src_vfid, "dst_volume": "local", "dst_vfid": dst_vfid}
    return src, dst_vfid, _root(agent, dst_vfid), agent.volume_root() / "qs" / ".staging", body


def _copying(staging: Path, at_least: int) -> Path:
    """The clone's staging directory once the copy has written ``at_least`` of its top-level directories."""
    works = [p for p in staging.iterdir() if p.name.startswith("clone-")] if staging.is_dir() else []
    assert works, "the clone has not staged anything yet"
    assert len(os.listdir(works[0])) >= at_least, "the copy has barely started"
    return works[0]


@pytest.mark.parametrize("how", ["removed", "replaced"])
def test_a_clone_whose_staging_is_taken_away_fails_cleanly_and_publishes_nothing(tmp_path: Path, how: str) -> None:
    agent = make_agent(tmp_path).start(timeout=60)
    try:
        src, dst_vfid, dst, staging, body = _big_clone(agent)
        answer: list[httpx.Response] = []
        seen_published: list[int] = []  # entries of the destination whenever it was seen (it never may be)
        done = threading.Event()

        def clone() -> None:
            try:
                with agent.client() as api:
                    answer.append(api.post("/folder/clone", json=body))
            finally:
                done.set()

        def watch() -> None:
            while not done.is_set():
                if os.path.lexists(dst):
                    seen_published.append(len(os.listdir(dst)) if dst.is_dir() else -1)
                time.sleep(0.001)

        threads = [threading.Thread(target=clone), threading.Thread(target=watch)]
        for t in threads:
            t.start()
        work = eventually(lambda: _copying(staging, 5), timeout=60)
        planted = None
        if how == "removed":  # as a reconciliation's sweep does: the tree removed under the running copy
            shutil.rmtree(work, ignore_errors=True)
        else:  # moved aside and another directory put under its name
            aside = agent.volume_root() / f"aside-{uuid.uuid4().hex[:6]}"
            os.rename(work, aside)
            work.mkdir()
            planted = work / "planted"
            planted.write_bytes(b"someone else's")
        for t in threads:
            t.join(300)
        assert answer, "the clone did not answer"
        r = answer[0]
        assert r.status_code == 409, r.text
        assert "staging directory" in r.json()["msg"] and "nothing was published" in r.json()["msg"], r.text
        assert seen_published == [], f"a destination was visible: {seen_published}"
        assert not os.path.lexists(dst)
        assert _rows(agent, "SELECT count(*) FROM vfolders WHERE folder_id = ?", dst_vfid[3:]) == [(0,)]
        (state, error), = _rows(agent, "SELECT state, error FROM jobs WHERE kind = 'clone'")
        assert state == "failed" and "staging directory" in str(error), (state, error)
        if planted is not None:
            assert planted.read_bytes() == b"someone else's"  # never removed: not the clone's own
            assert os.listdir(aside) == []  # the clone's own copy was emptied through its descriptor
            shutil.rmtree(work)
            aside.rmdir()
        with agent.client() as api:  # asked again, the clone completes
            r = api.post("/folder/clone", json=body)
            assert r.status_code == 204, r.text
        assert walk(dst)[:2] == walk(src)[:2]
        assert not staging.exists() or os.listdir(staging) == []
    finally:
        agent.stop()
    assert_clean_log(agent)


def _settled(agent: AgentProcess, dst: Path, dst_vfid: str) -> bool:
    """Disk and catalogue agree on a cancelled clone's destination: either published, recorded and its job
    done, or absent, unrecorded, its job failed and no staged copy left. Whether it was published."""
    published = os.path.lexists(dst)
    rows = _rows(agent, "SELECT count(*) FROM vfolders WHERE folder_id = ?", dst_vfid[3:])
    jobs = _rows(agent, "SELECT state, error FROM jobs WHERE kind = 'clone'")
    staging = agent.volume_root() / "qs" / ".staging"
    assert rows == [(1 if published else 0,)], f"on disk: {published}, catalogue rows: {rows}, jobs: {jobs}"
    assert len(jobs) == 1 and jobs[0][0] == ("done" if published else "failed"), (published, jobs)
    assert not staging.exists() or os.listdir(staging) == [], os.listdir(staging)
    return published


@pytest.mark.parametrize("num_proc", [1, 2])
def test_a_clone_cancelled_by_a_stop_leaves_disk_and_catalogue_agreeing(tmp_path: Path, num_proc: int) -> None:
    """SIGTERM with a short ``stop-timeout`` cancels a clone mid-copy: its copy thread must stop and roll back
    (or, had it published, be recorded), never publish after its job was failed; a restart changes nothing.
    The moment of the stop is drawn from a seed (printed) over the copy's run."""
    seed = int(os.environ.get("CLONE_CANCEL_SEED", time.time_ns() % 10**6))
    print(f"seed {seed}")
    rng = random.Random(seed)
    agent = make_agent(tmp_path, storage_proxy={"stop-timeout": "1s", "num-proc": num_proc}).start(timeout=60)
    try:
        src, dst_vfid, dst, staging, body = _big_clone(agent)
        answer: list[object] = []

        def clone() -> None:
            try:
                with agent.client() as api:
                    answer.append(api.post("/folder/clone", json=body))
            except httpx.HTTPError as e:  # the connection closed by the stopping agent
                answer.append(e)

        t = threading.Thread(target=clone)
        t.start()
        eventually(lambda: _copying(staging, rng.randint(1, DIRS // 4)), timeout=60)
        assert agent.proc is not None
        agent.proc.send_signal(signal.SIGTERM)
        assert agent.proc.wait(120) == 0
        t.join(60)
        assert answer, "the clone request never ended"
        published = _settled(agent, dst, dst_vfid)
        if published:
            assert walk(dst)[:2] == walk(src)[:2]
        time.sleep(1)  # a copy thread left running would publish now
        assert _settled(agent, dst, dst_vfid) == published
        agent.start(timeout=60)  # the full start-up reconciliation finds nothing to change
        assert _settled(agent, dst, dst_vfid) == published
        with agent.client() as api:
            r = api.post("/folder/clone", json=body)  # asked again: done, or refused as existing
            assert r.status_code == (409 if published else 204), r.text
        assert walk(dst)[:2] == walk(src)[:2]
        assert _rows(agent, "SELECT count(*) FROM vfolders WHERE folder_id = ?", dst_vfid[3:]) == [(1,)]
    finally:
        agent.stop()
    assert_clean_log(agent)


def test_a_cancel_flag_says_exactly_whether_the_publish_happened(tmp_path: Path) -> None:
    """Cancel racing the publishing rename, many times on real directories: what ``cancel()`` answers is
    always what the disk shows, and a cancelled copy stops."""
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_bytes(b"x")
    flag = CancelFlag()
    flag.cancel()
    s, d = os.open(src, os.O_RDONLY | os.O_DIRECTORY), os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(CopyCancelled):
            copy_tree(s, d, cancel=flag)
    finally:
        os.close(s)
        os.close(d)
    seed = int(os.environ.get("CLONE_CANCEL_SEED", time.time_ns() % 10**6))
    print(f"seed {seed}")
    rng = random.Random(seed)
    seen = {True: 0, False: 0}
    for i in range(200):
        wait = rng.random() * 2e-3
        staged, dst = tmp_path / f"staged{i}", tmp_path / f"dst{i}"
        staged.mkdir()
        flag = CancelFlag()

        def publish(flag: CancelFlag = flag, staged: Path = staged, dst: Path = dst, wait: float = wait) -> None:
            time.sleep(wait)
            try:
                with flag.publishing():
                    os.rename(staged, dst)
            except CopyCancelled:
                pass

        t = threading.Thread(target=publish)
        t.start()
        time.sleep(rng.random() * 2e-3)
        published = flag.cancel()
        t.join()
        assert published == dst.exists() == (not staged.exists()), i
        seen[published] += 1
    print(f"published before the cancel: {seen[True]}, cancelled first: {seen[False]}")
