"""Manager API behaviour beyond the conformance suite, against a real agent process."""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.support import AgentProcess, assert_clean_log, make_agent


def vpath(agent: AgentProcess, vfid: str) -> Path:
    qsid, fid = vfid.split("/")
    h = uuid.UUID(fid).hex
    return agent.volume_root() / qsid / h[:2] / h[2:4] / h[4:]


def call(api: httpx.Client, method: str, path: str, **body: object) -> httpx.Response:
    return api.request(method, path, json={"volume": "local", **body})


def test_many_requests_at_once(agent: AgentProcess, api: httpx.Client, vfid: str) -> None:
    root = vpath(agent, vfid)
    for i in range(50):
        (root / f"f{i}").write_bytes(b"x" * i)

    def one(i: int) -> int:
        with agent.client() as c:
            kind = i % 4
            if kind == 0:
                r = call(c, "GET", "/folder/usage", vfid=vfid)
                assert r.json()["file_count"] >= 50
            elif kind == 1:
                r = call(c, "POST", "/folder/file/list", vfid=vfid, relpath=".")
            elif kind == 2:
                r = call(c, "POST", "/folder/file/mkdir", vfid=vfid, relpath=f"dir{i}/sub")
            else:
                r = call(c, "GET", "/folder/used-bytes", vfid=vfid)
            return r.status_code

    with ThreadPoolExecutor(16) as ex:
        statuses = list(ex.map(one, range(64)))
    assert all(s in (200, 204) for s in statuses), statuses
    assert len([d for d in os.listdir(root) if d.startswith("dir")]) == 16


def test_unknown_route_and_method_are_json_4xx(api: httpx.Client) -> None:
    r = api.get("/no/such/route")
    assert r.status_code == 404 and "msg" in r.json()
    r = api.put("/folder/create", json={})
    assert r.status_code == 405 and "msg" in r.json()


def test_metadata_over_the_cap_is_refused(api: httpx.Client, vfid: str) -> None:
    r = call(api, "POST", "/folder/metadata", vfid=vfid, payload="x" * (10 * 2**20 + 1))
    assert r.status_code in (400, 413) and r.json()["msg"]
    r = call(api, "POST", "/folder/metadata", vfid=vfid, payload="y" * (2**20))
    assert r.status_code == 200
    assert call(api, "GET", "/folder/metadata", vfid=vfid).json()["payload"] == "y" * 2**20


def test_clone_keeps_symlinks_as_links_and_never_copies_outside_data(
    agent: AgentProcess, api: httpx.Client, scope: str, vfid: str, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"CANARY" * 1000)
    src = vpath(agent, vfid)
    (src / "real.txt").write_bytes(b"data")
    os.symlink(outside / "secret", src / "out-file")
    os.symlink(outside, src / "out-dir")
    os.symlink("real.txt", src / "in-link")
    os.link(src / "real.txt", src / "hard")
    dst = f"{scope}/{uuid.uuid4().hex}"
    r = api.post("/folder/clone", json={"src_volume": "local", "src_vfid": vfid, "dst_volume": "local",
                                        "dst_vfid": dst})
    assert r.status_code == 204, r.text
    d = vpath(agent, dst)
    assert os.readlink(d / "out-file") == str(outside / "secret")
    assert os.readlink(d / "out-dir") == str(outside)
    assert os.readlink(d / "in-link") == "real.txt"
    assert (d / "hard").read_bytes() == b"data"
    assert sorted(os.listdir(outside)) == ["secret"]
    assert not (agent.volume_root() / scope / ".staging").exists()
    # clone onto an existing vfolder is a 409 and changes nothing
    r = api.post("/folder/clone", json={"src_volume": "local", "src_vfid": vfid, "dst_vfid": dst})
    assert r.status_code == 409 and "already exists" in r.json()["msg"]


def test_clone_without_enough_space_leaves_nothing(tmp_path: Path) -> None:
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], check=True)
    try:
        (mnt / "version.txt").write_text("3\n")
        agent = make_agent(tmp_path / "a", volumes={"local": {"backend": "vfs", "path": str(mnt)}}).start()
        try:
            with agent.client() as api:
                assert call(api, "POST", "/quota-scope", qsid="qs").status_code == 204
                src = f"qs/{uuid.uuid4().hex}"
                assert call(api, "POST", "/folder/create", vfid=src).status_code == 204
                (vpath(agent, src) / "big.bin").write_bytes(os.urandom(1_300_000))
                dst = f"qs/{uuid.uuid4().hex}"
                r = api.post("/folder/clone", json={"src_volume": "local", "src_vfid": src, "dst_vfid": dst})
                assert r.status_code == 400, r.text
                assert "not enough free space" in r.json()["msg"]
                assert not vpath(agent, dst).exists()
                assert sorted(os.listdir(mnt / "qs")) == [src.split("/")[1][:2]]
        finally:
            agent.stop()
        assert_clean_log(agent)
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_rename_onto_an_existing_entry_keeps_both(agent: AgentProcess, api: httpx.Client, vfid: str) -> None:
    root = vpath(agent, vfid)
    (root / "a").write_bytes(b"a")
    (root / "b").write_bytes(b"b")
    r = call(api, "POST", "/folder/file/rename", vfid=vfid, relpath="a", new_name="b")
    assert r.status_code == 400 and r.json()["errno"] == 17 and r.json()["paths"] == ["a"]
    assert (root / "a").read_bytes() == b"a" and (root / "b").read_bytes() == b"b"
    r = call(api, "POST", "/folder/file/rename", vfid=vfid, relpath="a", new_name="../escape")
    assert r.status_code == 400 and r.json()["msg"]


def test_paths_escaping_through_a_planted_symlink_are_400(
    agent: AgentProcess, api: httpx.Client, vfid: str, tmp_path: Path
) -> None:
    outside = tmp_path / "out"
    outside.mkdir()
    root = vpath(agent, vfid)
    os.symlink(outside, root / "link")
    for method, path, extra in [
        ("GET", "/folder/mount", {"subpath": "link"}),
        ("POST", "/folder/file/mkdir", {"relpath": "link/new"}),
        ("POST", "/folder/file/list", {"relpath": "link"}),
        ("POST", "/folder/file/move", {"src_relpath": "link/x", "dst_relpath": "y"}),
        ("POST", "/folder/file/fetch", {"relpath": "link/x"}),
        ("POST", "/folder/file/delete", {"relpaths": ["link/x"]}),
    ]:
        r = call(api, method, path, vfid=vfid, **extra)
        assert r.status_code == 400, (path, r.status_code, r.text)
        assert "outside the vfolder" in r.json()["msg"], r.text
    assert os.listdir(outside) == []


def test_quota_scope_limit_round_trip_and_lift(api: httpx.Client, scope: str) -> None:
    r = api.patch("/quota-scope", json={"volume": "local", "qsid": scope, "options": {"limit_bytes": 12345}})
    assert r.status_code == 204
    assert api.request("GET", "/quota-scope", json={"volume": "local", "qsid": scope}).json()["limit_bytes"] == 12345
    r = api.patch("/quota-scope", json={"volume": "local", "qsid": scope, "options": {"limit_bytes": None}})
    assert r.status_code == 204
    assert api.request("GET", "/quota-scope", json={"volume": "local", "qsid": scope}).json()["limit_bytes"] == -1


def test_quota_scope_usage_is_the_sum_of_its_vfolders(agent: AgentProcess, api: httpx.Client, scope: str) -> None:
    vfids = []
    for size in (10_000, 250_000):
        vfid = f"{scope}/{uuid.uuid4().hex}"
        assert call(api, "POST", "/folder/create", vfid=vfid).status_code == 204
        (vpath(agent, vfid) / "f").write_bytes(os.urandom(size))
        vfids.append(vfid)
    deadline = time.monotonic() + 20  # usage follows writes through the watcher: poll, as the conformance does
    while True:
        parts = [call(api, "GET", "/folder/used-bytes", vfid=v).json()["used_bytes"] for v in vfids]
        r = api.request("GET", "/quota-scope", json={"volume": "local", "qsid": scope})
        settled = parts[0] >= 10_000 and parts[1] >= 250_000 and r.json()["used_bytes"] == sum(parts)
        if settled or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert parts[0] >= 10_000 and parts[1] >= 250_000
    assert r.json()["used_bytes"] == sum(parts)


def test_delete_vfolder_is_atomic_and_leaves_no_staging(agent: AgentProcess, api: httpx.Client, vfid: str) -> None:
    root = vpath(agent, vfid)
    for i in range(20):
        (root / f"d{i}").mkdir()
        (root / f"d{i}" / "f").write_bytes(b"x")
    assert call(api, "POST", "/folder/delete", vfid=vfid).status_code == 204
    scope_dir = agent.volume_root() / vfid.split("/")[0]
    assert os.listdir(scope_dir) == []
    assert call(api, "GET", "/folder/usage", vfid=vfid).status_code == 404


@pytest.mark.parametrize("body", [{"volume": "local", "qsid": "a" * 201}, {"volume": 7, "qsid": "ok"}])
def test_bad_quota_scope_params(api: httpx.Client, body: dict) -> None:
    r = api.post("/quota-scope", json=body)
    assert r.status_code == 400 and r.json()["type"].endswith("invalid-api-params")


def test_racing_creates_and_deletes_of_one_vfolder_answer_4xx_not_500(
    agent: AgentProcess, api: httpx.Client, scope: str
) -> None:
    def race(path: str, vfid: str) -> list[int]:
        def one(_: int) -> int:
            with agent.client() as c:
                return call(c, "POST", path, vfid=vfid).status_code

        with ThreadPoolExecutor(8) as ex:
            return sorted(ex.map(one, range(8)))

    for _ in range(5):
        vfid = f"{scope}/{uuid.uuid4().hex}"
        assert race("/folder/create", vfid) == [204] + [409] * 7
        assert vpath(agent, vfid).is_dir()
        deletes = race("/folder/delete", vfid)  # a vfolder the catalogue still lists is forgotten with a 204
        assert deletes[0] == 204 and set(deletes) <= {204, 404}, deletes
        assert not vpath(agent, vfid).exists()
    assert_clean_log(agent)


def test_mount_of_a_missing_or_non_directory_subpath_is_400(api: httpx.Client, agent: AgentProcess, vfid: str) -> None:
    (vpath(agent, vfid) / "file").write_bytes(b"x")
    for subpath, code in (("nope", "ENOENT"), ("file/below", "ENOTDIR")):
        r = call(api, "GET", "/folder/mount", vfid=vfid, subpath=subpath)
        assert r.status_code == 400, r.text
        assert r.json()["errno"] == getattr(__import__("errno"), code) and r.json()["paths"] == [subpath], r.text
    r = call(api, "GET", "/folder/mount", vfid=vfid, subpath="file")
    assert r.status_code == 200 and r.json()["path"].endswith(uuid.UUID(vfid.split("/")[1]).hex[4:])


def test_error_answers_carry_the_request_id_that_the_log_names(agent: AgentProcess, api: httpx.Client) -> None:
    r = api.post("/folder/file/list", json={"volume": "nowhere"}, headers={"X-Request-ID": "trace-42.a"})
    assert r.status_code == 400 and r.json()["request_id"] == "trace-42.a"
    unsafe = "bad id; rm -rf " + "x" * 80
    r = api.post("/folder/file/list", json={"volume": "nowhere"}, headers={"X-Request-ID": unsafe})
    own = r.json()["request_id"]
    assert own.isalnum() and len(own) == 16  # an unsafe id is replaced, never echoed into logs
    deadline = time.monotonic() + 5
    while "[request trace-42.a]" not in agent.log() or f"[request {own}]" not in agent.log():
        assert time.monotonic() < deadline, agent.log()
        time.sleep(0.05)
    line = next(x for x in agent.log().splitlines() if "[request trace-42.a]" in x)
    assert "POST /folder/file/list -> 400" in line
