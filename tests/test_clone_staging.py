"""A clone whose staging directory is removed or replaced while it copies (another process's start-up
reconciliation, an operator cleaning ``.staging``): the clone fails with 409 naming its staging directory,
publishes nothing at any moment, leaves its job failed and no catalogue row, and never removes a tree
someone else put under its staging name. Asked again, it succeeds. A real agent, real files.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest

from tests.support import AgentProcess, assert_clean_log, eventually, make_agent, new_vfolder, walk

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
        with agent.client() as api:
            src_vfid = new_vfolder(api, "qs")
        src = _root(agent, src_vfid)
        for d in range(DIRS):
            (src / f"d{d:03}").mkdir()
            for f in range(FILES):
                (src / f"d{d:03}" / f"f{f}").write_bytes(b"x" * (f % 5))
        dst_vfid = f"qs/{uuid.uuid4().hex}"
        dst = _root(agent, dst_vfid)
        staging = agent.volume_root() / "qs" / ".staging"
        body = {"src_volume": "local", "src_vfid": src_vfid, "dst_volume": "local", "dst_vfid": dst_vfid}
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
