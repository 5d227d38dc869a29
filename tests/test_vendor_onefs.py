"""dellemc-onefs backend against the OneFS Platform API simulator, through a real agent process."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.simulators import scenarios as sc
from tests.simulators.onefs import OnefsSimulator
from tests.support import assert_clean_log

APPLIANCE = "PowerScale OneFS"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[sc.VendorEnv]:
    def options(sim: OnefsSimulator) -> dict[str, object]:
        # dell_admin is the 23.03.5 key for the user name; dell_username is accepted too
        return {
            "dell_endpoint": sim.url,
            "dell_admin": "root",
            "dell_password": "a",
            "dell_api_version": "12",
            "dell_system_name": "nfs",
            "dell_ifs_path": "/ifs/data/ai",
            "request_timeout": 2,
        }

    with sc.vendor_env(tmp_path_factory.mktemp("onefs"), "dellemc-onefs", OnefsSimulator, options) as e:
        yield e


@pytest.fixture
def qsid(env: sc.VendorEnv) -> str:
    q = sc.new_qsid()
    sc.create_scope(env, q, 2**30)
    return q


def _state(env: sc.VendorEnv):
    def state(qsid: str) -> tuple[int, int | None]:
        found = env.sim.quota_for(qsid)
        assert found is not None, f"no directory quota on {qsid}"
        return found

    return state


def test_volume_capabilities(env: sc.VendorEnv) -> None:
    sc.check_volume_listed(env, {"vfolder", "quota", "metric", "fast-fs-size"})


def test_quota_roundtrip(env: sc.VendorEnv) -> None:
    sc.quota_roundtrip(env, _state(env), lambda q: env.sim.quota_for(q) is not None)


def test_scope_without_limit(env: sc.VendorEnv) -> None:
    sc.scope_without_limit(env, _state(env))


def test_quota_shape_on_the_appliance(env: sc.VendorEnv, qsid: str) -> None:
    (q,) = [q for q in env.sim.quotas.values() if q["path"] == f"/ifs/data/ai/{qsid}"]
    assert q["type"] == "directory" and q["enforced"] is True and q["include_snapshots"] is False
    assert q["thresholds_on"] == "fslogicalsize" and q["thresholds"]["hard"] == 2**30
    assert not (env.root / qsid / ".quota_id").exists()


def test_fs_usage(env: sc.VendorEnv) -> None:
    sc.fs_usage_matches(env, env.sim.pools_total)


def test_5xx_retried(env: sc.VendorEnv, qsid: str) -> None:
    sc.retried_5xx(env, qsid, "/quota/quotas")


def test_slow_answer_retried(env: sc.VendorEnv, qsid: str) -> None:
    sc.slow_answer_retried(env, qsid, 2.5)


def test_permanent_failure(env: sc.VendorEnv, qsid: str) -> None:
    sc.permanent_failure(env, qsid, APPLIANCE, "/quota/quotas")


def test_auth_failure(env: sc.VendorEnv, qsid: str) -> None:
    sim: OnefsSimulator = env.sim

    def break_auth() -> None:
        sim.credentials = ("root", "rotated")

    def restore() -> None:
        sim.credentials = ("root", "a")

    sc.auth_failure(env, qsid, APPLIANCE, break_auth, restore)


def test_hwinfo_and_metric(env: sc.VendorEnv) -> None:
    info = sc.hwinfo(env)
    assert info["status"] == "healthy", info
    assert info["metadata"]["cluster_name"] == "onefs-sim"
    assert info["metadata"]["onefs_release"] == "9.5.0.0"
    s, w = env.sim.protocol, env.sim.workload
    assert sc.metric(env) == {
        "iops_read": int(s["disk"]["iops"]),
        "iops_write": 0,
        "io_bytes_read": int(s["onefs"]["out"]),
        "io_bytes_write": int(s["onefs"]["in"]),
        "io_usec_read": w["latency_read"],
        "io_usec_write": w["latency_write"],
    }


def test_create_answered_5xx_is_not_repeated(env: sc.VendorEnv) -> None:
    """The appliance made the quota but its answer was a 500: no second POST (it would meet a 409), a clean 502."""
    qsid = sc.new_qsid()
    posts = env.sim.count("POST", "/quota/quotas")
    env.sim.fail(500, times=5, path_contains="/quota/quotas", method="POST", applied=True)
    try:
        r = env.call("POST", "/quota-scope", qsid=qsid, options={"limit_bytes": 2**20})
    finally:
        env.sim.clear_faults()
    assert r.status_code == 502, r.text
    msg = r.json()["msg"]
    assert APPLIANCE in msg and "HTTP 500" in msg and qsid in msg, msg
    assert env.sim.count("POST", "/quota/quotas") == posts + 1
    assert env.sim.quota_for(qsid) == (0, 2**20)  # it was applied
    sc.create_scope(env, qsid, 2**20)  # the manager's retry finds that quota and keeps it
    assert [q["path"] for q in env.sim.quotas.values()].count(f"/ifs/data/ai/{qsid}") == 1
    assert_clean_log(env.agent)


def test_create_meeting_an_existing_quota_updates_it(env: sc.VendorEnv, qsid: str) -> None:
    """A quota that appears between the lookup and the POST (409 "already exists") gets the limit instead."""
    env.sim.garble('{"quotas": [], "resume": null, "total": 0}', path_contains="/quota/quotas?", method="GET")
    r = env.call("PATCH", "/quota-scope", qsid=qsid, options={"limit_bytes": 3 * 2**20})
    assert r.status_code == 204, r.text
    assert env.sim.quota_for(qsid) == (0, 3 * 2**20)
    assert [q["path"] for q in env.sim.quotas.values()].count(f"/ifs/data/ai/{qsid}") == 1
    assert env.sim.count("PUT", "/quota/quotas/") >= 1


def test_hwinfo_degraded_by_pool_health(env: sc.VendorEnv) -> None:
    pool = env.sim.pools[1]
    pool["health_flags"] = ["devices_down"]
    try:
        info = sc.hwinfo(env)
    finally:
        pool["health_flags"] = []
    assert info["status"] == "degraded", info
    assert info["status_info"] == "node pool 'x410_pool': devices_down"
    assert info["metadata"]["cluster_name"] == "onefs-sim"
    assert sc.hwinfo(env)["status"] == "healthy"


GARBLED = [
    sc.Garbled("describe", "/quota/quotas", "{}", "quota scope 'QSID'", "no quotas"),
    sc.Garbled(
        "describe", "/quota/quotas", sc.HTML_PAGE, "quota scope 'QSID'", "text '<html>", content_type="text/html"
    ),
    # the quota found by path carries no id to PUT to
    sc.Garbled(
        "set-limit",
        "/quota/quotas?",
        '{"quotas": [{"path": "/ifs/data/ai/QSID", "type": "directory"}]}',
        "quota scope 'QSID'",
        "no id",
    ),
    sc.Garbled(
        "describe",
        "/quota/quotas?",
        '{"quotas": [{"path": "/ifs/data/ai/QSID", "type": "directory", "thresholds": "none"}]}',
        "quota scope 'QSID'",
        "thresholds is text 'none', not an object",
    ),
    sc.Garbled(
        "fs-usage",
        "/storagepools",
        '{"storagepools": [{"type": "nodepool", "usage": {"total_bytes": "n/a"}}]}',
        "storage pools",
        "usage.total_bytes is text 'n/a', not a number",
    ),
    sc.Garbled(
        "metric",
        "/protocol-stats",
        '{"protocol-stats": []}',
        "protocol statistics",
        "protocol-stats is a list, not an object",
    ),
    sc.Garbled(
        "hwinfo",
        "/storagepools",
        '{"storagepools": [{"name": "p", "health_flags": "bad"}]}',
        "storage pool health",
        "health_flags is text 'bad', not a list",
    ),
]


@pytest.mark.parametrize("case", GARBLED, ids=sc.garbled_case_id)
def test_malformed_answer(env: sc.VendorEnv, qsid: str, case: sc.Garbled) -> None:
    sc.malformed_answer(env, case, qsid, APPLIANCE)


def test_without_dell_ifs_path_quotas_are_named_by_the_volume_path(tmp_path: Path) -> None:
    """An upstream config has no dell_ifs_path (upstream names each quota by the scope's local path): the volume
    starts (it was refused with exit 2) and its quotas land on <volume path>/<qsid> on the cluster."""
    root = tmp_path / "mount"

    def options(sim: OnefsSimulator) -> dict[str, object]:
        return {"dell_endpoint": sim.url, "dell_admin": "root", "dell_password": "a", "dell_api_version": "12",
                "dell_system_name": "nfs", "request_timeout": 2}

    with sc.vendor_env(tmp_path, "dellemc-onefs", lambda m: OnefsSimulator(m, ifs_path=str(root)), options) as env:
        q = sc.new_qsid()
        sc.create_scope(env, q, 2**30)
        found = env.sim.quota_for(q)
        assert found is not None and found[1] == 2**30, found
        assert "no dell_ifs_path" in env.agent.log()
