"""Shared fixtures: a real agent process on loopback with a fresh vfs volume."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support import WATCHERS, AgentProcess, assert_clean_log, make_agent


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[AgentProcess]:
    proc = make_agent(tmp_path / "agent").start()
    yield proc
    proc.stop()
    assert_clean_log(proc)


@pytest.fixture
def api(agent: AgentProcess) -> Iterator[httpx.Client]:
    with agent.client() as c:
        yield c


@pytest.fixture
def scope(api: httpx.Client) -> str:
    qsid = f"qs-{uuid.uuid4().hex[:8]}"
    r = api.request("POST", "/quota-scope", json={"volume": "local", "qsid": qsid})
    assert r.status_code == 204, r.text
    return qsid


@pytest.fixture
def vfid(api: httpx.Client, scope: str) -> str:
    value = f"{scope}/{uuid.uuid4().hex}"
    r = api.request("POST", "/folder/create", json={"volume": "local", "vfid": value})
    assert r.status_code == 204, r.text
    return value


@pytest.fixture(params=WATCHERS)
def watched(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[AgentProcess, httpx.Client, str]]:
    proc = make_agent(tmp_path / "agent", usage={"watcher": request.param}).start()
    try:
        with proc.client() as api:
            yield proc, api, request.param
    finally:
        proc.stop()
    assert f"watching with {request.param}" in proc.log()
    assert_clean_log(proc)
