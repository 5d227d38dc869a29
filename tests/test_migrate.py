"""Layout-2 -> 3 migration: real directories, the real CLI in a subprocess, a real PostgreSQL server.

Each test builds an old-layout volume (``<root>/aa/bb/rest`` folders holding
files, sub-directories and symlinks), records content hashes and inode numbers,
migrates, and checks that every folder arrived exactly once under its scope
with the same inodes (renames, not copies) and the same bytes.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.migrate import mapping_from_csv, normalize_qsid
from catalog import Catalog
from catalog.layout_moves import LayoutMoves
from tests.support import ROOT, AgentProcess, assert_clean_log, free_port, make_agent, to_toml

SCOPES = ["qs-alpha", "qs-beta", "qs_gamma"]


# -- an old-layout volume ------------------------------------------------------


def make_old_volume(root: Path, n: int) -> dict[str, str]:
    """``n`` layout-2 folders with a little content each; returns folder hex -> qsid."""
    root.mkdir(parents=True, exist_ok=True)
    mapping = {}
    for i in range(n):
        fid = uuid.uuid4().hex
        folder = root / fid[0:2] / fid[2:4] / fid[4:]
        (folder / "sub" / "deeper").mkdir(parents=True)
        (folder / "data.bin").write_bytes(os.urandom(100 + i % 300))
        (folder / "sub" / "notes.txt").write_text(f"folder {i}\n" * (i % 7 + 1))
        (folder / "sub" / "deeper" / "empty").touch()
        os.symlink("../data.bin", folder / "sub" / "link")
        mapping[fid] = SCOPES[i % len(SCOPES)]
    return mapping


def snapshot(folder: Path) -> dict[str, tuple]:
    """relpath -> (kind, content hash or link target, inode): equal snapshots = same files, moved not copied."""
    out: dict[str, tuple] = {".": ("d", None, folder.lstat().st_ino)}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            rel = str(path.relative_to(folder))
            if path.is_symlink():
                out[rel] = ("l", os.readlink(path), st.st_ino)
            elif path.is_dir():
                out[rel] = ("d", oct(st.st_mode), st.st_ino)
            else:
                out[rel] = ("f", hashlib.sha256(path.read_bytes()).hexdigest(), st.st_ino)
    return out


def folder_usage(folder: Path) -> tuple[int, int]:
    """(used bytes, file count) as GET /folder/usage counts them: every entry strictly below, links not followed."""
    entries = [Path(d) / name for d, dirs, files in os.walk(folder) for name in dirs + files]
    return sum(p.lstat().st_size for p in entries), len(entries)


def old_path(root: Path, fid: str) -> Path:
    return root / fid[0:2] / fid[2:4] / fid[4:]


def new_path(root: Path, fid: str, qsid: str) -> Path:
    return root / qsid / fid[0:2] / fid[2:4] / fid[4:]


def snapshots(root: Path, mapping: dict[str, str], *, new: bool) -> dict[str, dict]:
    return {
        fid: snapshot(new_path(root, fid, normalize_qsid(q)) if new else old_path(root, fid))
        for fid, q in mapping.items()
    }


def moved_on_disk(root: Path, mapping: dict[str, str]) -> int:
    return sum(new_path(root, f, q).exists() for f, q in mapping.items())


def write_csv(path: Path, mapping: dict[str, str]) -> Path:
    path.write_text("folder_id,qsid\n" + "".join(f"{fid},{q}\n" for fid, q in mapping.items()))
    return path


def layout2_agent(workdir: Path) -> AgentProcess:
    root = workdir / "volume"
    agent = make_agent(workdir, volumes={"local": {"backend": "vfs", "path": str(root)}})
    agent.config_path.write_text(to_toml(agent.config))
    return agent


def run_cli(agent: AgentProcess, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "agent", *args, "-f", str(agent.config_path)],
        capture_output=True, text=True, cwd=ROOT, timeout=timeout,
    )


def migrate_cli(agent: AgentProcess, *args: str) -> subprocess.CompletedProcess:
    return run_cli(agent, "migrate", "--volume", "local", *args)


def journal(agent: AgentProcess) -> dict[str, int]:
    db = sqlite3.connect(f"file:{agent.workdir / 'catalog.db'}?mode=ro", uri=True)
    try:
        return dict(db.execute("SELECT state, count(*) FROM layout_moves GROUP BY state").fetchall())
    finally:
        db.close()


def done_so_far(agent: AgentProcess) -> int:
    """The killed run's progress as the catalogue shows it (0 while it is still creating the catalogue)."""
    try:
        return journal(agent).get("done", 0)
    except sqlite3.OperationalError:
        return 0


def mid_batch(agent: AgentProcess, root: Path, mapping: dict[str, str]) -> bool:
    """A batch is recorded done and the next one is being renamed: folders moved on disk, not yet journaled."""
    if not (agent.workdir / "catalog.db").exists():
        return False
    done = done_so_far(agent)
    return done >= 100 and moved_on_disk(root, mapping) >= done + 20


def assert_fully_migrated(root: Path, mapping: dict[str, str], before: dict[str, dict]) -> None:
    assert snapshots(root, mapping, new=True) == before
    assert (root / "version.txt").read_text() == "3\n"
    leftovers = [p.name for p in root.iterdir() if len(p.name) == 2]
    assert leftovers == [], f"old prefix directories left behind: {leftovers}"
    assert not list(root.glob(".version.txt.*")), "temporary version file left behind"


# -- CSV -------------------------------------------------------------------------


def test_csv_migration_moves_every_folder_and_the_agent_serves_it(tmp_path: Path) -> None:
    agent = layout2_agent(tmp_path / "a")
    root = agent.volume_root()
    mapping = make_old_volume(root, 60)
    before = snapshots(root, mapping, new=False)
    sizes = {fid: sum(p.lstat().st_size for p in old_path(root, fid).rglob("*")) for fid in mapping}
    csv_path = write_csv(tmp_path / "map.csv", mapping)

    agent.start()  # refuses the layout-2 volume at first ...
    try:
        with agent.client() as api:
            fid, qsid = next(iter(mapping.items()))
            body = {"volume": "local", "vfid": f"{qsid}/{fid}"}
            assert api.request("GET", "/folder/usage", json=body).status_code >= 400

            result = migrate_cli(agent, "--mapping", str(csv_path))
            assert result.returncode == 0, result.stdout + result.stderr
            assert "moved 60" in result.stdout

            assert_fully_migrated(root, mapping, before)
            assert journal(agent) == {"done": 60}
            # ... and serves it once migrated, without a restart; usage counts the same bytes.
            for fid, qsid in list(mapping.items())[:5]:
                r = api.request("GET", "/folder/usage", json={"volume": "local", "vfid": f"{qsid}/{fid}"})
                assert r.status_code == 200, r.text
                assert r.json()["used_bytes"] == sizes[fid]
    finally:
        agent.stop()
    assert_clean_log(agent)

    async def catalogued() -> set[tuple[str, str]]:
        catalog = await Catalog.open(agent.workdir / "catalog.db")
        try:
            return {(v.qsid, v.folder_id) for v in await catalog.vfolders("local")}
        finally:
            await catalog.close()

    assert asyncio.run(catalogued()) == {(q, f) for f, q in mapping.items()}
    again = migrate_cli(agent, "--mapping", str(csv_path))
    assert again.returncode == 0 and "already at layout 3" in again.stdout


def test_unmapped_folders_are_listed_and_left_and_version_is_not_written(tmp_path: Path) -> None:
    agent = layout2_agent(tmp_path / "a")
    root = agent.volume_root()
    mapping = make_old_volume(root, 12)
    before = snapshots(root, mapping, new=False)
    unmapped = sorted(mapping)[:2]
    partial = {f: q for f, q in mapping.items() if f not in unmapped}

    result = migrate_cli(agent, "--mapping", str(write_csv(tmp_path / "part.csv", partial)))
    assert result.returncode == 4, result.stdout + result.stderr
    for fid in unmapped:
        assert fid in result.stdout
        assert snapshot(old_path(root, fid)) == before[fid]  # untouched
    assert not (root / "version.txt").exists()
    assert "version.txt NOT written" in result.stdout

    result = migrate_cli(agent, "--mapping", str(write_csv(tmp_path / "full.csv", mapping)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert_fully_migrated(root, mapping, before)
    assert journal(agent) == {"done": 12}


def test_dry_run_changes_nothing(tmp_path: Path) -> None:
    agent = layout2_agent(tmp_path / "a")
    root = agent.volume_root()
    mapping = make_old_volume(root, 8)
    before = snapshots(root, mapping, new=False)
    csv_path = write_csv(tmp_path / "m.csv", mapping)
    db = agent.workdir / "catalog.db"
    for has_catalogue in (False, True):
        if has_catalogue:  # one made by the agent or an earlier run: read, never written (nor upgraded)
            asyncio.run(_create_catalogue(db))
        stamp = (db.read_bytes(), db.stat().st_mtime_ns) if has_catalogue else None
        result = migrate_cli(agent, "--mapping", str(csv_path), "--dry-run", "--json")
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        assert (report["found"], report["planned"], report["moved"]) == (8, 8, 0)
        assert snapshots(root, mapping, new=False) == before
        assert sorted(p.name for p in root.iterdir()) == sorted({f[:2] for f in mapping})
        if not has_catalogue:
            assert not db.exists(), "a dry run created the catalogue"
            assert sorted(p.name for p in agent.workdir.iterdir() if p.name.startswith("catalog")) == []
        else:
            assert (db.read_bytes(), db.stat().st_mtime_ns) == stamp, "a dry run wrote to the catalogue"
            wal = Path(f"{db}-wal")
            assert not wal.exists() or wal.stat().st_size == 0, "a dry run wrote to the catalogue's WAL"
    assert journal(agent) == {}


async def _create_catalogue(path: Path) -> None:
    catalog = await Catalog.open(path)
    await catalog.close()


def test_bad_mapping_rows_are_refused_before_anything_moves(tmp_path: Path) -> None:
    agent = layout2_agent(tmp_path / "a")
    root = agent.volume_root()
    mapping = make_old_volume(root, 3)
    bad = tmp_path / "bad.csv"
    bad.write_text(f"{next(iter(mapping))},../etc\nnot-a-uuid,qs-alpha\n")
    result = migrate_cli(agent, "--mapping", str(bad))
    assert result.returncode == 2
    assert "line 1" in result.stderr and "line 2" in result.stderr
    assert snapshots(root, mapping, new=False) == {f: snapshot(old_path(root, f)) for f in mapping}
    assert not any((root / q).exists() for q in SCOPES)


def test_csv_parsing(tmp_path: Path) -> None:
    fid = uuid.uuid4()
    path = tmp_path / "m.csv"
    path.write_text(f"\n{fid},qs-1\n{uuid.uuid4().hex},user:{fid}\n{uuid.uuid4()},\n")
    mapping = mapping_from_csv(path)
    assert len(mapping) == 2  # a folder with no scope (NULL in psql's \copy output) stays unmapped
    assert mapping[fid.hex] == "qs-1"
    assert fid.hex in mapping.values()  # "user:<uuid>" scopes live on disk under the UUID's hex


# -- crash safety --------------------------------------------------------------


def test_killed_mid_run_then_resumed_moves_each_folder_exactly_once(tmp_path: Path) -> None:
    agent = layout2_agent(tmp_path / "a")
    root = agent.volume_root()
    mapping = make_old_volume(root, 400)
    before = snapshots(root, mapping, new=False)
    usage_before = {fid: folder_usage(old_path(root, fid)) for fid in mapping}
    csv_path = write_csv(tmp_path / "m.csv", mapping)
    # 100 folders/s: journal batches of 100 folders (one second each), renames 10 ms apart, so the kill below
    # lands inside the second batch: renames done on disk that the journal has not recorded yet.
    cmd = [sys.executable, "-m", "agent", "migrate", "-f", str(agent.config_path), "--volume", "local",
           "--mapping", str(csv_path), "--max-rate", "100"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if mid_batch(agent, root, mapping):
                break
            assert proc.poll() is None, "migration finished before it could be killed"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the run was not killed by SIGKILL (status {proc.returncode})"
    moved = moved_on_disk(root, mapping)
    assert 100 <= moved < 400
    assert not (root / "version.txt").exists()
    killed = journal(agent)
    assert killed.get("intent", 0) > 0 and moved > killed["done"], f"not killed mid-batch: {killed}, {moved} moved"

    result = migrate_cli(agent, "--mapping", str(csv_path), "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["failed"] == [] and report["conflicts"] == []
    # Every folder was renamed exactly once: the resumed run renamed exactly those still at the old place,
    # and only confirmed (never re-renamed) the ones the killed run had moved without recording it.
    assert report["moved"] == 400 - moved
    assert report["recovered"] <= moved
    assert report["recovered"] == moved - killed["done"]
    assert_fully_migrated(root, mapping, before)
    assert journal(agent) == {"done": 400}
    assert {fid: folder_usage(new_path(root, fid, q)) for fid, q in mapping.items()} == usage_before


def test_max_rate_paces_each_folder_not_each_batch(tmp_path: Path) -> None:
    """--max-rate 4: renames at least 0.25 s apart (the ctime a rename gives each folder), never a burst."""
    agent = layout2_agent(tmp_path / "a")
    root = agent.volume_root()
    mapping = make_old_volume(root, 6)
    result = migrate_cli(agent, "--mapping", str(write_csv(tmp_path / "m.csv", mapping)), "--max-rate", "4")
    assert result.returncode == 0, result.stdout + result.stderr
    times = sorted(new_path(root, f, q).stat().st_ctime for f, q in mapping.items())
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert min(gaps) >= 0.2, f"renames closer than the rate allows: {gaps}"
    assert journal(agent) == {"done": 6}


@pytest.mark.parametrize("backend", ["btrfs", "xfs"])
def test_a_backend_whose_scopes_are_not_plain_directories_is_refused_up_front(tmp_path: Path, backend: str) -> None:
    """btrfs scopes are subvolumes, xfs scopes carry a project quota: renaming into a mkdir'd scope would not do."""
    root = tmp_path / "a" / "volume"
    agent = make_agent(tmp_path / "a", volumes={"local": {"backend": backend, "path": str(root)}})
    agent.config_path.write_text(to_toml(agent.config))
    mapping = make_old_volume(root, 3)
    before = snapshots(root, mapping, new=False)
    result = migrate_cli(agent, "--mapping", str(write_csv(tmp_path / "m.csv", mapping)))
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"backend {backend!r}" in result.stderr and "without its quota" in result.stderr
    assert "Nothing was moved" in result.stderr
    assert snapshots(root, mapping, new=False) == before
    assert not (root / "version.txt").exists() and not (agent.workdir / "catalog.db").exists()


def test_resume_checks_both_locations_of_an_intent(tmp_path: Path) -> None:
    """The two crash windows: intent committed and renamed (not recorded), intent committed and not renamed."""
    agent = layout2_agent(tmp_path / "a")
    root = agent.volume_root()
    mapping = make_old_volume(root, 6)
    before = snapshots(root, mapping, new=False)
    (renamed, qs_r), (not_renamed, qs_n) = list(mapping.items())[:2]

    async def crash_state() -> None:
        catalog = await Catalog.open(agent.workdir / "catalog.db")
        try:
            job = await catalog.start_job("migrate", "local", {"root": str(root)})
            await LayoutMoves(catalog, "local").record_intent(job, [(renamed, qs_r), (not_renamed, qs_n)])
        finally:
            await catalog.close()

    asyncio.run(crash_state())
    target = new_path(root, renamed, qs_r)
    target.parent.mkdir(parents=True)
    old_path(root, renamed).rename(target)

    result = migrate_cli(agent, "--mapping", str(write_csv(tmp_path / "m.csv", mapping)), "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert (report["recovered"], report["moved"], report["found"]) == (1, 5, 5)
    assert_fully_migrated(root, mapping, before)
    assert journal(agent) == {"done": 6}


def test_a_folder_in_both_places_is_a_conflict_not_an_overwrite(tmp_path: Path) -> None:
    agent = layout2_agent(tmp_path / "a")
    root = agent.volume_root()
    mapping = make_old_volume(root, 3)
    fid, qsid = next(iter(mapping.items()))
    clash = new_path(root, fid, qsid)
    clash.mkdir(parents=True)
    (clash / "other").write_text("someone else's")
    result = migrate_cli(agent, "--mapping", str(write_csv(tmp_path / "m.csv", mapping)))
    assert result.returncode == 4
    assert fid in result.stdout and "conflicts" in result.stdout
    assert (clash / "other").read_text() == "someone else's"
    assert old_path(root, fid).is_dir()
    assert not (root / "version.txt").exists()


# -- PostgreSQL (the manager's vfolders table) ---------------------------------


def _pg_bin() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    assert found, "PostgreSQL server binaries missing: run packaging/dev-deps.sh --test (installs postgresql)"
    return found[-1].parent


def _as_postgres(argv: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    """A throwaway PostgreSQL cluster on a free loopback port; yields its DSN."""
    bindir = _pg_bin()
    tmp = Path(tempfile.mkdtemp(prefix="sa-pg-"))
    if os.geteuid() == 0:
        shutil.chown(tmp, "postgres", "postgres")
    data, port = tmp / "data", free_port()
    subprocess.run(_as_postgres([str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres",
                                 "--no-sync", "-E", "UTF8"]), check=True, capture_output=True)
    opts = f"-p {port} -k {tmp} -c listen_addresses=127.0.0.1 -c fsync=off"
    subprocess.run(_as_postgres([str(bindir / "pg_ctl"), "-D", str(data), "-o", opts, "-l", str(tmp / "log"),
                                 "-w", "-t", "60", "start"]), check=True, capture_output=True)
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(_as_postgres([str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"]),
                       capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)


def test_postgres_mapping_from_the_managers_vfolders_table(tmp_path: Path, postgres: str) -> None:
    import psycopg

    agent = layout2_agent(tmp_path / "a")
    root = agent.volume_root()
    mapping = make_old_volume(root, 30)
    # The manager stores typed scopes for some folders ("user:<uuid>"); they live under the UUID's hex.
    user = uuid.uuid4()
    for fid in list(mapping)[:10]:
        mapping[fid] = f"user:{user}"
    before = snapshots(root, mapping, new=False)
    with psycopg.connect(postgres, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS vfolders")
        conn.execute("CREATE TABLE vfolders (id UUID PRIMARY KEY, host VARCHAR(128), name VARCHAR(64), "
                     "quota_scope_id VARCHAR(64))")
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO vfolders (id, host, name, quota_scope_id) VALUES (%s, 'node:local', 'f', %s)",
                [(uuid.UUID(f), q) for f, q in mapping.items()],
            )
            # A folder on another volume: in the table, not on this disk; ignored.
            cur.execute("INSERT INTO vfolders VALUES (%s, 'other:vol', 'x', 'qs-alpha')", (uuid.uuid4(),))

    result = migrate_cli(agent, "--dsn", postgres)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "moved 30" in result.stdout
    assert_fully_migrated(root, mapping, before)
    assert (root / user.hex).is_dir()


def test_postgres_unreachable_is_a_clear_error(tmp_path: Path) -> None:
    agent = layout2_agent(tmp_path / "a")
    make_old_volume(agent.volume_root(), 1)
    result = migrate_cli(agent, "--dsn", f"postgresql://postgres@127.0.0.1:{free_port()}/postgres")
    assert result.returncode == 2
    assert "cannot read the manager's vfolders table" in result.stderr


# -- status ----------------------------------------------------------------------


def test_status_reports_volumes_scopes_and_health(tmp_path: Path) -> None:
    agent = layout2_agent(tmp_path / "a")
    root = agent.volume_root()
    mapping = make_old_volume(root, 9)
    down = run_cli(agent, "status", "--json")
    assert down.returncode == 5
    data = json.loads(down.stdout)
    assert data["volumes"][0]["health"] == "needs-migration" and not data["agent"]["answers"]

    assert migrate_cli(agent, "--mapping", str(write_csv(tmp_path / "m.csv", mapping))).returncode == 0
    agent.start()
    try:
        up = run_cli(agent, "status", "--json")
        assert up.returncode == 0, up.stdout + up.stderr
        data = json.loads(up.stdout)
        vol = data["volumes"][0]
        assert vol["health"] == "healthy" and data["agent"]["answers"]
        assert {s["qsid"]: s["vfolders"] for s in vol["scopes"]} == {q: 3 for q in SCOPES}
        table = run_cli(agent, "status")
        assert table.returncode == 0
        assert "qs-alpha" in table.stdout and "healthy" in table.stdout
    finally:
        agent.stop()
    assert_clean_log(agent)


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can hand files to another owner")
def test_run_as_root_keeps_the_agents_user_as_owner(tmp_path: Path) -> None:
    """Operators run migrate as root; the agent (its own user) must still own what it creates."""
    agent = layout2_agent(tmp_path / "a")
    root = agent.volume_root()
    mapping = make_old_volume(root, 6)
    nobody = 65534
    os.chown(agent.workdir, nobody, nobody)  # the catalogue's directory, like /var/lib/storage-agent
    os.chown(root, nobody, nobody)
    result = migrate_cli(agent, "--mapping", str(write_csv(tmp_path / "m.csv", mapping)))
    assert result.returncode == 0, result.stdout + result.stderr
    for path in [agent.workdir / "catalog.db", root / "version.txt"] + [root / q for q in SCOPES] + [
        new_path(root, f, q).parent for f, q in mapping.items()
    ]:
        assert path.stat().st_uid == nobody, f"{path} is owned by uid {path.stat().st_uid}"
