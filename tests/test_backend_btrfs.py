"""btrfs backend on a real loop-mounted btrfs image, driven through a real agent's manager API."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from backends.btrfs import SUBVOLUME_ROOT_INO, BtrfsVolume, parse_device_stats, parse_qgroup_show
from backends.walk import tree_usage
from tests.loopfs import loop_mount, volume_root, why_no_loop
from tests.support import ROOT, AgentProcess, assert_clean_log, make_agent

REASON = why_no_loop("btrfs")
needs_btrfs = pytest.mark.skipif(REASON is not None, reason=f"no loop-mounted btrfs: {REASON}")
MiB = 2**20


@pytest.fixture(scope="module")
def mnt(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    if REASON:
        pytest.skip(f"no loop-mounted btrfs: {REASON}")
    with loop_mount(tmp_path_factory.mktemp("btrfs"), "btrfs", "512M") as m:
        yield m


@pytest.fixture(scope="module")
def agent(mnt: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    root = volume_root(mnt)
    proc = make_agent(tmp_path_factory.mktemp("agent"), volumes={"b": {"backend": "btrfs", "path": str(root)}})
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()
    assert_clean_log(proc)


@pytest.fixture
def api(agent: AgentProcess) -> Iterator[httpx.Client]:
    with agent.client() as c:
        yield c


def btrfs(*args: str) -> str:
    return subprocess.run(["btrfs", *args], check=True, capture_output=True, text=True).stdout


def new_scope(api: httpx.Client, limit: int | None = None) -> str:
    qsid = f"qs-{uuid.uuid4().hex[:8]}"
    options = None if limit is None else {"limit_bytes": limit}
    r = api.post("/quota-scope", json={"volume": "b", "qsid": qsid, "options": options})
    assert r.status_code == 204, r.text
    return qsid


def new_vfolder(api: httpx.Client, qsid: str) -> str:
    vfid = f"{qsid}/{uuid.uuid4().hex}"
    r = api.post("/folder/create", json={"volume": "b", "vfid": vfid})
    assert r.status_code == 204, r.text
    return vfid


def vf_path(agent: AgentProcess, vfid: str) -> Path:
    qsid, h = vfid.split("/")
    return agent.volume_root("b") / qsid / h[0:2] / h[2:4] / h[4:]


def describe(api: httpx.Client, qsid: str) -> dict:
    r = api.request("GET", "/quota-scope", json={"volume": "b", "qsid": qsid})
    assert r.status_code == 200, r.text
    return r.json()


def write(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        f.write(os.urandom(size))


# -- parsers (formats from BACKENDS.md, as btrfs-progs 6.2 prints them) --------------------------


def test_parse_qgroup_show_both_header_styles() -> None:
    new = (
        "Qgroupid    Referenced    Exclusive  Max referenced  Max exclusive   Path \n"
        "--------    ----------    ---------  --------------  -------------   ---- \n"
        "0/5              16384        16384            none           none   <toplevel>\n"
        "0/256         10469376     10469376        10485760           none   vol/qs 1\n"
    )
    rows = parse_qgroup_show(new)
    assert [(r.qgroupid, r.referenced, r.max_referenced, r.path) for r in rows] == [
        ("0/5", 16384, None, "<toplevel>"),
        ("0/256", 10469376, 10485760, "vol/qs 1"),
    ]
    old = "qgroupid rfer excl max_rfer max_excl \n-------- ---- ---- -------- -------- \n0/257 4096 4096 none 8192\n"
    (row,) = parse_qgroup_show(old)
    assert (row.qgroupid, row.exclusive, row.max_referenced, row.max_exclusive, row.path) == (
        "0/257", 4096, None, 8192, None
    )
    with pytest.raises(ValueError):
        parse_qgroup_show("ERROR: can't list qgroups: quotas not enabled\n")


def test_parse_device_stats() -> None:
    text = "[/dev/loop0].write_io_errs    0\n[/dev/loop0].read_io_errs     3\n[/dev/sdb].flush_io_errs 0\n"
    assert parse_device_stats(text) == {
        "/dev/loop0": {"write_io_errs": 0, "read_io_errs": 3},
        "/dev/sdb": {"flush_io_errs": 0},
    }


# -- through the agent ------------------------------------------------------------------------------


@needs_btrfs
def test_quotas_enabled_at_start_and_volume_listed(agent: AgentProcess, api: httpx.Client, mnt: Path) -> None:
    assert "btrfs quotas were not enabled" in agent.log()
    btrfs("qgroup", "show", str(mnt))  # would fail with "quotas not enabled"
    (vol,) = [v for v in api.get("/volumes").json()["volumes"] if v["name"] == "b"]
    assert vol["backend"] == "btrfs"
    assert set(vol["capabilities"]) == {"vfolder", "quota", "metric"}


@needs_btrfs
def test_scope_is_a_subvolume_with_its_own_qgroup_limit_set_and_lifted(agent: AgentProcess, api: httpx.Client) -> None:
    qsid = new_scope(api, limit=64 * MiB)
    path = agent.volume_root("b") / qsid
    assert os.lstat(path).st_ino == SUBVOLUME_ROOT_INO
    rootid = btrfs("inspect-internal", "rootid", str(path)).strip()
    rows = {r.qgroupid: r for r in parse_qgroup_show(btrfs("qgroup", "show", "-re", "--raw", str(path)))}
    assert rows[f"0/{rootid}"].max_referenced == 64 * MiB
    body = describe(api, qsid)
    assert body["limit_bytes"] == 64 * MiB and body["used_bytes"] >= 16384  # an empty subvolume references 16 KiB

    r = api.patch("/quota-scope", json={"volume": "b", "qsid": qsid, "options": {"limit_bytes": 32 * MiB}})
    assert r.status_code == 204, r.text
    assert describe(api, qsid)["limit_bytes"] == 32 * MiB
    r = api.patch("/quota-scope", json={"volume": "b", "qsid": qsid, "options": {"limit_bytes": -1}})
    assert r.status_code == 204, r.text
    assert describe(api, qsid)["limit_bytes"] == -1
    rows = {r.qgroupid: r for r in parse_qgroup_show(btrfs("qgroup", "show", "-re", "--raw", str(path)))}
    assert rows[f"0/{rootid}"].max_referenced is None

    # creating it again is not an error, and applies the limit asked for
    r = api.post("/quota-scope", json={"volume": "b", "qsid": qsid, "options": {"limit_bytes": 8 * MiB}})
    assert r.status_code == 204, r.text
    assert describe(api, qsid)["limit_bytes"] == 8 * MiB


@needs_btrfs
def test_write_past_limit_is_edquot_and_the_api_answers_4xx_naming_the_scope(
    agent: AgentProcess, api: httpx.Client
) -> None:
    big = new_scope(api)
    src = new_vfolder(api, big)
    write(vf_path(agent, src) / "data.bin", 6 * MiB)

    small = new_scope(api, limit=4 * MiB)
    # cloning 6 MiB into a 4 MiB scope: refused before copying, nothing left behind
    dst = f"{small}/{uuid.uuid4().hex}"
    r = api.post("/folder/clone", json={"src_volume": "b", "src_vfid": src, "dst_volume": "b", "dst_vfid": dst})
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["type"].endswith("/quota-exceeded") and repr(small) in body["msg"]
    assert not vf_path(agent, dst).exists()

    # the kernel enforces the limit on plain writes
    inside = new_vfolder(api, small)
    with pytest.raises(OSError) as e:
        write(vf_path(agent, inside) / "big.bin", 6 * MiB)
    assert e.value.errno == 122  # EDQUOT
    os.sync()

    # an upload into the full scope: 4xx naming the scope, and nothing published
    token = api.post(
        "/folder/file/upload", json={"volume": "b", "vfid": inside, "relpath": "up.bin", "size": 2 * MiB}
    ).json()["token"]
    r = httpx.patch(
        agent.client_url + "/upload",
        params={"token": token},
        headers={"Tus-Resumable": "1.0.0", "Upload-Offset": "0", "Content-Type": "application/offset+octet-stream"},
        content=b"u" * (2 * MiB),
        timeout=30,
    )
    assert r.status_code == 400, r.text
    assert r.json()["type"].endswith("/quota-exceeded") and repr(small) in r.json()["msg"], r.text
    assert not (vf_path(agent, inside) / "up.bin").exists()

    # a clone whose own writes hit EDQUOT (the scope is already full): 4xx naming the scope, staging cleaned up
    dst2 = f"{small}/{uuid.uuid4().hex}"
    r = api.post("/folder/clone", json={"src_volume": "b", "src_vfid": inside, "dst_volume": "b", "dst_vfid": dst2})
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["type"].endswith("/quota-exceeded") and repr(small) in body["msg"], body
    assert not vf_path(agent, dst2).exists()
    assert not (agent.volume_root("b") / small / ".staging").exists()

    # a full scope takes no new vfolder (4xx naming it), but its vfolders can still be deleted to make room
    r = api.post("/folder/create", json={"volume": "b", "vfid": f"{small}/{uuid.uuid4().hex}"})
    assert r.status_code == 400, r.text
    assert r.json()["type"].endswith("/quota-exceeded") and repr(small) in r.json()["msg"]
    r = api.post("/folder/delete", json={"volume": "b", "vfid": inside})
    assert r.status_code == 204, r.text
    assert not vf_path(agent, inside).exists()

    # lifting the limit lets the same clone through
    r = api.patch("/quota-scope", json={"volume": "b", "qsid": small, "options": {"limit_bytes": -1}})
    assert r.status_code == 204
    r = api.post("/folder/clone", json={"src_volume": "b", "src_vfid": src, "dst_volume": "b", "dst_vfid": dst})
    assert r.status_code == 204, r.text


@needs_btrfs
def test_clone_reflinks_shared_extents(agent: AgentProcess, api: httpx.Client) -> None:
    a, b = new_scope(api), new_scope(api)
    src = new_vfolder(api, a)
    (vf_path(agent, src) / "sub").mkdir()
    write(vf_path(agent, src) / "sub" / "data.bin", 8 * MiB)
    for dst_scope in (a, b):  # within one subvolume and across subvolumes
        dst = f"{dst_scope}/{uuid.uuid4().hex}"
        r = api.post("/folder/clone", json={"src_volume": "b", "src_vfid": src, "dst_volume": "b", "dst_vfid": dst})
        assert r.status_code == 204, r.text
        copy = vf_path(agent, dst) / "sub" / "data.bin"
        assert copy.read_bytes() == (vf_path(agent, src) / "sub" / "data.bin").read_bytes()
        os.sync()
        frag = subprocess.run(["filefrag", "-v", str(copy)], check=True, capture_output=True, text=True).stdout
        extents = [line for line in frag.splitlines() if line.strip()[:1].isdigit()]
        assert extents and all("shared" in line for line in extents), frag
        du = btrfs("filesystem", "du", "--raw", str(copy)).splitlines()[-1].split()
        total, exclusive = int(du[0]), int(du[1])
        assert total == 8 * MiB and exclusive == 0, du


@needs_btrfs
def test_scope_usage_from_qgroup_equals_a_walk_after_rescan(agent: AgentProcess, api: httpx.Client) -> None:
    qsid = new_scope(api)
    for n in range(3):
        vf = vf_path(agent, new_vfolder(api, qsid))
        for i in range(20):
            write(vf / f"f{i}.bin", 4096 * (i + 1) + 100 * n)  # over max_inline: every file has data extents
    os.sync()
    btrfs("quota", "rescan", "-w", str(agent.volume_root("b")))
    used = describe(api, qsid)["used_bytes"]
    walk = tree_usage(agent.volume_root("b") / qsid)
    # referenced = the scope's data extents (what a du walk counts) + its own metadata tree blocks (nodesize each)
    nodesize = 16384
    meta = used - walk.allocated_bytes
    assert meta >= nodesize and meta % nodesize == 0 and meta <= 16 * nodesize, (used, walk)
    # and the walk's figure is exactly the data btrfs itself counts in the scope
    total = btrfs("filesystem", "du", "-s", "--raw", str(agent.volume_root("b") / qsid)).splitlines()[-1].split()[0]
    assert int(total) == walk.allocated_bytes


@needs_btrfs
def test_delete_scope_only_when_empty_and_its_qgroup_goes(agent: AgentProcess, api: httpx.Client, mnt: Path) -> None:
    qsid = new_scope(api, limit=16 * MiB)
    path = agent.volume_root("b") / qsid
    rootid = btrfs("inspect-internal", "rootid", str(path)).strip()
    vfid = new_vfolder(api, qsid)
    write(vf_path(agent, vfid) / "keep.bin", 4096)
    r = api.request("DELETE", "/quota-scope", json={"volume": "b", "qsid": qsid})
    assert r.status_code == 409, r.text
    assert (vf_path(agent, vfid) / "keep.bin").exists()
    assert api.post("/folder/delete", json={"volume": "b", "vfid": vfid}).status_code == 204
    r = api.request("DELETE", "/quota-scope", json={"volume": "b", "qsid": qsid})
    assert r.status_code == 204, r.text
    assert not path.exists()
    groups = {r.qgroupid for r in parse_qgroup_show(btrfs("qgroup", "show", "-re", "--raw", str(mnt)))}
    assert f"0/{rootid}" not in groups
    r = api.request("GET", "/quota-scope", json={"volume": "b", "qsid": qsid})
    assert r.status_code == 404


@needs_btrfs
def test_hwinfo_reports_devices_and_metric_from_diskstats(api: httpx.Client) -> None:
    r = api.request("GET", "/volume/hwinfo", json={"volume": "b"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "healthy", body
    assert body["metadata"]["devices"].startswith("/dev/loop")
    r = api.request("GET", "/volume/performance-metric", json={"volume": "b"})
    assert r.status_code == 200, r.text
    metric = r.json()["metric"]
    keys = {"iops_read", "iops_write", "io_bytes_read", "io_bytes_write", "io_usec_read", "io_usec_write"}
    assert set(metric) == keys
    assert all(v >= 0 for v in metric.values())


@needs_btrfs
def test_hwinfo_degraded_on_device_errors(agent: AgentProcess, tmp_path: Path) -> None:
    """Device error counters come from `btrfs device stats`; a wrapper reports a failing second device."""
    wrapper = tmp_path / "btrfs"
    wrapper.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = device ] && [ "$2" = stats ]; then\n'
        '  btrfs "$@" && printf "[/dev/sdz].write_io_errs    0\\n[/dev/sdz].corruption_errs  7\\n"; exit $?\n'
        "fi\n"
        'exec btrfs "$@"\n'
    )
    wrapper.chmod(0o755)
    vol = BtrfsVolume("b", agent.volume_root("b"), {"btrfs_cmd": [str(wrapper)]})
    info = asyncio.run(vol.hwinfo())
    assert info.status == "degraded", info
    assert info.status_info == "btrfs device errors: /dev/sdz corruption_errs=7"
    assert "/dev/sdz" in info.metadata["devices"] and "/dev/loop" in info.metadata["devices"]


@needs_btrfs
def test_hwinfo_degraded_when_the_filesystem_goes_read_only(api: httpx.Client, mnt: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
    try:
        body = api.request("GET", "/volume/hwinfo", json={"volume": "b"}).json()
        assert body["status"] == "degraded" and "read-only" in body["status_info"], body
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(mnt)], check=True)
    assert api.request("GET", "/volume/hwinfo", json={"volume": "b"}).json()["status"] == "healthy"


@needs_btrfs
def test_conformance_suite_on_a_btrfs_volume(tmp_path: Path) -> None:
    with loop_mount(tmp_path / "conf", "btrfs", "512M") as m:
        root = volume_root(m)
        done = subprocess.run(
            [sys.executable, str(ROOT / "tests" / "run_conformance.py"), "--volume-backend", "btrfs",
             "--volume-path", str(root)],
            capture_output=True, text=True, timeout=600,
        )
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-3000:]
    assert " passed" in done.stdout and " failed" not in done.stdout
