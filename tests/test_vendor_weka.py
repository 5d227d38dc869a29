"""weka backend against the WekaFS REST simulator, through a real agent process."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.simulators import scenarios as sc
from tests.simulators.weka import WekaSimulator
from tests.support import assert_clean_log, free_port, make_agent

APPLIANCE = "Weka"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[sc.VendorEnv]:
    def options(sim: WekaSimulator) -> dict[str, object]:
        return {
            "weka_endpoint": sim.url,
            "weka_username": "admin",
            "weka_password": "secret",
            "weka_organization": "Root",
            "weka_fs_name": "fs1",
            "weka_verify_ssl": False,
        }

    with sc.vendor_env(tmp_path_factory.mktemp("weka"), "weka", WekaSimulator, options) as e:
        yield e


@pytest.fixture
def qsid(env: sc.VendorEnv) -> str:
    q = sc.new_qsid()
    sc.create_scope(env, q, 2**30)
    return q


def _state(env: sc.VendorEnv):
    return env.sim.quota_usage


def _has(env: sc.VendorEnv):
    def has(qsid: str) -> bool:
        path = env.root / qsid
        return path.is_dir() and os.stat(path).st_ino in env.sim.quotas

    return has


def test_volume_capabilities(env: sc.VendorEnv) -> None:
    sc.check_volume_listed(env, {"vfolder", "quota", "metric", "fast-fs-size"})


def test_quota_roundtrip(env: sc.VendorEnv) -> None:
    sc.quota_roundtrip(env, _state(env), _has(env))


def test_scope_without_limit(env: sc.VendorEnv) -> None:
    sc.scope_without_limit(env, _state(env))


def test_fs_usage(env: sc.VendorEnv, qsid: str) -> None:
    sc.put_vfolder_file(env, qsid, 50_000)
    sc.fs_usage_matches(env, lambda: (env.sim.total_budget, env.sim.used_total()))


def test_5xx_retried(env: sc.VendorEnv, qsid: str) -> None:
    sc.retried_5xx(env, qsid, "/quota/")


def test_permanent_failure(env: sc.VendorEnv, qsid: str) -> None:
    sc.permanent_failure(env, qsid, APPLIANCE, "/quota/")


def test_auth_failure(env: sc.VendorEnv, qsid: str) -> None:
    sim: WekaSimulator = env.sim

    def break_auth() -> None:
        sim.users["admin"] = "rotated"
        sim.refresh.clear()
        sim.expire_tokens()

    def restore() -> None:
        sim.users["admin"] = "secret"

    sc.auth_failure(env, qsid, APPLIANCE, break_auth, restore)


def test_token_renewal_mid_run(env: sc.VendorEnv, qsid: str) -> None:
    sim: WekaSimulator = env.sim
    refreshes = sim.count("POST", "/login/refresh")
    logins = sim.count("POST", "/api/v2/login")
    sim.expire_tokens()
    assert sc.describe(env, qsid)["limit_bytes"] == 2**30
    assert sim.count("POST", "/login/refresh") == refreshes + 1
    assert sim.count("POST", "/api/v2/login") - sim.count("POST", "/login/refresh") == logins - refreshes


def test_token_refreshed_before_expiry(env: sc.VendorEnv, qsid: str) -> None:
    sim: WekaSimulator = env.sim
    sim.token_ttl = 1.0
    try:
        sim.expire_tokens()
        sc.describe(env, qsid)  # refused once, refreshed: the new token lives 1 s
        rejected, refreshes = sim.rejected, sim.count("POST", "/login/refresh")
        time.sleep(1.0)
        sc.describe(env, qsid)
    finally:
        sim.token_ttl = 300.0
    assert sim.rejected == rejected  # refreshed ahead of expiry: the appliance never saw the stale token
    assert sim.count("POST", "/login/refresh") == refreshes + 1


def test_hwinfo_and_metric(env: sc.VendorEnv) -> None:
    info = sc.hwinfo(env)
    assert info["status"] == "healthy", info
    assert info["metadata"]["cluster_name"] == "weka-sim"
    env.sim.healthy = False
    try:
        info = sc.hwinfo(env)
    finally:
        env.sim.healthy = True
    assert info["status"] == "degraded" and "degraded" in info["status_info"]
    m = sc.metric(env)
    s = env.sim.stats
    assert m == {
        "iops_read": int(s["READS"]),
        "iops_write": int(s["WRITES"]),
        "io_bytes_read": int(s["READ_BYTES"]),
        "io_bytes_write": int(s["WRITE_BYTES"]),
        "io_usec_read": s["READ_LATENCY"],
        "io_usec_write": 0.0,
    }


def test_unknown_scope(env: sc.VendorEnv) -> None:
    r = env.call("PATCH", "/quota-scope", qsid="no-such-scope", options={"limit_bytes": 1})
    assert r.status_code == 404, r.text


def test_appliance_down_at_start_up(tmp_path: Path) -> None:
    """The agent still starts; calls fail cleanly until the appliance answers, then work without a restart."""
    root = tmp_path / "mount"
    root.mkdir()
    (root / "version.txt").write_text("3\n")
    port = free_port()
    options = {
        **sc.FAST_RETRY,
        "weka_endpoint": f"http://127.0.0.1:{port}",
        "weka_username": "admin",
        "weka_password": "secret",
        "weka_fs_name": "fs1",
    }
    agent = make_agent(tmp_path / "agent", volumes={"v": {"backend": "weka", "path": str(root), "options": options}})
    agent.start()
    sim = None
    try:
        with agent.client() as api:
            r = api.request("GET", "/folder/fs-usage", json={"volume": "v"})
            assert r.status_code == 502, r.text
            assert "Weka" in r.json()["msg"] and "tries" in r.json()["msg"]
            sim = WekaSimulator(root).start(port)
            r = api.request("GET", "/folder/fs-usage", json={"volume": "v"})
            assert r.status_code == 200, r.text
            assert r.json() == {"capacity_bytes": sim.total_budget, "used_bytes": sim.used_total()}
    finally:
        agent.stop()
        if sim is not None:
            sim.stop()
    assert_clean_log(agent)


GARBLED = [
    sc.Garbled("describe", "/quota/", "{}", "quota scope 'QSID'", "no data"),
    sc.Garbled("describe", "/quota/", sc.HTML_PAGE, "quota scope 'QSID'", "text '<html>", content_type="text/html"),
    sc.Garbled("describe", "/quota/", '{"data": ["x"]}', "quota scope 'QSID'", "data is a list, not an object"),
    sc.Garbled(
        "fs-usage", "/fileSystems/fs-uid-0001", '{"data": {"used_total": 1}}', "capacity", "no data.total_budget"
    ),
    sc.Garbled(
        "fs-usage",
        "/fileSystems/fs-uid-0001",
        '{"data": {"total_budget": "big", "used_total": 1}}',
        "capacity",
        "data.total_budget is text 'big', not a number",
    ),
    sc.Garbled(
        "metric",
        "/stats",
        '{"data": {"all": {"ops": [{"stats": {"READS": "many"}}]}}}',
        "statistics",
        "READS is text 'many', not a number",
    ),
    sc.Garbled("hwinfo", "/cluster", "[]", "read cluster info", "the answer is a list, not an object"),
]


@pytest.mark.parametrize("case", GARBLED, ids=sc.garbled_case_id)
def test_malformed_answer(env: sc.VendorEnv, qsid: str, case: sc.Garbled) -> None:
    sc.malformed_answer(env, case, qsid, APPLIANCE)


def test_malformed_login_answer(env: sc.VendorEnv, qsid: str) -> None:
    """A token answer without the token is a clean 502 naming the login, not a crash."""
    env.sim.expire_tokens()
    env.sim.refresh.clear()  # straight to a full login
    case = sc.Garbled(
        "describe", "/api/v2/login", '{"data": {"token_type": "Bearer"}}', "login", "no access_token", method="POST"
    )
    sc.malformed_answer(env, case, qsid, APPLIANCE)
