"""``[metrics] service-addr``: /metrics on its own listener, without the manager secret, with capacity gauges."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import assert_clean_log, eventually, free_port, make_agent

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the test volume is a tmpfs of its own (mounting needs root)")

MiB = 2**20


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A volume nobody else writes to, so that its filesystem figures are exactly what the test wrote."""
    mnt = tmp_path / "vol"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)], check=True)
    try:
        (mnt / "version.txt").write_text("3\n")
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text) for s in fam.samples
    }


def test_metrics_on_their_own_listener_with_volume_and_scope_gauges(tmp_path: Path, tmpfs: Path) -> None:
    port = free_port()
    agent = make_agent(tmp_path / "agent", volumes={"local": {"backend": "vfs", "path": str(tmpfs)}},
                       metrics={"service-addr": {"host": "127.0.0.1", "port": port}}).start()
    url = f"http://127.0.0.1:{port}"
    try:
        with agent.client() as api:
            limited, open_ = f"qs{uuid.uuid4().hex[:8]}", f"qs{uuid.uuid4().hex[:8]}"
            limit = (8 + int.from_bytes(os.urandom(1)) % 16) * MiB
            print(f"limit: {limit}")
            assert api.post("/quota-scope", json={"volume": "local", "qsid": limited,
                                                   "options": {"limit_bytes": limit}}).status_code == 204
            assert api.post("/quota-scope", json={"volume": "local", "qsid": open_}).status_code == 204
            folder = uuid.uuid4().hex
            vfid = f"{limited}/{folder}"
            assert api.post("/folder/create", json={"volume": "local", "vfid": vfid}).status_code == 204
            where = tmpfs / limited / folder[:2] / folder[2:4] / folder[4:]
            (where / "data").write_bytes(os.urandom(3 * MiB + 123))

            def scope_used_known() -> int:
                r = api.request("GET", "/quota-scope", json={"volume": "local", "qsid": limited})
                assert r.status_code == 200 and r.json()["used_bytes"] >= 3 * MiB, r.text
                return r.json()["used_bytes"]

            answered = eventually(scope_used_known, timeout=60)
            st = os.statvfs(tmpfs)

            def scraped() -> dict:
                r = httpx.get(f"{url}/metrics", timeout=10)  # no manager secret
                assert r.status_code == 200, r.text
                got = _samples(r.text)
                key = ("storage_agent_quota_scope_used_bytes", (("qsid", limited), ("volume", "local")))
                assert got.get(key) == answered, (got.get(key), answered)
                return got

            got = eventually(scraped, timeout=60)
        vol = (("volume", "local"),)
        assert got[("storage_agent_volume_capacity_bytes", vol)] == st.f_frsize * st.f_blocks == 64 * MiB
        assert got[("storage_agent_volume_used_bytes", vol)] == st.f_frsize * (st.f_blocks - st.f_bavail)
        assert got[("storage_agent_quota_scope_limit_bytes", (("qsid", limited), ("volume", "local")))] == limit
        # unlimited: no limit sample; no vfolder yet: used is known and 0
        assert ("storage_agent_quota_scope_limit_bytes", (("qsid", open_), ("volume", "local"))) not in got
        assert got[("storage_agent_quota_scope_used_bytes", (("qsid", open_), ("volume", "local")))] == 0
        assert any(name == "storage_agent_http_requests_total" for name, _ in got)
        # only /metrics is served there; the manager's own /metrics still wants the secret
        assert httpx.get(f"{url}/volumes", timeout=10).status_code == 404
        assert httpx.get(f"{agent.manager_url}/metrics", timeout=10).status_code in (401, 403)
    finally:
        agent.stop()
    assert_clean_log(agent)
