"""The start-up rescan (served stale at once, kind to the node, progress visible) and
``POST /folder/usage/refresh`` (an extension of the contract: rescan one vfolder now)."""

from __future__ import annotations

import os
import re
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from tests.support import AgentProcess, assert_clean_log, eventually, make_agent, walk


def _vfolder(api: httpx.Client, agent: AgentProcess) -> tuple[dict[str, str], Path]:
    qsid = f"qs-{uuid.uuid4().hex[:8]}"
    assert api.post("/quota-scope", json={"volume": "local", "qsid": qsid}).status_code == 204
    hexid = uuid.uuid4().hex
    body = {"volume": "local", "vfid": f"{qsid}/{hexid}"}
    assert api.post("/folder/create", json=body).status_code == 204
    return body, agent.volume_root() / qsid / hexid[:2] / hexid[2:4] / hexid[4:]


def _usage(api: httpx.Client, body: dict[str, str]) -> dict[str, Any]:
    r = api.request("GET", "/folder/usage", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def _fill(path: Path, dirs: int, files: int) -> None:
    for d in range(dirs):
        sub = path / f"d{d}"
        sub.mkdir()
        for i in range(files):
            (sub / f"f{i}").write_bytes(b"x" * (i % 97))


def _settled(api: httpx.Client, body: dict[str, str], path: Path) -> dict[str, Any]:
    count, size, _ = walk(path)

    def check() -> dict[str, Any]:
        u = _usage(api, body)
        assert (u["file_count"], u["used_bytes"], u["stale"]) == (count, size, False), (u, count, size)
        return u

    return eventually(check, timeout=60)


def _gauge(metrics: str, name: str) -> float:
    m = re.search(rf"^{name} (\S+)$", metrics, re.M)
    assert m is not None, f"{name} missing from /metrics"
    return float(m.group(1))


def test_refresh_rescans_now_and_answers_stale_until_it_lands(tmp_path: Path) -> None:
    # no watcher and no schedule soon: only the refresh can notice the change
    proc = make_agent(tmp_path / "agent", usage={"watcher": "none", "fallback-rescan-interval": "1h"}).start()
    try:
        with proc.client() as api:
            body, path = _vfolder(api, proc)
            _settled(api, body, path)
            _fill(path, 300, 20)  # a walk long enough that the stale answers can be seen
            assert _usage(api, body)["file_count"] == 0  # unseen
            r = api.post("/folder/usage/refresh", json=body)
            assert r.status_code == 202 and r.json() == {"status": "accepted"}, r.text
            answers = [_usage(api, body)]
            count, size, _ = walk(path)
            while (answers[-1]["file_count"], answers[-1]["stale"]) != (count, False):
                assert len(answers) < 100_000
                answers.append(_usage(api, body))
            assert answers[0]["stale"] is True, answers[0]  # the old figure, flagged, until the walk lands
            assert all(a["stale"] for a in answers[:-1]), answers
            last = answers[-1]
            assert (last["used_bytes"], last["source"]) == (size, "scan"), last
            # the recount is not lost on a quiet vfolder: a second refresh of an unchanged tree lands again
            before = last["measured_at"]
            assert api.post("/folder/usage/refresh", json=body).status_code == 202
            again = eventually(lambda: _check_newer(api, body, before), timeout=60)
            assert (again["file_count"], again["source"]) == (count, "scan")

            # unknown vfolder / volume / bad body: clean 4xx naming the problem
            missing = {"volume": "local", "vfid": f"{body['vfid'].split('/')[0]}/{uuid.uuid4().hex}"}
            r = api.post("/folder/usage/refresh", json=missing)
            assert r.status_code == 404 and "vfolder" in r.json()["msg"].lower(), r.text
            r = api.post("/folder/usage/refresh", json={"volume": "nope", "vfid": body["vfid"]})
            assert 400 <= r.status_code < 500 and "nope" in r.json()["msg"], r.text
            r = api.post("/folder/usage/refresh", json={"volume": "local"})
            assert r.status_code == 400 and "vfid" in r.json()["msg"], r.text
            assert api.post("/folder/usage/refresh", json=body, headers={"X-BackendAI-Storage-Auth-Token": "x"}
                            ).status_code in (401, 403)
    finally:
        proc.stop()
    assert_clean_log(proc)


def _check_newer(api: httpx.Client, body: dict[str, str], before: float) -> dict[str, Any]:
    u = _usage(api, body)
    assert u["measured_at"] > before and u["stale"] is False, (u, before)
    return u


def test_restart_serves_stale_at_once_then_settles_by_a_kind_rescan(tmp_path: Path) -> None:
    """After a restart every vfolder is served at once from the last figures, flagged stale; the rescan
    (one vfolder at a time here) lands for each, unchanged ones included, with ``source: scan`` and a
    new ``measured_at``; ``/metrics`` counts it down and ``storage-agent status`` lists it as a job.
    ``startup-rescan-delay`` holds the rescans back long enough for the stale answers to be seen."""
    delay = 8.0
    proc = make_agent(
        tmp_path / "agent",
        usage={"watcher": "inotify", "scan-concurrency": 1, "scan-threads": 1, "startup-rescan-delay": delay},
    )
    proc.start()
    n = 6
    try:
        with proc.client() as api:
            vfs = [_vfolder(api, proc) for _ in range(n)]
            for _body, path in vfs:
                _fill(path, 40, 30)
            before = [_settled(api, body, path) for body, path in vfs]
        proc.stop()
        (vfs[0][1] / "d0" / "new").write_bytes(os.urandom(5000))  # changed while down; the others are not
        restarted = time.time()
        proc.start()
        with proc.client() as api:
            first = [_usage(api, body) for body, _ in vfs]
            metrics = api.get("/metrics").text
            status = _status(proc)
            in_time = time.time() - restarted < delay  # not held up past the delay by a loaded machine
            pending = _gauge(metrics, "storage_agent_usage_startup_rescan_pending")
            done = _gauge(metrics, "storage_agent_usage_startup_rescan_done")
            assert pending + done == n, metrics
            if in_time:
                assert (pending, done) == (n, 0), metrics
                assert all(u["stale"] for u in first), first  # served at once from the last figures, flagged
            for u, old in zip(first, before, strict=True):
                if u["stale"]:
                    assert u["measured_at"] == old["measured_at"], (u, old)  # never -1 meanwhile
            jobs = [j for j in status["jobs"] if j["kind"] == "usage-rescan"]
            if in_time:  # listed while the rescan runs, with its progress
                assert len(jobs) == 1 and (jobs[0]["volume"], jobs[0]["total"], jobs[0]["done"]) == ("local", n, 0)
            elif not jobs:  # ... and only then
                assert _gauge(api.get("/metrics").text, "storage_agent_usage_startup_rescan_pending") == 0
            after = [_settled(api, body, path) for body, path in vfs]
            for u, old in zip(after, before, strict=True):
                assert u["source"] == "scan" and u["measured_at"] > max(old["measured_at"], restarted - 1), (u, old)
            metrics = api.get("/metrics").text
            assert _gauge(metrics, "storage_agent_usage_startup_rescan_pending") == 0
            assert _gauge(metrics, "storage_agent_usage_startup_rescan_done") == n
            assert 'storage_agent_usage_volume_mode{fstype=' in metrics
        eventually(lambda: _no_rescan_job(proc))
    finally:
        proc.stop()
    assert "start-up rescan of volume local done" in proc.log()
    assert_clean_log(proc)


def _status(proc: AgentProcess) -> dict[str, Any]:
    import json
    import subprocess

    out = subprocess.run(
        [os.sys.executable, "-m", "agent", "status", "--json", "--config", str(proc.config_path)],
        capture_output=True, text=True, timeout=120, cwd=proc.workdir,
    )
    return json.loads(out.stdout)


def _no_rescan_job(proc: AgentProcess) -> None:
    status = _status(proc)
    assert not [j for j in status["jobs"] if j["kind"] == "usage-rescan"], status["jobs"]
    assert status["volumes"][0]["usage"]["mode"] == "watch", status["volumes"][0]
