"""cephfs backend through its xattr adapter, mapped onto user.* xattrs of a real filesystem.

The test plays CephFS's MDS: :func:`propagate` writes the recursive statistics (``rbytes``, ``rfiles``,
``rsubdirs`` counting the directory itself, ``rentries``) that CephFS keeps on every directory.
"""

from __future__ import annotations

import errno
import os
import stat
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from backends.walk import tree_usage
from backends.xattrs import XattrAdapter
from tests.support import AgentProcess, assert_clean_log, make_agent

MiB = 2**20
USER = XattrAdapter("user.")


def _user_xattrs_work(path: Path) -> str | None:
    try:
        os.setxattr(path, "user.probe", b"1")
        os.removexattr(path, "user.probe")
    except OSError as e:
        return f"{path} does not take user.* xattrs: {e.strerror}"
    return None


def propagate(top: Path) -> tuple[int, int, int]:
    """Set ceph.dir.{rbytes,rfiles,rsubdirs,rentries} (as user.*) on every directory below and at ``top``."""
    rbytes = rfiles = 0
    rsubdirs = 1  # the directory itself
    for entry in os.scandir(top):
        st = entry.stat(follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            b, f, d = propagate(Path(entry.path))
            rbytes, rfiles, rsubdirs = rbytes + b, rfiles + f, rsubdirs + d
        else:
            rbytes += st.st_size
            rfiles += 1
    for name, value in (("rbytes", rbytes), ("rfiles", rfiles), ("rsubdirs", rsubdirs),
                        ("rentries", rfiles + rsubdirs)):
        USER.set(top, f"ceph.dir.{name}", value)
    return rbytes, rfiles, rsubdirs


def test_adapter_maps_ceph_names_onto_user_xattrs(tmp_path: Path) -> None:
    if reason := _user_xattrs_work(tmp_path):
        pytest.skip(reason)
    assert USER.name("ceph.quota.max_bytes") == "user.ceph.quota.max_bytes"
    assert USER.get(tmp_path, "ceph.quota.max_bytes") is None  # ENODATA = no quota
    USER.set(tmp_path, "ceph.quota.max_bytes", 12345)
    assert os.getxattr(tmp_path, "user.ceph.quota.max_bytes") == b"12345"
    assert USER.get_int(tmp_path, "ceph.quota.max_bytes") == 12345
    os.setxattr(tmp_path, "user.ceph.dir.rbytes", b"lots")
    with pytest.raises(OSError):
        USER.get_int(tmp_path, "ceph.dir.rbytes")
    native = XattrAdapter()
    assert native.name("ceph.dir.rbytes") == "ceph.dir.rbytes"
    with pytest.raises(OSError) as e:  # an ordinary filesystem has no ceph.* namespace
        native.get(tmp_path, "ceph.dir.rbytes")
    assert e.value.errno in (errno.EOPNOTSUPP, errno.ENOTSUP)
    with pytest.raises(ValueError):
        XattrAdapter("trusted.")


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    root = tmp_path_factory.mktemp("ceph") / "vol"
    root.mkdir()
    if reason := _user_xattrs_work(root):
        pytest.skip(reason)
    (root / "version.txt").write_text("3\n")
    proc = make_agent(
        tmp_path_factory.mktemp("agent"),
        volumes={"c": {"backend": "cephfs", "path": str(root), "options": {"xattr_prefix": "user."}}},
        usage={"enabled": False},  # every usage answer asks the backend afresh (the engine is tested below)
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


def describe(api: httpx.Client, qsid: str) -> dict:
    r = api.request("GET", "/quota-scope", json={"volume": "c", "qsid": qsid})
    assert r.status_code == 200, r.text
    return r.json()


def test_scope_limit_and_usage_are_ceph_xattrs(agent: AgentProcess, api: httpx.Client) -> None:
    qsid = f"qs-{uuid.uuid4().hex[:8]}"
    r = api.post("/quota-scope", json={"volume": "c", "qsid": qsid, "options": {"limit_bytes": 64 * MiB}})
    assert r.status_code == 204, r.text
    path = agent.volume_root("c") / qsid
    assert os.getxattr(path, "user.ceph.quota.max_bytes") == str(64 * MiB).encode()
    vfid = f"{qsid}/{uuid.uuid4().hex}"
    assert api.post("/folder/create", json={"volume": "c", "vfid": vfid}).status_code == 204
    h = vfid.split("/")[1]
    vf = path / h[0:2] / h[2:4] / h[4:]
    (vf / "d").mkdir()
    (vf / "d" / "a.bin").write_bytes(os.urandom(300_000))
    (vf / "b.txt").write_bytes(b"x" * 1234)
    os.symlink("b.txt", vf / "link")
    rbytes, _, _ = propagate(path)

    body = describe(api, qsid)
    assert body == {"used_bytes": rbytes, "limit_bytes": 64 * MiB}

    # the vfolder's usage is read from its own recursive stats (fast), and agrees with a walk
    r = api.request("GET", "/folder/usage", json={"volume": "c", "vfid": vfid})
    assert r.status_code == 200, r.text
    usage = r.json()
    walk = tree_usage(vf)
    assert usage["source"] == "fast"
    assert usage["file_count"] == walk.entries == 4
    # CephFS's rbytes sums file (and link) sizes; directories' st_size is the filesystem's own business
    dirs = sum(p.lstat().st_size for p in vf.rglob("*") if p.is_dir() and not p.is_symlink())
    assert usage["used_bytes"] == walk.size_bytes - dirs == 300_000 + 1234 + 5

    r = api.patch("/quota-scope", json={"volume": "c", "qsid": qsid, "options": {"limit_bytes": -1}})
    assert r.status_code == 204, r.text
    assert os.getxattr(path, "user.ceph.quota.max_bytes") == b"0"  # 0 removes a CephFS quota
    assert describe(api, qsid)["limit_bytes"] == -1

    r = api.request("DELETE", "/quota-scope", json={"volume": "c", "qsid": qsid})
    assert r.status_code == 409, r.text
    assert api.post("/folder/delete", json={"volume": "c", "vfid": vfid}).status_code == 204
    r = api.request("DELETE", "/quota-scope", json={"volume": "c", "qsid": qsid})
    assert r.status_code == 204, r.text
    assert not path.exists()


def test_without_recursive_stats_usage_falls_back_to_a_walk(agent: AgentProcess, api: httpx.Client) -> None:
    qsid = f"qs-{uuid.uuid4().hex[:8]}"
    assert api.post("/quota-scope", json={"volume": "c", "qsid": qsid}).status_code == 204
    # no rstats yet: the agent answers from its own catalogue (an empty scope), and there is no quota
    assert describe(api, qsid) == {"used_bytes": 0, "limit_bytes": -1}
    vfid = f"{qsid}/{uuid.uuid4().hex}"
    assert api.post("/folder/create", json={"volume": "c", "vfid": vfid}).status_code == 204
    r = api.request("GET", "/folder/usage", json={"volume": "c", "vfid": vfid})
    assert r.status_code == 200, r.text
    assert r.json()["source"] == "scan" and r.json()["file_count"] == 0


def test_volume_lists_fast_size(api: httpx.Client) -> None:
    (vol,) = [v for v in api.get("/volumes").json()["volumes"] if v["name"] == "c"]
    assert vol["backend"] == "cephfs"
    assert set(vol["capabilities"]) == {"vfolder", "quota", "fast-size"}
    r = api.request("GET", "/volume/hwinfo", json={"volume": "c"})
    assert r.json()["status"] == "healthy", r.text


def test_usage_engine_polls_the_recursive_stats(tmp_path: Path) -> None:
    """With the live usage engine, a cephfs vfolder's figure is polled from its rstats, never walked."""
    root = tmp_path / "vol"
    vf = root / "qs1" / "ab" / "cd" / ("ef" * 14)
    (vf / "sub").mkdir(parents=True)
    if reason := _user_xattrs_work(root):
        pytest.skip(reason)
    (root / "version.txt").write_text("3\n")
    (vf / "sub" / "x.bin").write_bytes(b"x" * 5000)
    propagate(root / "qs1")
    proc = make_agent(
        tmp_path / "agent",
        volumes={"c": {"backend": "cephfs", "path": str(root), "options": {"xattr_prefix": "user."}}},
        usage={"fast-poll-interval": 0.2},
    ).start()
    try:
        with proc.client() as api:
            vfid = "qs1/abcd" + "ef" * 14
            r = api.request("GET", "/folder/usage", json={"volume": "c", "vfid": vfid})
            assert r.status_code == 200, r.text
            assert (r.json()["source"], r.json()["file_count"], r.json()["used_bytes"]) == ("fast", 2, 5000)
            (vf / "y.bin").write_bytes(b"y" * 700)
            propagate(root / "qs1")  # the MDS catches up; the next poll sees it

            def figure() -> tuple[int, int]:
                body = api.request("GET", "/folder/usage", json={"volume": "c", "vfid": vfid}).json()
                return body["file_count"], body["used_bytes"]

            deadline = time.monotonic() + 10
            while figure() != (3, 5700) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert figure() == (3, 5700)
    finally:
        proc.stop()
    assert_clean_log(proc)
