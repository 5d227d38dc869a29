"""xfs backend: project files, the xfs_quota command interface (through a strict test double first on
PATH) driven by a real agent, and one test on a real XFS with project quotas where the kernel has them."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest

from backends.projectfiles import ProjectFiles
from backends.xfs import parse_project_report
from tests.loopfs import loop_mount, volume_root, why_no_loop
from tests.support import ROOT, AgentProcess, assert_clean_log, make_agent

FAKES = ROOT / "tests" / "fakes"
MiB = 2**20


# -- project files ----------------------------------------------------------------------------------


def test_project_ids_fill_gaps_and_keep_foreign_lines(tmp_path: Path) -> None:
    projects, projid = tmp_path / "projects", tmp_path / "projid"
    projid.write_text("# managed by hand\nother:2\n")
    projects.write_text("2:/srv/other\n")
    files = ProjectFiles(projects, projid)
    assert files.add("qs1", "/v/qs1") == 1
    assert files.add("qs10", "/v/qs10") == 3
    assert files.add("qs1", "/v/qs1") == 1  # idempotent
    assert projid.read_text() == "# managed by hand\nother:2\nqs1:1\nqs10:3\n"
    assert projects.read_text() == "2:/srv/other\n1:/v/qs1\n3:/v/qs10\n"
    assert files.remove("qs1") == 1  # exact match: qs10 stays (upstream's sed /qs1/d removed it too)
    assert projid.read_text() == "# managed by hand\nother:2\nqs10:3\n"
    assert projects.read_text() == "2:/srv/other\n3:/v/qs10\n"
    assert files.add("qs2", "/v/qs2") == 1  # the freed id is reused
    assert files.remove("nope") is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["projects", "projid", "projid.lock"]  # no temp files


def test_project_files_stay_consistent_under_concurrent_adds(tmp_path: Path) -> None:
    files = [ProjectFiles(tmp_path / "projects", tmp_path / "projid") for _ in range(4)]
    ids: dict[str, int] = {}

    def add(k: int) -> None:
        for i in range(10):
            name = f"qs{k}-{i}"
            ids[name] = files[k].add(name, f"/v/{name}")

    threads = [threading.Thread(target=add, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(ids.values()) == list(range(1, 41))
    assert files[0].ids() == ids
    assert {pid: paths for pid, paths in files[0].paths().items()} == {v: [f"/v/{k}"] for k, v in ids.items()}


def test_parse_project_report() -> None:
    text = (
        "#0                 1024          0          0     00 [--------]\n"
        "qs1                3072      10240      20480     00 [--------]\n"
        "qs10               4096       1024       2048     01 [6 days]\n"
    )
    rows = parse_project_report(text)
    assert [(r.name, r.used_bytes, r.soft_bytes, r.hard_bytes) for r in rows] == [
        ("#0", 1024 * 1024, 0, 0),
        ("qs1", 3072 * 1024, 10240 * 1024, 20480 * 1024),
        ("qs10", 4096 * 1024, 1024 * 1024, 2048 * 1024),
    ]
    with pytest.raises(ValueError):
        parse_project_report("xfs_quota: cannot setup path for mount /x: No such device\n")


# -- through a real agent, with the xfs_quota double --------------------------------------------------


@pytest.fixture(scope="module")
def fake_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    base = tmp_path_factory.mktemp("xfs")
    root = volume_root(base, "vol")
    env = {
        "projects": base / "etc" / "projects",
        "projid": base / "etc" / "projid",
        "log": base / "xfs_quota.calls",
        "state": base / "xfs_quota.state",
        "root": root,
    }
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PATH", f"{FAKES}:{os.environ['PATH']}")
        mp.setenv("FAKE_XFS_PROJECTS", str(env["projects"]))
        mp.setenv("FAKE_XFS_PROJID", str(env["projid"]))
        mp.setenv("FAKE_XFS_MOUNT", str(root))
        mp.setenv("FAKE_XFS_LOG", str(env["log"]))
        mp.setenv("FAKE_XFS_STATE", str(env["state"]))
        yield env


@pytest.fixture(scope="module")
def agent(fake_env: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    options = {
        "projects_file": str(fake_env["projects"]),
        "projid_file": str(fake_env["projid"]),
        "mount_point": str(fake_env["root"]),
    }
    proc = make_agent(
        tmp_path_factory.mktemp("agent"),
        volumes={"x": {"backend": "xfs", "path": str(fake_env["root"]), "options": options}},
    ).start()
    try:
        yield proc
    finally:
        proc.stop()
    assert_clean_log(proc)


@pytest.fixture
def api(agent: AgentProcess) -> Iterator[httpx.Client]:
    with agent.client() as c:
        yield c


def calls(env: dict[str, Path]) -> list[list[str]]:
    return [json.loads(line) for line in env["log"].read_text().splitlines()] if env["log"].exists() else []


def expected(env: dict[str, Path], command: str) -> list[str]:
    return ["-x", "-D", str(env["projects"]), "-P", str(env["projid"]), "-c", command, str(env["root"])]


def describe(api: httpx.Client, qsid: str) -> dict:
    r = api.request("GET", "/quota-scope", json={"volume": "x", "qsid": qsid})
    assert r.status_code == 200, r.text
    return r.json()


def test_scope_lifecycle_through_xfs_quota(fake_env: dict[str, Path], api: httpx.Client) -> None:
    qsid = f"qs-{uuid.uuid4().hex[:8]}"
    before = len(calls(fake_env))
    r = api.post("/quota-scope", json={"volume": "x", "qsid": qsid, "options": {"limit_bytes": 20 * MiB}})
    assert r.status_code == 204, r.text
    path = fake_env["root"] / qsid
    assert path.is_dir()
    pid = ProjectFiles(fake_env["projects"], fake_env["projid"]).id_of(qsid)
    assert pid is not None
    assert f"{qsid}:{pid}\n" in fake_env["projid"].read_text()
    assert f"{pid}:{path}\n" in fake_env["projects"].read_text()
    assert calls(fake_env)[before:] == [
        expected(fake_env, f"project -s {pid}"),
        expected(fake_env, f"limit -p bsoft={20 * MiB} bhard={20 * MiB} {pid}"),
    ]
    before = len(calls(fake_env))
    r = api.post("/quota-scope", json={"volume": "x", "qsid": qsid})  # again, without a limit: keeps the limit
    assert r.status_code == 204, r.text
    assert calls(fake_env)[before:] == []

    vfid = f"{qsid}/{uuid.uuid4().hex}"
    assert api.post("/folder/create", json={"volume": "x", "vfid": vfid}).status_code == 204
    h = vfid.split("/")[1]
    (path / h[0:2] / h[2:4] / h[4:] / "data.bin").write_bytes(os.urandom(3 * MiB))
    before = len(calls(fake_env))
    body = describe(api, qsid)
    assert calls(fake_env)[before:] == [expected(fake_env, "report -p -b -N")]
    assert body["limit_bytes"] == 20 * MiB
    assert 3 * MiB <= body["used_bytes"] < 4 * MiB

    before = len(calls(fake_env))
    r = api.patch("/quota-scope", json={"volume": "x", "qsid": qsid, "options": {"limit_bytes": -1}})
    assert r.status_code == 204, r.text
    assert calls(fake_env)[before:] == [expected(fake_env, f"limit -p bsoft=0 bhard=0 {pid}")]
    assert describe(api, qsid)["limit_bytes"] == -1

    r = api.request("DELETE", "/quota-scope", json={"volume": "x", "qsid": qsid})
    assert r.status_code == 409, r.text
    assert api.post("/folder/delete", json={"volume": "x", "vfid": vfid}).status_code == 204
    before = len(calls(fake_env))
    r = api.request("DELETE", "/quota-scope", json={"volume": "x", "qsid": qsid})
    assert r.status_code == 204, r.text
    assert not path.exists()
    assert calls(fake_env)[before:] == [expected(fake_env, f"limit -p bsoft=0 bhard=0 {pid}")]
    assert f"{qsid}:" not in fake_env["projid"].read_text()
    assert f":{path}\n" not in fake_env["projects"].read_text()


def test_numeric_scope_names_are_passed_as_ids_and_matched_exactly(api: httpx.Client) -> None:
    """An all-digit qsid is valid; xfs_quota would read it as a project id, so commands use the id."""
    names = ["7", f"7{uuid.uuid4().hex[:4]}"]
    for name, limit in zip(names, (4 * MiB, 8 * MiB), strict=True):
        r = api.post("/quota-scope", json={"volume": "x", "qsid": name, "options": {"limit_bytes": limit}})
        assert r.status_code == 204, r.text
    assert describe(api, names[0])["limit_bytes"] == 4 * MiB
    assert describe(api, names[1])["limit_bytes"] == 8 * MiB
    for name in names:
        assert api.request("DELETE", "/quota-scope", json={"volume": "x", "qsid": name}).status_code == 204


def test_failed_xfs_quota_call_leaves_nothing_behind(fake_env: dict[str, Path], agent: AgentProcess) -> None:
    """A scope whose project cannot be set up is rolled back: no directory, no project lines."""
    options = {"projects_file": str(fake_env["projects"]), "projid_file": str(fake_env["projid"]),
               "mount_point": "/not-the-mount"}  # the double refuses a wrong mount point
    other = make_agent(
        agent.workdir.parent / "agent-wrong-mount",
        volumes={"x": {"backend": "xfs", "path": str(fake_env["root"]), "options": options}},
    ).start()
    try:
        with other.client() as c:
            qsid = f"qs-{uuid.uuid4().hex[:8]}"
            r = c.post("/quota-scope", json={"volume": "x", "qsid": qsid, "options": {"limit_bytes": MiB}})
            assert r.status_code == 502, r.text
            assert "xfs_quota" in r.json()["msg"] and "wrong projects file" in r.json()["msg"]
    finally:
        other.stop()
    assert not (fake_env["root"] / qsid).exists()
    assert f"{qsid}:" not in fake_env["projid"].read_text()


def test_hwinfo_says_the_volume_is_not_on_xfs(api: httpx.Client) -> None:
    r = api.request("GET", "/volume/hwinfo", json={"volume": "x"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "degraded" and "not XFS" in body["status_info"], body
    (vol,) = [v for v in api.get("/volumes").json()["volumes"] if v["name"] == "x"]
    assert set(vol["capabilities"]) == {"vfolder", "quota", "metric"}


# -- a real XFS with project quotas ---------------------------------------------------------------------


def _kernel_reason(err: subprocess.CalledProcessError) -> str:
    log = subprocess.run(["dmesg"], capture_output=True, text=True).stdout.splitlines()
    found = [line.split("] ", 1)[-1] for line in log[-20:] if "XFS" in line and "quota" in line]
    return found[-1] if found else (err.stderr or str(err)).strip()


def test_real_xfs_project_quota(tmp_path: Path) -> None:
    if reason := why_no_loop("xfs"):
        pytest.skip(f"no loop-mounted XFS: {reason}")
    with ExitStack() as stack:
        try:
            mnt = stack.enter_context(loop_mount(tmp_path / "img", "xfs", "300M", "prjquota"))
        except subprocess.CalledProcessError as e:
            pytest.skip(f"this kernel cannot mount XFS with project quotas: {_kernel_reason(e)}")
        root = volume_root(mnt)
        options = {"projects_file": str(tmp_path / "projects"), "projid_file": str(tmp_path / "projid")}
        proc = make_agent(tmp_path / "agent", volumes={"x": {"backend": "xfs", "path": str(root), "options": options}})
        stack.callback(proc.stop)
        proc.start()
        with proc.client() as api:
            qsid = "real-xfs"
            r = api.post("/quota-scope", json={"volume": "x", "qsid": qsid, "options": {"limit_bytes": 2 * MiB}})
            assert r.status_code == 204, r.text
            vfid = f"{qsid}/{uuid.uuid4().hex}"
            assert api.post("/folder/create", json={"volume": "x", "vfid": vfid}).status_code == 204
            h = vfid.split("/")[1]
            with pytest.raises(OSError) as e, open(root / qsid / h[0:2] / h[2:4] / h[4:] / "big", "wb") as f:
                f.write(os.urandom(4 * MiB))
                f.flush()
                os.fsync(f.fileno())
            assert e.value.errno == 122  # EDQUOT
            body = describe(api, qsid)
            assert body["limit_bytes"] == 2 * MiB and body["used_bytes"] > 0
            r = api.request("GET", "/volume/hwinfo", json={"volume": "x"})
            assert r.json()["status"] == "healthy", r.text
            assert api.post("/folder/delete", json={"volume": "x", "vfid": vfid}).status_code == 204
            assert api.request("DELETE", "/quota-scope", json={"volume": "x", "qsid": qsid}).status_code == 204
        assert_clean_log(proc)
