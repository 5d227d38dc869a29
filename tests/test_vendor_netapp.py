"""netapp backend against the ONTAP REST simulator, through a real agent process."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.simulators import scenarios as sc
from tests.simulators.netapp import NetappSimulator

APPLIANCE = "NetApp ONTAP"


def options(sim: NetappSimulator) -> dict[str, object]:
    return {
        "netapp_ontap_endpoint": sim.url,
        "netapp_ontap_user": "admin",
        "netapp_ontap_password": "netapp1!",
        "netapp_volume_name": "vol1",
        "netapp_svm": "svm0",
        "netapp_job_poll_interval": 0.02,
    }


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[sc.VendorEnv]:
    with sc.vendor_env(tmp_path_factory.mktemp("netapp"), "netapp", NetappSimulator, options) as e:
        yield e


@pytest.fixture
def qsid(env: sc.VendorEnv) -> str:
    q = sc.new_qsid()
    sc.create_scope(env, q, 2**30)
    return q


def test_volume_capabilities(env: sc.VendorEnv) -> None:
    sc.check_volume_listed(env, {"vfolder", "quota", "metric", "fast-fs-size"})


def test_quota_roundtrip(env: sc.VendorEnv) -> None:
    env.sim.quota_enabled = True  # an operator switched quotas on already: ONTAP's "already on" job failure is fine
    env.sim.job_polls = 2
    try:
        sc.quota_roundtrip(env, env.sim.report, lambda q: q in env.sim.qtrees)
    finally:
        env.sim.job_polls = 1
    assert env.sim.quota_enabled
    assert env.sim.count("PATCH", f"/storage/volumes/{env.sim.vol_uuid}") == 1
    assert not env.sim.rules or all(r["qtree.name"] in env.sim.qtrees for r in env.sim.rules.values())


def test_quotas_switched_on_by_the_backend(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Quotas off on the volume (ONTAP's default): the first limit switches them on with the documented PATCH."""
    with sc.vendor_env(tmp_path_factory.mktemp("netapp-quota-off"), "netapp", NetappSimulator, options) as env:
        sim: NetappSimulator = env.sim
        assert not sim.quota_enabled
        qsid = sc.new_qsid()
        sc.create_scope(env, qsid, 4 * 2**20)
        assert sim.quota_enabled
        assert sim.volume_patches == [{"quota.enabled": True}]
        assert sc.describe(env, qsid) == {"used_bytes": 0, "limit_bytes": 4 * 2**20}  # reports exist now
        assert sc.hwinfo(env)["metadata"]["quota_state"] == "on"
        sc.create_scope(env, sc.new_qsid(), 2**20)
        assert len(sim.volume_patches) == 1  # switched on once per agent run


def test_scope_without_limit(env: sc.VendorEnv) -> None:
    sc.scope_without_limit(env, env.sim.report)


def test_clearing_the_limit_removes_the_rule(env: sc.VendorEnv, qsid: str) -> None:
    assert any(r["qtree.name"] == qsid for r in env.sim.rules.values())
    r = env.call("PATCH", "/quota-scope", qsid=qsid, options={"limit_bytes": -1})
    assert r.status_code == 204, r.text
    assert not any(r["qtree.name"] == qsid for r in env.sim.rules.values())
    assert sc.describe(env, qsid)["limit_bytes"] == -1


def test_fs_usage(env: sc.VendorEnv, qsid: str) -> None:
    sc.put_vfolder_file(env, qsid, 70_000)
    sc.fs_usage_matches(env, lambda: (env.sim.size, env.sim.volume_used()))


def test_5xx_retried(env: sc.VendorEnv, qsid: str) -> None:
    sc.retried_5xx(env, qsid, "/quota/reports")


def test_permanent_failure(env: sc.VendorEnv, qsid: str) -> None:
    sc.permanent_failure(env, qsid, APPLIANCE, "/quota/reports")


def test_auth_failure(env: sc.VendorEnv, qsid: str) -> None:
    sim: NetappSimulator = env.sim

    def break_auth() -> None:
        sim.credentials = ("admin", "rotated")

    def restore() -> None:
        sim.credentials = ("admin", "netapp1!")

    sc.auth_failure(env, qsid, APPLIANCE, break_auth, restore)


def test_hwinfo_and_metric(env: sc.VendorEnv) -> None:
    info = sc.hwinfo(env)
    assert info["status"] == "healthy", info
    assert info["metadata"]["quota_state"] == "on"
    env.sim.state = "offline"
    try:
        info = sc.hwinfo(env)
    finally:
        env.sim.state = "online"
    assert info["status"] == "degraded" and "offline" in info["status_info"]
    s = env.sim.statistics
    assert sc.metric(env) == {
        "iops_read": s["iops_raw"]["read"],
        "iops_write": s["iops_raw"]["write"],
        "io_bytes_read": s["throughput_raw"]["read"],
        "io_bytes_write": s["throughput_raw"]["write"],
        "io_usec_read": s["latency_raw"]["read"] / s["iops_raw"]["read"],
        "io_usec_write": s["latency_raw"]["write"] / s["iops_raw"]["write"],
    }


GARBLED = [
    sc.Garbled("describe", "/quota/reports", "{}", "quota scope 'QSID'", "no records"),
    sc.Garbled(
        "describe", "/quota/reports", sc.HTML_PAGE, "quota scope 'QSID'", "text '<html>", content_type="text/html"
    ),
    sc.Garbled(
        "describe",
        "/quota/reports",
        '{"records": [{"space": {"used": {"total": "?"}}}]}',
        "quota scope 'QSID'",
        "space.used.total is text '?', not a number",
    ),
    # a job poll answered by a proxy's error page
    sc.Garbled("set-limit", "/cluster/jobs/", sc.HTML_PAGE, "QSID", "text '<html>", content_type="text/html"),
    # 202 (Accepted) that names no job: nothing shows the change was made
    sc.Garbled("set-limit", "/storage/quota/rules/", "{}", "QSID", "no job", method="PATCH", status=202),
    sc.Garbled("fs-usage", "/storage/volumes/", '{"space": {"size": 1}}', "volume space", "no space.used"),
    sc.Garbled(
        "metric",
        "/storage/volumes/",
        '{"statistics": {"iops_raw": {"read": "lots"}}}',
        "statistics",
        "iops_raw.read is text 'lots', not a number",
    ),
    sc.Garbled("hwinfo", "/storage/volumes/", '{"uuid": "x"}', "read volume state", "no state"),
]


@pytest.mark.parametrize("case", GARBLED, ids=sc.garbled_case_id)
def test_malformed_answer(env: sc.VendorEnv, qsid: str, case: sc.Garbled) -> None:
    sc.malformed_answer(env, case, qsid, APPLIANCE)
