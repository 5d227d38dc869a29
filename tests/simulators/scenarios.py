"""Scenarios every vendor backend must pass, run through the manager API of a real agent process.

A vendor test module builds a :class:`VendorEnv` (simulator + agent whose
volume ``v`` points at it) and calls these with what its simulator holds.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tests.simulators.base import Simulator
from tests.support import AgentProcess, assert_clean_log, make_agent

VOLUME = "v"
FAST_RETRY = {"request_retries": 3, "retry_backoff": 0.01, "request_timeout": 5}


@dataclass
class VendorEnv:
    sim: Simulator
    agent: AgentProcess
    api: httpx.Client
    root: Path
    backend: str

    def call(self, method: str, path: str, **body: Any) -> httpx.Response:
        return self.api.request(method, path, json={"volume": VOLUME, **body})


@contextmanager
def vendor_env(
    workdir: Path,
    backend: str,
    sim_factory: Callable[[Path], Simulator],
    options: Callable[[Simulator], dict[str, Any]],
) -> Iterator[VendorEnv]:
    """A simulator on loopback (own thread) and an agent with volume ``v`` on the simulated appliance."""
    root = workdir / "mount"
    root.mkdir(parents=True)
    (root / "version.txt").write_text("3\n")
    sim = sim_factory(root).start()
    agent = None
    try:
        opts = {**FAST_RETRY, **options(sim)}
        agent = make_agent(
            workdir / "agent", volumes={VOLUME: {"backend": backend, "path": str(root), "options": opts}}
        )
        agent.start()
        with agent.client() as api:
            yield VendorEnv(sim, agent, api, root, backend)
    finally:
        if agent is not None:
            agent.stop()
        sim.stop()
    assert_clean_log(agent)


def new_qsid() -> str:
    return f"qs-{uuid.uuid4().hex[:8]}"


def check_volume_listed(env: VendorEnv, capabilities: set[str]) -> None:
    r = env.api.get("/volumes")
    assert r.status_code == 200, r.text
    (vol,) = [v for v in r.json()["volumes"] if v["name"] == VOLUME]
    assert vol["backend"] == env.backend
    assert set(vol["capabilities"]) == capabilities


def create_scope(env: VendorEnv, qsid: str, limit: int | None) -> None:
    r = env.call("POST", "/quota-scope", qsid=qsid, options=None if limit is None else {"limit_bytes": limit})
    assert r.status_code == 204, r.text
    assert (env.root / qsid).is_dir()


def describe(env: VendorEnv, qsid: str) -> dict[str, int]:
    r = env.call("GET", "/quota-scope", qsid=qsid)
    assert r.status_code == 200, r.text
    return r.json()


def put_vfolder_file(env: VendorEnv, qsid: str, size: int) -> str:
    """A vfolder made through the API with one file of ``size`` bytes written on the mount."""
    vfid = f"{qsid}/{uuid.uuid4().hex}"
    r = env.call("POST", "/folder/create", vfid=vfid)
    assert r.status_code == 204, r.text
    hexid = vfid.split("/")[1]
    (env.root / qsid / hexid[:2] / hexid[2:4] / hexid[4:] / "data.bin").write_bytes(b"x" * size)
    return vfid


def quota_roundtrip(
    env: VendorEnv, sim_state: Callable[[str], tuple[int, int | None]], sim_has_scope: Callable[[str], bool]
) -> None:
    """create with limit / describe / write / describe / update / refuse delete while full / delete.

    ``sim_state(qsid)`` is (used bytes, limit bytes or None) as the simulator holds them.
    """
    qsid = new_qsid()
    create_scope(env, qsid, 10 * 2**20)
    assert sim_has_scope(qsid)
    used, limit = sim_state(qsid)
    assert limit == 10 * 2**20
    assert describe(env, qsid) == {"used_bytes": used, "limit_bytes": limit}

    vfid = put_vfolder_file(env, qsid, 123_456)
    used, limit = sim_state(qsid)
    assert used >= 123_456
    assert describe(env, qsid) == {"used_bytes": used, "limit_bytes": 10 * 2**20}

    r = env.call("PATCH", "/quota-scope", qsid=qsid, options={"limit_bytes": 20 * 2**20})
    assert r.status_code == 204, r.text
    assert sim_state(qsid)[1] == 20 * 2**20
    assert describe(env, qsid)["limit_bytes"] == 20 * 2**20

    r = env.call("DELETE", "/quota-scope", qsid=qsid)
    assert r.status_code == 409, r.text
    assert sim_has_scope(qsid)
    r = env.call("POST", "/folder/delete", vfid=vfid)
    assert r.status_code == 204, r.text
    r = env.call("DELETE", "/quota-scope", qsid=qsid)
    assert r.status_code == 204, r.text
    assert not sim_has_scope(qsid)
    assert not (env.root / qsid).exists()
    r = env.call("GET", "/quota-scope", qsid=qsid)
    assert r.status_code == 404, r.text
    assert qsid in r.json()["msg"]


def scope_without_limit(env: VendorEnv, sim_state: Callable[[str], tuple[int, int | None]]) -> None:
    """A scope made without a limit reports none; setting one and clearing it again round-trips."""
    qsid = new_qsid()
    create_scope(env, qsid, None)
    assert describe(env, qsid)["limit_bytes"] == -1
    r = env.call("PATCH", "/quota-scope", qsid=qsid, options={"limit_bytes": 5 * 2**20})
    assert r.status_code == 204, r.text
    assert sim_state(qsid)[1] == 5 * 2**20
    assert describe(env, qsid)["limit_bytes"] == 5 * 2**20
    r = env.call("DELETE", "/quota-scope", qsid=qsid)
    assert r.status_code == 204, r.text


def fs_usage_matches(env: VendorEnv, expected: Callable[[], tuple[int, int]]) -> None:
    r = env.call("GET", "/folder/fs-usage")
    assert r.status_code == 200, r.text
    capacity, used = expected()
    assert r.json() == {"capacity_bytes": capacity, "used_bytes": used}


def retried_5xx(env: VendorEnv, qsid: str | None, path_contains: str = "") -> None:
    """Two 503s in a row are retried away; the caller sees a normal answer (describe, or fs-usage without qsid)."""
    before = len(env.sim.calls)
    env.sim.fail(503, times=2, path_contains=path_contains)
    r = _probe(env, qsid)
    assert r.status_code == 200, r.text
    assert len(env.sim.calls) - before >= 3


def _probe(env: VendorEnv, qsid: str | None) -> httpx.Response:
    if qsid is None:
        return env.call("GET", "/folder/fs-usage")
    return env.call("GET", "/quota-scope", qsid=qsid)


def permanent_failure(
    env: VendorEnv, qsid: str | None, appliance: str, path_contains: str = "", op_words: str | None = None
) -> None:
    """An appliance that keeps failing gives a clean 502 naming the appliance and the operation."""
    env.sim.fail(500, times=1000, path_contains=path_contains)
    try:
        r = _probe(env, qsid)
    finally:
        env.sim.clear_faults()
    assert r.status_code == 502, r.text
    msg = r.json()["msg"]
    assert appliance in msg and "HTTP 500" in msg and (op_words or qsid) in msg, msg
    assert "Traceback" not in r.text
    assert _probe(env, qsid).status_code == 200


def auth_failure(
    env: VendorEnv, qsid: str | None, appliance: str, break_auth: Callable[[], None], restore: Callable[[], None]
) -> None:
    """Credentials the appliance refuses: a clean 502 that says so, and recovery once they work again."""
    break_auth()
    try:
        r = _probe(env, qsid)
    finally:
        restore()
    assert r.status_code == 502, r.text
    msg = r.json()["msg"]
    assert appliance in msg and "HTTP 401" in msg, msg
    assert _probe(env, qsid).status_code == 200


def slow_answer_retried(env: VendorEnv, qsid: str | None, seconds: float) -> None:
    """An answer slower than the request timeout counts as a transport failure and is retried."""
    env.sim.slow(seconds, times=1)
    r = _probe(env, qsid)
    assert r.status_code == 200, r.text
    assert "no answer within the request timeout; retry 1/" in env.agent.log()


def hwinfo(env: VendorEnv) -> dict[str, Any]:
    r = env.call("GET", "/volume/hwinfo")
    assert r.status_code == 200, r.text
    return r.json()


def metric(env: VendorEnv) -> dict[str, Any]:
    r = env.call("GET", "/volume/performance-metric")
    assert r.status_code == 200, r.text
    return r.json()["metric"]


# -- answers of the wrong shape ---------------------------------------------------------

HTML_PAGE = "<html><body><h1>502 Bad Gateway</h1></body></html>"  # what a proxy in front answers

PROBES: dict[str, Callable[[VendorEnv, str], httpx.Response]] = {
    "describe": lambda env, qsid: env.call("GET", "/quota-scope", qsid=qsid),
    "set-limit": lambda env, qsid: env.call("PATCH", "/quota-scope", qsid=qsid, options={"limit_bytes": 3 * 2**20}),
    "fs-usage": lambda env, qsid: env.call("GET", "/folder/fs-usage"),
    "metric": lambda env, qsid: env.call("GET", "/volume/performance-metric"),
}


@dataclass(frozen=True)
class Garbled:
    """One answer replaced by ``body`` while ``probe`` runs; ``QSID`` in ``body`` and ``op`` is the scope's id."""

    probe: str  # a PROBES key, or "hwinfo"
    path_contains: str
    body: str
    op: str  # words of the operation the message must name
    words: str  # what the message must say about the answer
    method: str = "GET"
    status: int = 200
    content_type: str = "application/json"

    def arm(self, sim: Simulator, qsid: str) -> None:
        body = self.body.replace("QSID", qsid)
        sim.garble(body, self.content_type, path_contains=self.path_contains, method=self.method, status=self.status)


def garbled_case_id(case: Garbled) -> str:
    return f"{case.probe}-{case.method}{case.path_contains}-{case.words}".replace(" ", "_")


def malformed_answer(env: VendorEnv, case: Garbled, qsid: str, appliance: str) -> None:
    """A wrong-shaped answer is a clean 502 naming the appliance, the operation and what was off - no crash.

    hwinfo stays a 200 and reports the appliance degraded with that same message.
    """
    case.arm(env.sim, qsid)
    try:
        r = env.call("GET", "/volume/hwinfo") if case.probe == "hwinfo" else PROBES[case.probe](env, qsid)
    finally:
        env.sim.clear_faults()
    assert "Traceback" not in r.text
    if case.probe == "hwinfo":
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "degraded", r.text
        msg = r.json()["status_info"]
    else:
        assert r.status_code == 502, r.text
        msg = r.json()["msg"]
    op = case.op.replace("QSID", qsid)
    assert appliance in msg and op in msg and "unexpected answer" in msg and case.words in msg, msg
    assert_clean_log(env.agent)
