"""gpfs backend (and its alias spectrumscale) against the Storage Scale REST simulator, through a real agent."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.simulators import scenarios as sc
from tests.simulators.gpfs import GpfsSimulator, limit_kib

APPLIANCE = "GPFS"
OWNER = "1234:5678"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[sc.VendorEnv]:
    def options(sim: GpfsSimulator) -> dict[str, object]:
        return {
            "gpfs_endpoint": sim.url,
            "gpfs_username": "admin",
            "gpfs_password": "admin001",
            "gpfs_fs_name": "gpfs0",
            "gpfs_verify_ssl": False,
            "gpfs_owner": OWNER,
            "gpfs_job_poll_interval": 0.02,
            "gpfs_job_timeout": 3,
        }

    with sc.vendor_env(tmp_path_factory.mktemp("gpfs"), "spectrumscale", GpfsSimulator, options) as e:
        yield e


@pytest.fixture
def qsid(env: sc.VendorEnv) -> str:
    q = sc.new_qsid()
    sc.create_scope(env, q, 2**30)
    return q


def test_volume_capabilities(env: sc.VendorEnv) -> None:
    r = env.api.get("/volumes")
    (vol,) = r.json()["volumes"]
    assert vol["backend"] == "gpfs"  # spectrumscale is an alias of gpfs
    assert set(vol["capabilities"]) == {"vfolder", "quota", "metric", "fast-fs-size"}


def test_quota_roundtrip_with_jobs(env: sc.VendorEnv) -> None:
    sim: GpfsSimulator = env.sim
    created: dict[str, tuple[str, str | None]] = {}  # qsid -> (junction path, owner) as the appliance stored them

    def has_fileset(qsid: str) -> bool:
        if sim.scope_fileset(qsid):
            created.setdefault(qsid, (sim.filesets[qsid]["config"]["path"], sim.owners[qsid]))
        return sim.scope_fileset(qsid)

    sim.job_polls = 3  # each job is RUNNING for two polls before it completes
    try:
        sc.quota_roundtrip(env, sim.quota_of, has_fileset)
    finally:
        sim.job_polls = 1
    # the fileset was created as the owner the options name, linked at the scope path
    ((qsid, (junction, owner)),) = created.items()
    assert junction == str(env.root / qsid)
    assert owner == OWNER
    assert sim.count("GET", "/jobs/") >= 3 * 4


def test_scope_without_limit(env: sc.VendorEnv) -> None:
    sc.scope_without_limit(env, env.sim.quota_of)


def test_limit_rounds_up_to_kib(env: sc.VendorEnv, qsid: str) -> None:
    r = env.call("PATCH", "/quota-scope", qsid=qsid, options={"limit_bytes": 1_000_000})
    assert r.status_code == 204, r.text
    assert env.sim.limits_kib[qsid] == limit_kib("977K")
    assert sc.describe(env, qsid)["limit_bytes"] == 977 * 1024


def test_failed_job_is_a_clean_error(env: sc.VendorEnv, qsid: str) -> None:
    env.sim.fail_jobs.append("EFSSG0071C Quota could not be set: disk quota is not enabled")
    r = env.call("PATCH", "/quota-scope", qsid=qsid, options={"limit_bytes": 2**20})
    assert r.status_code == 502, r.text
    msg = r.json()["msg"]
    assert "GPFS" in msg and "FAILED" in msg and "quota is not enabled" in msg and qsid in msg


def test_job_that_never_finishes(env: sc.VendorEnv, qsid: str) -> None:
    env.sim.job_polls = 10**6
    try:
        r = env.call("PATCH", "/quota-scope", qsid=qsid, options={"limit_bytes": 2**20})
    finally:
        env.sim.job_polls = 1
    assert r.status_code == 502, r.text
    assert "still RUNNING after 3 s" in r.json()["msg"] and qsid in r.json()["msg"]


def test_fs_usage(env: sc.VendorEnv) -> None:
    sc.fs_usage_matches(env, env.sim.totals)


def test_5xx_retried(env: sc.VendorEnv, qsid: str) -> None:
    sc.retried_5xx(env, qsid, "/quotas")


def test_permanent_failure(env: sc.VendorEnv, qsid: str) -> None:
    sc.permanent_failure(env, qsid, APPLIANCE, "/quotas")


def test_auth_failure(env: sc.VendorEnv, qsid: str) -> None:
    sim: GpfsSimulator = env.sim

    def break_auth() -> None:
        sim.credentials = ("admin", "rotated")

    def restore() -> None:
        sim.credentials = ("admin", "admin001")

    sc.auth_failure(env, qsid, APPLIANCE, break_auth, restore)


def test_hwinfo_and_metric(env: sc.VendorEnv) -> None:
    info = sc.hwinfo(env)
    assert info["status"] == "healthy", info
    assert info["metadata"]["cluster_name"] == "gpfs-sim.example"
    env.sim.node_states["node2"] = "DEGRADED"
    try:
        info = sc.hwinfo(env)
    finally:
        env.sim.node_states["node2"] = "HEALTHY"
    assert info["status"] == "degraded" and "node2" in info["status_info"]
    p = env.sim.perf
    assert sc.metric(env) == {
        "iops_read": int(p[0]),
        "iops_write": int(p[1]),
        "io_bytes_read": int(p[2]),
        "io_bytes_write": int(p[3]),
        "io_usec_read": p[4],
        "io_usec_write": 0.0,
    }


GARBLED = [
    sc.Garbled("describe", "/quotas", "{}", "quota scope 'QSID'", "no quotas"),
    sc.Garbled("describe", "/quotas", sc.HTML_PAGE, "quota scope 'QSID'", "text '<html>", content_type="text/html"),
    # the mutation's answer names no job: nothing shows the limit was set
    sc.Garbled("set-limit", "/quotas", '{"status": {"code": 202}}', "QSID", "no jobs", method="POST", status=202),
    sc.Garbled("set-limit", "/jobs/", '{"jobs": ["COMPLETED"]}', "QSID", "jobs.0 is text"),
    sc.Garbled("fs-usage", "/pools", '{"storagePool": [{}]}', "storage pools", "no storagePoolName"),
    sc.Garbled("fs-usage", "/pools/", '{"storagePool": {}}', "storage pool", "storagePool is an object, not a list"),
    sc.Garbled(
        "metric", "/perfmon", '{"performanceData": {"rows": [{"values": ["n/a"]}]}}', "performance", "not a number"
    ),
    sc.Garbled("hwinfo", "/nodes", '{"nodes": [{}]}', "list cluster nodes", "no adminNodeName"),
    sc.Garbled("hwinfo", "/health/states", "[]", "read health of node", "the answer is a list"),
]


@pytest.mark.parametrize("case", GARBLED, ids=sc.garbled_case_id)
def test_malformed_answer(env: sc.VendorEnv, qsid: str, case: sc.Garbled) -> None:
    sc.malformed_answer(env, case, qsid, APPLIANCE)
