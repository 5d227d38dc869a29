"""SIGKILL of the real agent in the middle of each stateful operation, then a restart: nothing lost, nothing
half-made visible, the operation rolled back or finished.

Every kill point is checked to have landed mid-operation (the staged clone or the trash of a delete existed,
the scan's figures had not been recorded, the upgrade's transaction was open) -- a kill after completion
proves nothing. tus uploads (tests/test_client_restart.py) and layout migration (tests/test_migrate.py,
test_killed_mid_run_then_resumed_moves_each_folder_exactly_once) have their own kill -9 tests.

Two ways to stop the agent at a chosen point: polling the filesystem (the staging area appears, fills,
empties) and holding the catalogue's write lock from this process, so the agent finishes its disk work and
then waits for the catalogue -- the window between "done on disk" and "recorded" that a timer never hits.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from catalog import Catalog
from catalog.migrations import SCHEMA_VERSION, STEPS
from tests.support import ROOT, AgentProcess, assert_clean_log, eventually, make_agent, walk
from tests.test_catalog_recovery import (
    assert_catalogue_matches_disk,
    assert_usage_right,
    catalogue_rows,
    catalogue_vfolders,
    tree_digest,
    vpath,
    wait_for,
)

# -- helpers ---------------------------------------------------------------------------------------------


class Call:
    """One manager-API request in a thread (it blocks until the operation ends, or the agent dies)."""

    def __init__(self, agent: AgentProcess, path: str, body: dict[str, Any]) -> None:
        self.response: httpx.Response | None = None
        self.error: BaseException | None = None

        def run() -> None:
            try:
                with agent.client() as api:
                    self.response = api.post(path, json=body)
            except httpx.HTTPError as e:
                self.error = e

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def join(self) -> None:
        self.thread.join(30)
        assert not self.thread.is_alive()


@contextmanager
def catalogue_write_lock(db: Path) -> Iterator[None]:
    """Hold SQLite's write lock: the agent's next catalogue write waits (its busy timeout is 10 s)."""
    con = sqlite3.connect(db, timeout=10, isolation_level=None)
    con.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        con.execute("ROLLBACK")
        con.close()


def staged(root: Path, qsid: str, prefix: str) -> list[Path]:
    staging = root / qsid / ".staging"
    try:
        return [p for p in staging.iterdir() if p.name.startswith(prefix)]
    except FileNotFoundError:
        return []


def count_files(top: Path) -> int:
    n = 0
    for _dirpath, _dirs, files in os.walk(top):
        n += len(files)
    return n


def create_scope(api: httpx.Client, qsid: str) -> None:
    assert api.post("/quota-scope", json={"volume": "local", "qsid": qsid}).status_code == 204


def create_vfolder(api: httpx.Client, qsid: str) -> str:
    vfid = f"{qsid}/{uuid.uuid4().hex}"
    assert api.post("/folder/create", json={"volume": "local", "vfid": vfid}).status_code == 204
    return vfid


def no_staging_left(root: Path) -> None:
    left = [str(p) for p in root.glob("*/.staging")]
    assert not left, f"staging leftovers after start-up: {left}"


@dataclass
class Volume:
    """One agent and its vfolders, shared by the kill points of one operation (restored after each)."""

    agent: AgentProcess
    digests: dict[str, str] = field(default_factory=dict)  # vfid -> tree digest of what must survive

    @property
    def root(self) -> Path:
        return self.agent.volume_root()

    @property
    def db(self) -> Path:
        return Path(self.agent.config["catalog"]["path"])

    def assert_intact(self) -> None:
        for vfid, digest in self.digests.items():
            assert tree_digest(vpath(self.root, vfid)) == digest, f"{vfid} changed"


def bystanders(api: httpx.Client, root: Path, qsid: str) -> dict[str, str]:
    """A small vfolder in the operation's scope and one in another scope: they must never change."""
    other = f"qs-other-{uuid.uuid4().hex[:6]}"
    create_scope(api, other)
    out = {}
    for q in (qsid, other):
        vfid = create_vfolder(api, q)
        base = vpath(root, vfid)
        (base / "keep").mkdir()
        (base / "keep" / "data.bin").write_bytes(os.urandom(12345))
        os.symlink("keep/data.bin", base / "link")
        out[vfid] = tree_digest(base)
    return out


# -- clone -----------------------------------------------------------------------------------------------

CLONE_DIRS, CLONE_FILES, CLONE_FILE_SIZE = 20, 100, 128 * 1024  # 2000 files, 250 MiB of real bytes


@pytest.fixture(scope="module")
def clone_volume(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Volume, str, str]]:
    agent = make_agent(tmp_path_factory.mktemp("clone") / "a").start()
    try:
        with agent.client() as api:
            create_scope(api, "src")
            create_scope(api, "dst")
            src = create_vfolder(api, "src")
            blob = os.urandom(CLONE_FILE_SIZE + CLONE_FILES)
            base = vpath(agent.volume_root(), src)
            for d in range(CLONE_DIRS):
                (base / f"d{d}").mkdir()
                for i in range(CLONE_FILES):
                    (base / f"d{d}" / f"f{i}").write_bytes(blob[i : i + CLONE_FILE_SIZE])
            os.symlink("d0/f0", base / "link")
            vol = Volume(agent, {src: tree_digest(base)})
            vol.digests.update(bystanders(api, agent.volume_root(), "dst"))
            eventually(lambda: assert_usage_right(api, agent, src), timeout=60)
    finally:
        agent.stop()
    yield vol, src, "dst"
    assert_clean_log(agent)


def _clone_body(src: str, dst: str) -> dict[str, Any]:
    return {"src_volume": "local", "src_vfid": src, "dst_vfid": dst}


TOTAL_CLONE_FILES = CLONE_DIRS * CLONE_FILES + 1

CLONE_POINTS: dict[str, Callable[[Path], bool]] = {  # kill when the staged copy ...
    "staging-appeared": lambda work: True,
    "quarter-copied": lambda work: count_files(work) >= TOTAL_CLONE_FILES // 4,
    "three-quarters-copied": lambda work: count_files(work) >= 3 * TOTAL_CLONE_FILES // 4,
}


@pytest.mark.parametrize("point", [*CLONE_POINTS, "published-not-yet-recorded"])
def test_clone_killed_midway(clone_volume: tuple[Volume, str, str], point: str) -> None:
    vol, src, qsid = clone_volume
    agent, root = vol.agent, vol.root
    dst = f"{qsid}/{uuid.uuid4().hex}"
    agent.start()
    try:
        if point in CLONE_POINTS:
            call = Call(agent, "/folder/clone", _clone_body(src, dst))
            assert wait_for(lambda: staged(root, qsid, "clone-")), "the clone never staged anything"
            work = staged(root, qsid, "clone-")[0]
            assert wait_for(lambda: CLONE_POINTS[point](work) or not work.exists())
            agent.kill()
            # the kill landed mid-copy: the staged tree is there, partial, and nothing is published
            assert work.exists() and not vpath(root, dst).exists()
            assert CLONE_POINTS[point](work) and count_files(work) < TOTAL_CLONE_FILES, count_files(work)
        else:
            call = Call(agent, "/folder/clone", _clone_body(src, dst))
            assert wait_for(lambda: staged(root, qsid, "clone-")), "the clone never staged anything"
            with catalogue_write_lock(vol.db):  # the job row is written: copy and publish, then wait for us
                assert wait_for(lambda: vpath(root, dst).exists()), "the clone was never published"
                agent.kill()
            (state,) = catalogue_rows(vol.db, "SELECT state FROM jobs WHERE kind = 'clone' ORDER BY created_at DESC")[0]
            assert state == "running" and dst not in catalogue_vfolders(vol.db), "recorded before the kill"
        call.join()
        assert call.response is None, "the clone answered before the kill"

        agent.start()
        no_staging_left(root)
        vol.assert_intact()
        assert_catalogue_matches_disk(agent)
        assert "running" not in {s for (s,) in catalogue_rows(vol.db, "SELECT state FROM jobs")}
        (state,) = catalogue_rows(vol.db, "SELECT state FROM jobs WHERE kind = 'clone' ORDER BY created_at DESC")[0]
        assert state == ("failed" if point in CLONE_POINTS else "done")
        with agent.client() as api:
            if point in CLONE_POINTS:  # rolled back: nothing visible; the clone asked again succeeds
                assert not vpath(root, dst).exists()
                r = api.post("/folder/clone", json=_clone_body(src, dst))
                assert r.status_code == 204, r.text
            else:  # finished on disk before the kill: adopted whole, and the job recorded as done
                assert f"clone {src} -> {dst} was complete on disk when the agent stopped" in agent.log()
                r = api.post("/folder/clone", json=_clone_body(src, dst))
                assert r.status_code == 409, r.text
            assert tree_digest(vpath(root, dst)) == tree_digest(vpath(root, src))
            eventually(lambda: assert_usage_right(api, agent, dst), timeout=30)
            assert api.post("/folder/delete", json={"volume": "local", "vfid": dst}).status_code == 204
        assert_catalogue_matches_disk(agent)
    finally:
        agent.stop()
    assert_clean_log(agent)


# -- delete ----------------------------------------------------------------------------------------------

DELETE_DIRS, DELETE_FILES = 40, 500  # 20 000 files: removing them takes a while


@pytest.fixture(scope="module")
def delete_volume(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Volume]:
    agent = make_agent(tmp_path_factory.mktemp("delete") / "a").start()
    try:
        with agent.client() as api:
            create_scope(api, "qs")
            vol = Volume(agent, bystanders(api, agent.volume_root(), "qs"))
    finally:
        agent.stop()
    yield vol
    assert_clean_log(agent)


def _big_tree(root: Path) -> str:
    """A vfolder of 20 000 files, put on disk while the agent is down (adopted and scanned at start-up)."""
    vfid = f"qs/{uuid.uuid4().hex}"
    base = vpath(root, vfid)
    for d in range(DELETE_DIRS):
        (base / f"d{d:02}").mkdir(parents=True)
        for i in range(DELETE_FILES):
            (base / f"d{d:02}" / f"f{i}").write_bytes(b"x" * (i % 7))
    return vfid


def _entries(top: Path) -> int:
    try:
        return len(os.listdir(top))
    except FileNotFoundError:
        return 0


DELETE_POINTS: dict[str, Callable[[Path], bool]] = {  # kill when the trash ...
    "trash-appeared": lambda trash: True,
    "half-removed": lambda trash: _entries(trash) <= DELETE_DIRS // 2,
}


@pytest.mark.parametrize("point", [*DELETE_POINTS, "removed-not-yet-forgotten"])
def test_delete_killed_midway(delete_volume: Volume, point: str) -> None:
    vol = delete_volume
    agent, root = vol.agent, vol.root
    vfid = _big_tree(root)
    hexid = vfid.split("/")[1]
    agent.start()
    try:
        with agent.client() as api:
            eventually(lambda: assert_usage_right(api, agent, vfid), timeout=30)
            assert catalogue_rows(
                vol.db,
                "SELECT d.ino FROM usage_dirs d JOIN usage_vfolders v ON v.id = d.vf "
                "WHERE v.folder_id = ? AND d.relpath = X''",
                hexid,
            ), "the usage scan has not recorded the root yet"
        body = {"volume": "local", "vfid": vfid}
        if point in DELETE_POINTS:
            call = Call(agent, "/folder/delete", body)
            assert wait_for(lambda: staged(root, "qs", "trash-")), "the delete never moved the tree aside"
            trash = staged(root, "qs", "trash-")[0]
            assert wait_for(lambda: not trash.exists() or DELETE_POINTS[point](trash))
            agent.kill()
            # mid-delete: the vfolder is gone from its place as a whole, and its tree is still being removed
            assert trash.exists() and count_files(trash) > 0, "the removal had finished before the kill"
            assert DELETE_POINTS[point](trash)
            assert not vpath(root, vfid).exists()
        else:
            call = Call(agent, "/folder/delete", body)
            assert wait_for(lambda: staged(root, "qs", "trash-")), "the delete never moved the tree aside"
            with catalogue_write_lock(vol.db):  # the tree goes, then the agent waits to forget the vfolder
                assert wait_for(lambda: not vpath(root, vfid).exists() and not staged(root, "qs", "trash-"))
                agent.kill()
            assert hexid in {f for (f,) in catalogue_rows(vol.db, "SELECT folder_id FROM vfolders")}
        call.join()
        assert call.response is None, "the delete answered before the kill"

        agent.start()
        no_staging_left(root)
        vol.assert_intact()
        assert not vpath(root, vfid).exists()
        assert_catalogue_matches_disk(agent)
        states = dict(catalogue_rows(vol.db, "SELECT folder_id, state FROM vfolders"))
        with agent.client() as api:
            r = api.request("GET", "/folder/usage", json=body)
            assert r.status_code == 404, r.text
            # the interrupted delete was recognised (its job, or the trash's inode) and finished, even when only
            # the bookkeeping was left (the tree gone, the vfolder not yet forgotten)
            assert hexid not in states
            assert f"the delete of vfolder {vfid} was interrupted by the restart; finished it" in agent.log()
            assert api.post("/folder/delete", json=body).status_code == 404
        jobs = catalogue_rows(vol.db, "SELECT state, error FROM jobs WHERE kind = 'delete' AND params LIKE ?",
                              f'%"{vfid}"%')
        assert jobs == [("done", None)], jobs
        assert_catalogue_matches_disk(agent)
    finally:
        agent.stop()
    assert_clean_log(agent)


# -- start-up scan ---------------------------------------------------------------------------------------

SCAN_SEED, SCAN_DIRS_A, SCAN_DIRS_B = 50, 100, 200  # 20 000 directories: the scan's rows take several commits


@pytest.fixture(scope="module")
def scan_volume(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Volume, str]]:
    agent = make_agent(tmp_path_factory.mktemp("scan") / "a", usage={"scan-threads": 1})
    agent.start()
    try:
        with agent.client() as api:
            create_scope(api, "qs")
            vfid = create_vfolder(api, "qs")
            for i in range(SCAN_SEED):
                (vpath(agent.volume_root(), vfid) / f"s{i}").mkdir()
            eventually(lambda: assert_usage_right(api, agent, vfid))  # the catalogue holds a small figure
            vol = Volume(agent, bystanders(api, agent.volume_root(), "qs"))
    finally:
        agent.stop()
    base = vpath(agent.volume_root(), vfid)  # grown while the agent is down: only the start-up scan sees it
    for a in range(SCAN_DIRS_A):
        for b in range(SCAN_DIRS_B):
            (base / f"a{a}" / f"b{b}").mkdir(parents=True)
        (base / f"a{a}" / "file").write_bytes(os.urandom(a))
    vol.digests[vfid] = tree_digest(base)
    yield vol, vfid
    assert_clean_log(agent)


def _scan_state(db: Path, hexid: str) -> tuple[int, float | None, int]:
    """(file_count recorded, scanned_at, usage_dirs rows) of one vfolder, as the catalogue holds them."""
    (count,) = catalogue_rows(db, "SELECT file_count FROM vfolder_usage WHERE folder_id = ?", hexid)[0]
    (vf, scanned_at) = catalogue_rows(db, "SELECT id, scanned_at FROM usage_vfolders WHERE folder_id = ?", hexid)[0]
    (rows,) = catalogue_rows(db, "SELECT count(*) FROM usage_dirs WHERE vf = ?", vf)[0]
    return count, scanned_at, rows


SCAN_DIRS = 1 + SCAN_SEED + SCAN_DIRS_A * (SCAN_DIRS_B + 1)
SCAN_POINTS: dict[str, Callable[[int], bool]] = {  # kill once the catalogue holds this many of the scan's rows
    "walking": lambda rows: True,
    "old-rows-dropped": lambda rows: rows == 0,
    "rows-half-written": lambda rows: SCAN_DIRS // 3 <= rows < SCAN_DIRS,
}


@pytest.mark.parametrize("point", list(SCAN_POINTS))
def test_startup_scan_killed_midway(scan_volume: tuple[Volume, str], point: str) -> None:
    vol, vfid = scan_volume
    agent = vol.agent
    hexid = vfid.split("/")[1]
    base = vpath(vol.root, vfid)
    (base / f"changed-while-down-{point}").write_bytes(b"x" * 10)  # the recorded figure is now out of date
    vol.digests[vfid] = tree_digest(base)
    entries = walk(base)[0]
    assert _scan_state(vol.db, hexid)[0] != entries
    landed_mid_scan = False
    for _attempt in range(4):  # a start-up scan that outran the poll: the next start scans everything again
        started = time.time()
        agent.start()
        wait_for(lambda: SCAN_POINTS[point](_scan_state(vol.db, hexid)[2]), timeout=10, interval=0.001)
        agent.kill()
        count, scanned_at, rows = _scan_state(vol.db, hexid)
        if scanned_at is not None and scanned_at < started and count != entries and SCAN_POINTS[point](rows):
            landed_mid_scan = True  # at the point chosen, and this run's figure was never recorded
            break
    assert landed_mid_scan, "every kill landed after the start-up scan was recorded"

    started = time.time()
    agent.start()
    try:
        vol.assert_intact()
        with agent.client() as api:
            eventually(lambda: assert_usage_right(api, agent, vfid), timeout=30)
            for other in vol.digests:
                eventually(lambda v=other: assert_usage_right(api, agent, v))

        def recorded() -> None:  # the catalogue agrees with the served figure, row for row
            count, scanned_at, rows = _scan_state(vol.db, hexid)
            assert (count, rows) == (entries, SCAN_DIRS) and scanned_at is not None and scanned_at >= started

        eventually(recorded)
        assert_catalogue_matches_disk(agent)
    finally:
        agent.stop()
    assert_clean_log(agent)


# -- catalogue schema upgrade ----------------------------------------------------------------------------

# every statement of the upgrade from ``from_version``, each step's version bump included
def _statements(from_version: int) -> list[str]:
    out = []
    for version in range(from_version + 1, SCHEMA_VERSION + 1):
        out += [*STEPS[version - 1], f"PRAGMA user_version = {version}"]
    return out


def _tables(db: Path) -> set[str]:
    return {n for (n,) in catalogue_rows(db, "SELECT name FROM sqlite_master WHERE type = 'table'")}


def _tables_at(version: int, tmp: Path) -> set[str]:
    ref = tmp / f"ref-{version}.db"
    con = sqlite3.connect(ref, isolation_level=None)  # each step as it runs (a data step's implicit transaction
    # would otherwise be rolled back at close, with every statement after it: step 9's DROP among them)
    for step in STEPS[:version]:
        for ddl in step:
            con.execute(ddl)
    con.close()
    return _tables(ref)


def _old_catalogue(path: Path, version: int) -> None:
    """A catalogue at an older schema version, holding rows the upgrade must keep."""
    con = sqlite3.connect(path, isolation_level=None)
    for step in STEPS[:version]:
        for ddl in step:
            con.execute(ddl)
    if version >= 1:
        now = time.time()
        con.execute("INSERT INTO volumes VALUES ('local', 'vfs', '/x', 'serving', NULL, ?, ?)", (now, now))
        con.execute("INSERT INTO quota_scopes VALUES ('local', 'qs', 4096, 'active', ?, NULL)", (now,))
        con.execute("INSERT INTO vfolders VALUES ('local', 'qs', ?, 'ready', ?, NULL)", ("ab" * 16, now))
        con.execute("INSERT INTO vfolder_metadata VALUES ('local', 'qs', ?, 'payload', ?)", ("ab" * 16, now))
    con.execute(f"PRAGMA user_version = {version}")
    con.close()


def _data(db: Path, version: int) -> list[tuple]:
    if version < 1:
        return []
    return catalogue_rows(db, "SELECT q.limit_bytes, v.folder_id, m.payload FROM quota_scopes q "
                              "JOIN vfolders v USING (volume, qsid) JOIN vfolder_metadata m USING (volume, qsid)")


# the child opens the catalogue as serve does; before statement ``k`` of the upgrade (k = len: before COMMIT)
# it says so and waits to be killed
_CHILD = """
import asyncio, os, sys, time
from sqlalchemy import event
from catalog import Catalog
from catalog import db as dbmod

path, target, marker = sys.argv[1], int(sys.argv[2]), sys.argv[3]
seen = [0]

def stop_here(what):
    with open(marker + ".tmp", "w") as f:
        f.write(what)
    os.rename(marker + ".tmp", marker)
    time.sleep(60)

plain = dbmod._writer_engine

def engine(p):
    eng = plain(p)

    @event.listens_for(eng, "before_cursor_execute")
    def before(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().startswith(("CREATE", "ALTER", "UPDATE", "DROP", "PRAGMA user_version =")):
            if seen[0] == target:
                stop_here(statement)
            seen[0] += 1

    @event.listens_for(eng, "commit")
    def commit(conn):
        if seen[0] == target:
            stop_here("COMMIT")
    return eng

dbmod._writer_engine = engine

async def main():
    cat = await Catalog.open_or_rebuild(path)
    await cat.close()

asyncio.run(main())
"""

UPGRADES = [(0, k) for k in range(len(_statements(0)) + 1)] + [(2, k) for k in range(len(_statements(2)) + 1)]


@pytest.mark.parametrize(("from_version", "k"), UPGRADES, ids=[f"from{v}-before{k}" for v, k in UPGRADES])
def test_schema_upgrade_killed_at_every_statement_leaves_the_old_schema(
    tmp_path: Path, from_version: int, k: int
) -> None:
    """SIGKILL before each statement of the upgrade (and before its COMMIT): the old version, whole."""
    db = tmp_path / "catalog.db"
    _old_catalogue(db, from_version)
    rows_before = _data(db, from_version)
    statements = _statements(from_version)
    marker = tmp_path / "reached"
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(db), str(k), str(marker)], cwd=ROOT)
    try:
        assert wait_for(marker.exists, timeout=20), f"the upgrade never reached statement {k}"
        expected = "COMMIT" if k == len(statements) else statements[k]
        assert marker.read_text() == expected
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL

    # the transaction was open at the kill: nothing of it is visible, whatever it had done
    assert catalogue_rows(db, "PRAGMA user_version") == [(from_version,)]
    assert _tables(db) == _tables_at(from_version, tmp_path)
    assert _data(db, from_version) == rows_before
    assert catalogue_rows(db, "PRAGMA quick_check") == [("ok",)]

    async def reopen() -> tuple[int, Any]:  # the next start upgrades it whole, nothing set aside
        cat = await Catalog.open_or_rebuild(db)
        try:
            return await cat.schema_version(), cat.recovery
        finally:
            await cat.close()

    assert asyncio.run(reopen()) == (SCHEMA_VERSION, None)
    assert _tables(db) == _tables_at(SCHEMA_VERSION, tmp_path)
    assert _data(db, SCHEMA_VERSION) == rows_before
    assert not list(tmp_path.glob("catalog.db.corrupt-*"))


def test_agent_killed_while_upgrading_then_serves_the_upgraded_catalogue(tmp_path: Path) -> None:
    """The real agent on a version-2 catalogue: killed mid-upgrade by the hook above, then started for real."""
    agent = make_agent(tmp_path / "a")
    db = Path(agent.config["catalog"]["path"])
    _old_catalogue(db, 2)
    root = agent.volume_root()
    (vpath(root, "qs/" + "ab" * 16) / "f").parent.mkdir(parents=True)
    (vpath(root, "qs/" + "ab" * 16) / "f").write_bytes(b"12345")
    marker = tmp_path / "reached"
    k = len(_statements(2)) // 2
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(db), str(k), str(marker)], cwd=ROOT)
    try:
        assert wait_for(marker.exists, timeout=20)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert catalogue_rows(db, "PRAGMA user_version") == [(2,)]
    agent.start()
    try:
        assert f"catalogue {db} upgraded from schema 2 to {SCHEMA_VERSION}" in agent.log()
        with agent.client() as api:
            r = api.request("GET", "/quota-scope", json={"volume": "local", "qsid": "qs"})
            assert r.json()["limit_bytes"] == 4096, r.text  # a row of the old catalogue, kept by the upgrade
            r = api.request("GET", "/folder/metadata", json={"volume": "local", "vfid": "qs/" + "ab" * 16})
            assert r.json()["payload"] == "payload", r.text
            eventually(lambda: assert_usage_right(api, agent, "qs/" + "ab" * 16))
        assert_catalogue_matches_disk(agent)
    finally:
        agent.stop()
    assert not any(" WARNING " in line and "catalogue" in line for line in agent.log().splitlines())
    assert_clean_log(agent)
