"""purestorage backend against the FlashBlade REST 1.x simulator, through a real agent process.

FlashBlade has no directory quota: scopes are plain directories whose limit the
agent records and whose usage it counts itself; the appliance supplies fs usage,
array info and NFS performance.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.simulators import scenarios as sc
from tests.simulators.purestorage import PureSimulator

APPLIANCE = "FlashBlade"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[sc.VendorEnv]:
    def options(sim: PureSimulator) -> dict[str, object]:
        return {
            "purity_endpoint": sim.url,
            "purity_api_token": "T-0000-sim",
            "purity_api_version": "1.8",
            "purity_fs_name": "fs1",
            "purity_ssl_verify": False,
        }

    with sc.vendor_env(tmp_path_factory.mktemp("pure"), "purestorage", PureSimulator, options) as e:
        yield e


def test_volume_capabilities(env: sc.VendorEnv) -> None:
    sc.check_volume_listed(env, {"vfolder", "metric", "fast-fs-size"})


def test_scope_roundtrip_as_directories(env: sc.VendorEnv) -> None:
    qsid = sc.new_qsid()
    sc.create_scope(env, qsid, 10 * 2**20)
    assert sc.describe(env, qsid)["limit_bytes"] == 10 * 2**20  # recorded by the agent; FlashBlade cannot enforce it
    vfid = sc.put_vfolder_file(env, qsid, 4096)
    r = env.call("PATCH", "/quota-scope", qsid=qsid, options={"limit_bytes": 20 * 2**20})
    assert r.status_code == 204, r.text
    assert sc.describe(env, qsid)["limit_bytes"] == 20 * 2**20
    assert env.call("DELETE", "/quota-scope", qsid=qsid).status_code == 409
    assert env.call("POST", "/folder/delete", vfid=vfid).status_code == 204
    assert env.call("DELETE", "/quota-scope", qsid=qsid).status_code == 204
    assert not (env.root / qsid).exists()


def test_fs_usage(env: sc.VendorEnv) -> None:
    qsid = sc.new_qsid()
    sc.create_scope(env, qsid, None)
    sc.put_vfolder_file(env, qsid, 90_000)
    sc.fs_usage_matches(env, lambda: (env.sim.provisioned, env.sim.physical()))


def test_5xx_retried(env: sc.VendorEnv) -> None:
    sc.retried_5xx(env, None, "/file-systems")


def test_permanent_failure(env: sc.VendorEnv) -> None:
    sc.permanent_failure(env, None, APPLIANCE, "/file-systems", op_words="read filesystem 'fs1'")


def test_auth_failure(env: sc.VendorEnv) -> None:
    sim: PureSimulator = env.sim

    def break_auth() -> None:
        sim.api_token = "T-revoked"
        sim.expire_sessions()

    def restore() -> None:
        sim.api_token = "T-0000-sim"

    sc.auth_failure(env, None, APPLIANCE, break_auth, restore)


def test_session_renewal_mid_run(env: sc.VendorEnv) -> None:
    sim: PureSimulator = env.sim
    sc.fs_usage_matches(env, lambda: (sim.provisioned, sim.physical()))
    logins = sim.count("POST", "/api/login")
    sim.expire_sessions()
    sc.fs_usage_matches(env, lambda: (sim.provisioned, sim.physical()))
    assert sim.count("POST", "/api/login") == logins + 1


def test_hwinfo_and_metric(env: sc.VendorEnv) -> None:
    info = sc.hwinfo(env)
    assert info["status"] == "healthy", info
    assert info["metadata"]["array_name"] == "fb-sim" and info["metadata"]["blade_count"] == "1"
    p = env.sim.perf
    assert sc.metric(env) == {
        "iops_read": p["reads_per_sec"],
        "iops_write": p["writes_per_sec"],
        "io_bytes_read": p["read_bytes_per_sec"],
        "io_bytes_write": p["write_bytes_per_sec"],
        "io_usec_read": p["usec_per_read_op"],
        "io_usec_write": p["usec_per_write_op"],
    }


def test_hwinfo_degraded_by_blade_status(env: sc.VendorEnv) -> None:
    blade = env.sim.blades[2]
    blade.update(status="unhealthy", details="blade is not responding")
    try:
        info = sc.hwinfo(env)
    finally:
        blade.update(status="healthy", details=None)
    assert info["status"] == "degraded", info
    assert info["status_info"] == "blade CH1.FB3: unhealthy (blade is not responding)"
    assert info["metadata"]["array_name"] == "fb-sim"
    assert sc.hwinfo(env)["status"] == "healthy"  # the empty slot (status "unused") is no fault


GARBLED = [
    sc.Garbled("fs-usage", "/file-systems", "{}", "filesystem 'fs1'", "no items"),
    sc.Garbled("fs-usage", "/file-systems", sc.HTML_PAGE, "filesystem 'fs1'", "text '<html>", content_type="text/html"),
    sc.Garbled(
        "fs-usage", "/file-systems", '{"items": [{"name": "fs1", "provisioned": 5}]}', "filesystem 'fs1'", "no space"
    ),
    sc.Garbled("metric", "/file-systems/performance", '{"items": ["x"]}', "NFS performance", "items.0 is text 'x'"),
    sc.Garbled("hwinfo", "/blades", '{"items": [{"name": "b", "status": 3}]}', "blade status", "status is 3, not text"),
]


@pytest.mark.parametrize("case", GARBLED, ids=sc.garbled_case_id)
def test_malformed_answer(env: sc.VendorEnv, case: sc.Garbled) -> None:
    sc.malformed_answer(env, case, "", APPLIANCE)
