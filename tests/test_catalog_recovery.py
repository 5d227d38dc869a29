"""A corrupt, truncated or deleted catalogue: the real agent starts, keeps the bad file, rebuilds from disk.

What is on disk comes back (quota scopes, vfolders, usage by rescan); what only the catalogue held is lost
and the log says so in one WARNING: metadata payloads, upload sessions, vfs quota limits, job history.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from catalog.migrations import SCHEMA_VERSION
from catalog.recovery import set_aside
from tests.client_helpers import head, patch, staged_file, upload_token
from tests.support import AgentProcess, assert_clean_log, eventually, make_agent, walk

DEADLINE = 20.0

# -- shared with tests/test_crash_safety.py -------------------------------------------------------------


def vpath(root: Path, vfid: str) -> Path:
    qsid, _, fid = vfid.partition("/")
    return root / qsid / fid[:2] / fid[2:4] / fid[4:]


def tree_digest(root: Path) -> str:
    """One hash over every entry's relative path, type, mode and content (files) or target (links)."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel = os.path.relpath(dirpath, root)
        h.update(f"D {rel} {os.lstat(dirpath).st_mode:o}\n".encode())
        for name in sorted(filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]):
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            if os.path.islink(p):
                h.update(f"L {rel}/{name} -> {os.readlink(p)}\n".encode())
                continue
            h.update(f"F {rel}/{name} {st.st_mode:o} {st.st_size}\n".encode())
            with open(p, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
    return h.hexdigest()


def wait_for(cond: Callable[[], Any], timeout: float = DEADLINE, interval: float = 0.002) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(interval)
    return False


def disk_vfolders(root: Path) -> set[str]:
    """Every ``<qsid>/aa/bb/rest`` directory of a layout-3 volume, as ``qsid/hex``."""
    found = set()
    for qs in os.scandir(root):
        if not qs.is_dir(follow_symlinks=False) or qs.name.startswith("."):
            continue
        for a in Path(qs.path).iterdir():
            if a.name.startswith(".") or not a.is_dir():
                continue
            for b in a.iterdir():
                for rest in b.iterdir():
                    if rest.is_dir() and not rest.is_symlink():
                        found.add(f"{qs.name}/{a.name}{b.name}{rest.name}")
    return found


def disk_scopes(root: Path) -> set[str]:
    return {e.name for e in os.scandir(root) if e.is_dir(follow_symlinks=False) and not e.name.startswith(".")}


def catalogue_rows(db: Path, sql: str, *args: object) -> list[tuple]:
    """Rows straight from the SQLite file (read-only; WAL lets this run beside the agent or after its death)."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return con.execute(sql, args).fetchall()
    finally:
        con.close()


def catalogue_vfolders(db: Path, state: str = "ready") -> set[str]:
    return {f"{q}/{f}" for q, f in catalogue_rows(db, "SELECT qsid, folder_id FROM vfolders WHERE state = ?", state)}


def catalogue_scopes(db: Path) -> set[str]:
    return {q for (q,) in catalogue_rows(db, "SELECT qsid FROM quota_scopes WHERE state = 'active'")}


def assert_catalogue_matches_disk(agent: AgentProcess) -> None:
    db = Path(agent.config["catalog"]["path"])
    root = agent.volume_root()
    assert catalogue_vfolders(db) == disk_vfolders(root)
    assert catalogue_scopes(db) == disk_scopes(root)
    staging = [p for p in root.glob("*/.staging") if p.exists()]
    assert not staging or all(not any(p.iterdir()) for p in staging), f"leftovers in {staging}"


def usage_of(api: httpx.Client, vfid: str) -> dict[str, Any]:
    r = api.request("GET", "/folder/usage", json={"volume": "local", "vfid": vfid})
    assert r.status_code == 200, r.text
    return r.json()


def assert_usage_right(api: httpx.Client, agent: AgentProcess, vfid: str) -> tuple[int, int, int]:
    """The served figure equals an independent walk of the tree, and is not stale."""
    count, size, alloc = walk(vpath(agent.volume_root(), vfid))
    u = usage_of(api, vfid)
    assert (u["file_count"], u["used_bytes"], u["stale"]) == (count, size, False), (vfid, u, count, size)
    r = api.request("GET", "/folder/used-bytes", json={"volume": "local", "vfid": vfid})
    assert r.status_code == 200 and r.json()["used_bytes"] == alloc, (r.text, alloc)
    return count, size, alloc


# -- the data a catalogue is rebuilt around --------------------------------------------------------------


@dataclass
class Populated:
    scopes: dict[str, int | None]  # qsid -> limit asked for
    vfolders: dict[str, str]  # vfid -> tree digest
    with_metadata: str
    upload_token: str
    staged: Path


def populate(agent: AgentProcess) -> Populated:
    """Two scopes (one with a limit), three vfolders with files, dirs and a link, metadata, an open upload."""
    root = agent.volume_root()
    limited, unlimited = (f"qs-{uuid.uuid4().hex[:8]}" for _ in range(2))
    scopes: dict[str, int | None] = {limited: 10 << 20, unlimited: None}
    vfids = []
    with agent.client() as api:
        for qsid, limit in scopes.items():
            body: dict[str, Any] = {"volume": "local", "qsid": qsid}
            if limit is not None:
                body["options"] = {"limit_bytes": limit}
            assert api.post("/quota-scope", json=body).status_code == 204
        for qsid in (*scopes, next(iter(scopes))):
            vfid = f"{qsid}/{uuid.uuid4().hex}"
            assert api.post("/folder/create", json={"volume": "local", "vfid": vfid}).status_code == 204
            vfids.append(vfid)
            base = vpath(root, vfid)
            for d in range(5):
                (base / f"d{d}" / "sub").mkdir(parents=True)
                for i in range(8):
                    (base / f"d{d}" / f"f{i}").write_bytes(os.urandom(100 * i + d))
                (base / f"d{d}" / "sub" / "big").write_bytes(os.urandom(70_000 + d))
            os.symlink("d0/f1", base / "link")
        r = api.post("/folder/metadata", json={"volume": "local", "vfid": vfids[0], "payload": "meta-" * 50})
        assert r.status_code == 200, r.text
        token = upload_token(api, vfids[1], "incoming/part.bin", 1000)
        with httpx.Client(base_url=agent.client_url, timeout=30) as cli:
            assert patch(cli, token, 0, b"x" * 300).status_code == 204
        for vfid in vfids:
            eventually(lambda v=vfid: assert_usage_right(api, agent, v))
    staged = staged_file(agent, token)
    assert staged.exists()
    return Populated(scopes, {v: tree_digest(vpath(root, v)) for v in vfids}, vfids[0], token, staged)


def check_rebuilt(agent: AgentProcess, before: Populated) -> None:
    """Everything on disk is served again with right figures; the catalogue lists exactly the disk."""
    root = agent.volume_root()
    with agent.client() as api:
        for vfid, digest in before.vfolders.items():
            assert tree_digest(vpath(root, vfid)) == digest, f"{vfid} changed"
            eventually(lambda v=vfid: assert_usage_right(api, agent, v))
        for qsid in before.scopes:
            allocs = [walk(vpath(root, v))[2] for v in before.vfolders if v.startswith(qsid + "/")]

            def scope_right(q: str = qsid, expected: int = sum(allocs)) -> None:
                r = api.request("GET", "/quota-scope", json={"volume": "local", "qsid": q})
                assert r.status_code == 200, r.text
                # a vfs limit lived only in the old catalogue: lost (and said so in the log)
                assert r.json() == {"used_bytes": expected, "limit_bytes": -1}, r.json()

            eventually(scope_right)
        r = api.request("GET", "/folder/metadata", json={"volume": "local", "vfid": before.with_metadata})
        assert r.status_code == 200 and r.json()["payload"] is None, r.text  # lost (said so in the log)
        with httpx.Client(base_url=agent.client_url, timeout=30) as cli:
            assert head(cli, before.upload_token).status_code == 404  # the session is gone ...
        assert not before.staged.exists()  # ... and its staged bytes with it, never published half-done
        assert not any(vpath(root, v).joinpath("incoming", "part.bin").exists() for v in before.vfolders)
        # the rebuilt catalogue is a working one
        qsid = next(iter(before.scopes))
        vfid = f"{qsid}/{uuid.uuid4().hex}"
        assert api.post("/folder/create", json={"volume": "local", "vfid": vfid}).status_code == 204
    assert_catalogue_matches_disk(agent)


def warnings_of(agent: AgentProcess) -> list[str]:
    return [line for line in agent.log().splitlines() if " WARNING " in line and "catalogue" in line]


LOST_WORDS = ("metadata payloads", "upload sessions", "quota limits of volume(s) local", "job history")


# -- faults --------------------------------------------------------------------------------------------


def _garbage(db: Path) -> None:
    db.write_bytes(os.urandom(max(db.stat().st_size, 8192)))


def _truncated(db: Path) -> None:
    size = db.stat().st_size
    assert size >= 3 * 4096, size
    os.truncate(db, size // 2)


def _damaged_pages(db: Path) -> None:
    """Random bytes over the root page of the vfolders table: opening works, quick_check does not."""
    (rootpage,) = catalogue_rows(db, "SELECT rootpage FROM sqlite_master WHERE name = 'vfolders'")[0]
    (page_size,) = catalogue_rows(db, "PRAGMA page_size")[0]
    with open(db, "r+b") as f:
        f.seek((rootpage - 1) * page_size)
        f.write(os.urandom(page_size))


FAULTS: dict[str, tuple[Callable[[Path], None], bool]] = {  # name -> (damage, kill -9 first)
    "garbage": (_garbage, False),
    "garbage-after-kill-with-wal": (_garbage, True),
    "truncated-to-half": (_truncated, False),
    "damaged-table-page": (_damaged_pages, False),
}


def _sqlite_sees_damage(db: Path) -> bool:
    """Whether SQLite finds the catalogue (with its WAL, on a copy) unusable."""
    with tempfile.TemporaryDirectory() as tmp:
        for suffix in ("", "-wal"):
            if Path(f"{db}{suffix}").exists():
                shutil.copyfile(f"{db}{suffix}", f"{tmp}/c.db{suffix}")
        try:
            con = sqlite3.connect(f"{tmp}/c.db")
            try:
                return con.execute("PRAGMA quick_check").fetchone()[0] != "ok"
            finally:
                con.close()
        except sqlite3.DatabaseError:
            return True


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_corrupt_catalogue_is_kept_aside_and_rebuilt_from_disk(tmp_path: Path, fault: str) -> None:
    damage, kill_first = FAULTS[fault]
    # a killed agent's WAL may by chance hold every page (its own writes after the checkpoint): SQLite then
    # rebuilds the file by itself and nothing is corrupt. Set the fault up again until SQLite sees damage.
    for attempt in range(5):  # noqa: B007 - the attempt names the directory
        agent = make_agent(tmp_path / f"a{attempt}").start()
        db = Path(agent.config["catalog"]["path"])
        try:
            before = populate(agent)
            if kill_first:
                # most pages reach the main file (an outside checkpoint, as the agent's own auto-checkpoint does);
                # later commits stay in the WAL. A WAL holding *every* page would rebuild the file by itself.
                con = sqlite3.connect(db, timeout=10)
                assert con.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[0] == 0
                con.close()
                with agent.client() as api:
                    vfid = next(v for v in before.vfolders if v != before.with_metadata)
                    r = api.post("/folder/metadata", json={"volume": "local", "vfid": vfid, "payload": "after"})
                    assert r.status_code == 200, r.text
        finally:
            agent.kill() if kill_first else agent.stop()
        if fault == "damaged-table-page":  # the WAL is checkpointed at a clean stop: the page is in the main file
            assert not Path(f"{db}-wal").exists()
        damage(db)
        bad = {s: hashlib.sha256(Path(f"{db}{s}").read_bytes()).hexdigest()
               for s in ("", "-wal", "-shm") if Path(f"{db}{s}").exists()}
        if kill_first:
            assert "-wal" in bad, "a killed agent leaves its WAL: it must be kept with the bad file"
        if _sqlite_sees_damage(db):
            break
    else:
        raise AssertionError(f"{fault}: SQLite read the damaged catalogue fine in 5 set-ups")

    agent.start()
    try:
        kept = sorted(db.parent.glob("catalog.db.corrupt-*"))
        stamp = kept[0].name.removeprefix("catalog.db.corrupt-")
        assert len(stamp) == len("20250101T000000Z") and stamp[8] == "T", kept
        # the file and its WAL, byte-identical for forensics (the -shm is only an index SQLite rebuilds)
        suffixes = {p.name.removeprefix(f"catalog.db.corrupt-{stamp}") for p in kept}
        assert set(bad) - {"-shm"} <= suffixes <= set(bad), (kept, bad)
        for suffix, digest in bad.items():
            if suffix != "-shm":
                assert hashlib.sha256(Path(f"{db}.corrupt-{stamp}{suffix}").read_bytes()).hexdigest() == digest, suffix
        assert not Path(f"{db}.wal-at-start").exists()
        check_rebuilt(agent, before)
    finally:
        agent.stop()
    warned = warnings_of(agent)
    assert len(warned) == 1, warned
    line = warned[0]
    assert f"catalogue {db} is corrupt (" in line and f"kept it as {db}.corrupt-{stamp}" in line, line
    assert "rebuilt from disk: 2 quota scope(s) and 3 vfolder(s)" in line, line
    assert all(w in line for w in LOST_WORDS), line
    assert_clean_log(agent)
    # the next start finds a good catalogue: nothing more is set aside, nothing more is warned about
    agent.start()
    agent.stop()
    assert sorted(db.parent.glob("catalog.db.corrupt-*")) == kept
    assert len(warnings_of(agent)) == 1
    assert_clean_log(agent)


@pytest.mark.parametrize("kill_first", [False, True], ids=["stopped", "killed-wal-left-behind"])
def test_a_deleted_catalogue_is_rebuilt_from_disk(tmp_path: Path, kill_first: bool) -> None:
    agent = make_agent(tmp_path / "a").start()
    db = Path(agent.config["catalog"]["path"])
    try:
        before = populate(agent)
    finally:
        agent.kill() if kill_first else agent.stop()
    left = [s for s in ("-wal", "-shm") if Path(f"{db}{s}").exists()]
    assert bool(left) == kill_first
    db.unlink()  # an operator's mistake: the WAL of a killed agent stays behind

    agent.start()
    try:
        # a WAL without its database would be replayed into the new file: it is set aside, never used
        orphans = sorted(p.name for p in db.parent.glob("catalog.db.orphan-*"))
        assert [o.rsplit("-", 1)[-1] for o in orphans] == sorted(s[1:] for s in left), orphans
        assert not list(db.parent.glob("catalog.db.corrupt-*"))
        check_rebuilt(agent, before)
    finally:
        agent.stop()
    warned = warnings_of(agent)
    assert len(warned) == 1, warned
    assert f"catalogue {db} did not exist (deleted?)" in warned[0]
    assert "rebuilt from disk: 2 quota scope(s) and 3 vfolder(s)" in warned[0]
    assert all(w in warned[0] for w in LOST_WORDS), warned[0]
    assert_clean_log(agent)


def test_a_first_start_on_an_empty_volume_warns_of_nothing(tmp_path: Path) -> None:
    agent = make_agent(tmp_path / "a").start()
    agent.stop()
    assert warnings_of(agent) == [] and "catalogue" in agent.log() and " is new" in agent.log()
    assert_clean_log(agent)


def test_a_catalogue_unusable_for_another_reason_is_refused_and_left_alone(tmp_path: Path) -> None:
    """A newer schema is not corruption: the file is never moved, the agent exits naming the problem."""
    agent = make_agent(tmp_path / "a")
    db = Path(agent.config["catalog"]["path"])
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE future (x)")
    con.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    con.close()
    with pytest.raises(RuntimeError, match="newer than this agent"):
        agent.start(timeout=15)
    assert agent.proc is not None and agent.proc.returncode == 3
    assert sorted(p.name for p in db.parent.iterdir() if p.name.startswith("catalog.db")) == ["catalog.db"]
    assert catalogue_rows(db, "PRAGMA user_version") == [(SCHEMA_VERSION + 1,)]
    assert catalogue_rows(db, "SELECT name FROM sqlite_master") == [("future",)]
    assert "Traceback" not in agent.log()


def test_set_aside_never_overwrites_an_earlier_copy(tmp_path: Path) -> None:
    db = tmp_path / "catalog.db"
    names = []
    for n in range(3):  # three corruptions within the same second
        db.write_bytes(b"bad %d" % n)
        Path(f"{db}-wal").write_bytes(b"wal %d" % n)
        names.append([p.name for p in set_aside(db, "corrupt")])
    assert not db.exists() and not Path(f"{db}-wal").exists()
    flat = [n for group in names for n in group]
    assert len(set(flat)) == 6
    for n, (main, wal) in enumerate(names):
        assert (tmp_path / main).read_bytes() == b"bad %d" % n and wal == main + "-wal"
        assert (tmp_path / wal).read_bytes() == b"wal %d" % n
