"""Start-up reconciliation of the catalogue with the disk, on a real agent restarted for real."""

from __future__ import annotations

import asyncio
import os
import shutil
import uuid
from pathlib import Path

from catalog import Catalog
from tests.support import assert_clean_log, make_agent


def _vpath(root: Path, qsid: str, fid: str) -> Path:
    return root / qsid / fid[:2] / fid[2:4] / fid[4:]


def _catalogue_states(path: Path) -> dict[str, str]:
    async def main() -> dict[str, str]:
        cat = await Catalog.open(path, readonly=True)
        try:
            return {f"{v.qsid}/{v.folder_id}": v.state for v in await cat.vfolders("local")}
        finally:
            await cat.close()

    return asyncio.run(main())


def test_adopts_new_folders_marks_missing_ones_and_sweeps_staging(tmp_path: Path) -> None:
    agent = make_agent(tmp_path / "a").start()
    root = agent.volume_root()
    keep, gone = uuid.uuid4().hex, uuid.uuid4().hex
    with agent.client() as api:
        assert api.post("/quota-scope", json={"volume": "local", "qsid": "qs"}).status_code == 204
        for fid in (keep, gone):
            assert api.post("/folder/create", json={"volume": "local", "vfid": f"qs/{fid}"}).status_code == 204
    agent.stop()

    # behind the agent's back: one folder appears, one disappears, a scope appears, leftovers of a clone remain
    adopted = uuid.uuid4().hex
    _vpath(root, "qs", adopted).mkdir(parents=True)
    (_vpath(root, "qs", adopted) / "data").write_bytes(b"12345")
    shutil.rmtree(_vpath(root, "qs", gone))
    other = uuid.uuid4().hex
    _vpath(root, "other-scope", other).mkdir(parents=True)
    leftover = root / "qs" / ".staging" / "clone-deadbeef"
    leftover.mkdir(parents=True)
    (leftover / "half.bin").write_bytes(b"half")

    agent.start()
    try:
        log = agent.log()
        assert "adopted 1 quota scope(s) and 2 vfolder(s)" in log
        assert f"vfolder qs/{gone} is in the catalogue but gone from disk; marked missing" in log
        assert not (root / "qs" / ".staging").exists()
        with agent.client() as api:
            r = api.request("GET", "/folder/usage", json={"volume": "local", "vfid": f"qs/{adopted}"})
            assert r.status_code == 200 and r.json()["file_count"] == 1 and r.json()["used_bytes"] == 5
            r = api.request("GET", "/quota-scope", json={"volume": "local", "qsid": "other-scope"})
            assert r.status_code == 200
    finally:
        agent.stop()
    states = _catalogue_states(tmp_path / "a" / "catalog.db")
    assert states[f"qs/{adopted}"] == "ready"
    assert states[f"qs/{keep}"] == "ready"
    assert states[f"qs/{gone}"] == "missing", "a vanished vfolder is remembered as missing, never forgotten"
    assert states[f"other-scope/{other}"] == "ready"
    assert_clean_log(agent)


def test_a_volume_without_version_txt_is_reported_and_not_served(tmp_path: Path) -> None:
    old = tmp_path / "old-volume"
    fid = uuid.uuid4().hex
    (old / fid[:2] / fid[2:4] / fid[4:]).mkdir(parents=True)  # layout 2: no quota scope level
    good = tmp_path / "good-volume"
    good.mkdir()
    (good / "version.txt").write_text("3\n")
    volumes = {"old": {"backend": "vfs", "path": str(old)}, "local": {"backend": "vfs", "path": str(good)}}
    agent = make_agent(tmp_path / "a", volumes=volumes).start()
    try:
        assert "volume old is NOT served" in agent.log() and "needs migration" in agent.log()
        with agent.client() as api:
            vols = {v["name"]: v for v in api.get("/volumes").json()["volumes"]}
            assert vols["old"]["status"] == "unavailable" and "migration" in vols["old"]["status_info"]
            assert vols["local"]["status"] == "serving"
            hw = api.request("GET", "/volume/hwinfo", json={"volume": "old"}).json()
            assert hw["status"] == "unavailable" and "migrat" in hw["status_info"]
            r = api.post("/quota-scope", json={"volume": "old", "qsid": "qs"})
            assert r.status_code == 503 and "migrat" in r.json()["msg"]
            assert sorted(os.listdir(old)) == [fid[:2]], "nothing is written to an unmigrated volume"
    finally:
        agent.stop()
    assert_clean_log(agent)


def test_agent_sets_a_corrupt_catalogue_aside_with_a_clear_message(tmp_path: Path) -> None:
    agent = make_agent(tmp_path / "a")
    (tmp_path / "a" / "catalog.db").write_bytes(b"garbage" * 1000)
    agent.start(timeout=10)  # a corrupt catalogue is kept aside and a new one rebuilt from disk
    agent.stop()
    kept = list((tmp_path / "a").glob("catalog.db.corrupt-*"))
    assert len(kept) == 1 and kept[0].read_bytes() == b"garbage" * 1000
    assert "is corrupt (file is not a database): kept it as" in agent.log()
    assert_clean_log(agent)

def test_a_new_empty_or_missing_volume_root_is_initialised_at_layout_3(tmp_path: Path) -> None:
    """Nothing to migrate in an empty root: it is served at once; a root holding anything still needs migrating."""
    empty, missing, fresh_fs, old = (tmp_path / n for n in ("empty", "missing", "fresh-ext4", "old"))
    empty.mkdir()
    (fresh_fs / "lost+found").mkdir(parents=True)  # what mkfs.ext4 leaves on a new filesystem
    old.mkdir()
    (old / "notes.txt").write_text("not a layout-3 volume")  # any entry: not new, never initialised
    volumes = {name: {"backend": "vfs", "path": str(path)}
               for name, path in (("local", empty), ("missing", missing), ("fresh", fresh_fs), ("old", old))}
    agent = make_agent(tmp_path / "a", volumes=volumes).start()
    try:
        log = agent.log()
        new = (("local", empty, "empty"), ("missing", missing, "missing"), ("fresh", fresh_fs, "empty"))
        for name, root, how in new:
            assert (root / "version.txt").read_text() == "3\n"
            line = f"volume {name}: root {root} was {how}: initialised as a new volume (version.txt = 3)"
            assert log.count(line) == 1, log
        assert not (old / "version.txt").exists() and sorted(os.listdir(old)) == ["notes.txt"]
        assert "volume old is NOT served" in log and "needs migration" in log
        with agent.client() as api:
            vols = {v["name"]: v for v in api.get("/volumes").json()["volumes"]}
            assert {n: v["status"] for n, v in vols.items()} == {
                "local": "serving", "missing": "serving", "fresh": "serving", "old": "unavailable"}
            for name in ("local", "missing", "fresh"):
                assert api.post("/quota-scope", json={"volume": name, "qsid": "qs"}).status_code == 204
    finally:
        agent.stop()
    assert agent.log().count("initialised as a new volume") == 3, "initialised once, at start-up only"
    assert_clean_log(agent)


def test_an_interrupted_usage_rescan_job_is_ended_with_its_own_reason(tmp_path: Path) -> None:
    """A start-up rescan cut short by a stop stages nothing: its job is ended saying a new rescan began, not
    that "staged work was removed" (the reason of an interrupted clone)."""
    import sqlite3

    agent = make_agent(tmp_path / "a").start()
    agent.stop()
    path = Path(agent.config["catalog"]["path"])

    async def start_job() -> str:
        cat = await Catalog.open(path)
        try:
            return await cat.start_job("usage-rescan", "local", {}, total=3)
        finally:
            await cat.close()

    job = asyncio.run(start_job())
    agent.start()
    agent.stop()
    with sqlite3.connect(path) as db:
        (error,) = db.execute("SELECT error FROM jobs WHERE id = ?", (job,)).fetchone()
    assert error == "interrupted by an agent restart; a new rescan was started"
    assert_clean_log(agent)
