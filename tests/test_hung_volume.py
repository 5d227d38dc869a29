"""A volume whose mount hangs must not stall the agent: /volumes and /volume/hwinfo check volumes off the event
loop, bounded (the mechanism /health uses), so they and every other route keep answering.

A hung mount is played by a FIFO in place of ``version.txt``: opening it for reading blocks until a writer comes.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support import AgentProcess, assert_clean_log, make_agent


@pytest.fixture
def two_volumes(tmp_path: Path) -> Iterator[tuple[AgentProcess, Path]]:
    roots = {name: tmp_path / name for name in ("hung", "fine")}
    for root in roots.values():
        root.mkdir()
        (root / "version.txt").write_text("3\n")
    agent = make_agent(
        tmp_path / "agent", volumes={name: {"backend": "vfs", "path": str(root)} for name, root in roots.items()}
    ).start()
    try:
        yield agent, roots["hung"]
    finally:
        _release(roots["hung"])
        agent.stop()
    assert_clean_log(agent)


def _hang(root: Path) -> None:
    fifo = root / "version.fifo"
    os.mkfifo(fifo)
    os.rename(fifo, root / "version.txt")


def _release(root: Path) -> None:
    """Give the blocked read its answer (only one: the checks do not pile up), then a real file again."""
    target = root / "version.txt"
    if target.is_fifo():
        try:
            fd = os.open(target, os.O_WRONLY | os.O_NONBLOCK)  # fails (ENXIO) when no reader waits
            try:
                os.write(fd, b"3\n")
            finally:
                os.close(fd)
        except OSError:
            pass
    (root / "version.new").write_text("3\n")
    os.rename(root / "version.new", target)


def test_volumes_and_hwinfo_answer_while_a_volume_hangs(two_volumes: tuple[AgentProcess, Path]) -> None:
    agent, hung = two_volumes
    _hang(hung)
    results: dict[str, httpx.Response] = {}

    def list_volumes() -> None:
        with agent.client() as api:
            results["volumes"] = api.get("/volumes", timeout=60)

    pending = threading.Thread(target=list_volumes)
    pending.start()
    try:
        # while /volumes waits on the hung volume, the loop is free: other routes answer (generous timeouts: a
        # blocked loop would not answer at all, a busy machine only slowly)
        with agent.client() as api:
            r = api.request("GET", "/volume/hwinfo", json={"volume": "fine"}, timeout=30)
            assert r.status_code == 200 and r.json()["status"] == "healthy", r.text
            assert api.get("/", timeout=30).status_code == 200
    finally:
        pending.join(60)
    assert not pending.is_alive(), "/volumes did not answer"
    r = results["volumes"]
    assert r.status_code == 200, r.text
    states = {v["name"]: v for v in r.json()["volumes"]}
    assert states["fine"]["status"] == "serving"
    assert states["hung"]["status"] == "unavailable" and "has not answered" in states["hung"]["status_info"]

    with agent.client() as api:
        r = api.request("GET", "/volume/hwinfo", json={"volume": "hung"}, timeout=30)
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "unavailable" and "has not answered" in r.json()["status_info"]
        _release(hung)  # the mount comes back: served again from the next check on
        volumes = {v["name"]: v["status"] for v in api.get("/volumes", timeout=30).json()["volumes"]}
        assert volumes == {"hung": "serving", "fine": "serving"}
        r = api.request("GET", "/volume/hwinfo", json={"volume": "hung"}, timeout=30)
        assert r.json()["status"] == "healthy", r.text


def test_an_unserved_volume_looked_at_again_while_its_mount_hangs_stalls_no_other_request(tmp_path: Path) -> None:
    """A volume not served at start-up (it needs migration) is looked at again by each request naming it (a
    migration may have finished). When its mount hangs, that look blocks a thread and answers 503 within the
    check's bound; every other request keeps answering. Before, the look ran on the event loop: the whole
    agent stopped answering until the mount came back."""
    roots = {name: tmp_path / name for name in ("old", "fine")}
    for root in roots.values():
        root.mkdir()
    (roots["old"] / "version.txt").write_text("2\n")
    (roots["fine"] / "version.txt").write_text("3\n")
    agent = make_agent(
        tmp_path / "agent", volumes={name: {"backend": "vfs", "path": str(root)} for name, root in roots.items()}
    ).start()
    results: dict[str, httpx.Response] = {}
    try:
        with agent.client() as api:
            r = api.post("/quota-scope", json={"volume": "old", "qsid": "qs1"})
            assert r.status_code == 503 and "needs migration" in r.json()["msg"], r.text
        _hang(roots["old"])

        def create_on_old() -> None:
            with agent.client() as api:
                results["old"] = api.post("/quota-scope", json={"volume": "old", "qsid": "qs1"}, timeout=60)

        pending = threading.Thread(target=create_on_old)
        pending.start()
        time.sleep(1.0)  # not a bound: lets that request reach the agent before the others (no assert on time)
        try:
            with agent.client() as api:  # generous timeouts: a blocked loop never answers, a busy machine slowly
                for _ in range(5):
                    assert api.get("/", timeout=30).status_code == 200
                    assert api.post("/quota-scope", json={"volume": "fine", "qsid": "qs2"},
                                    timeout=30).status_code in (204, 409)
        finally:
            pending.join(60)
        assert not pending.is_alive(), "the request naming the hung volume did not answer"
        r = results["old"]
        assert r.status_code == 503 and "has not answered" in r.json()["msg"], r.text
        _release(roots["old"])  # back, and now migrated: served from the next look on
        with agent.client() as api:
            assert api.post("/quota-scope", json={"volume": "old", "qsid": "qs1"}, timeout=30).status_code == 204
    finally:
        _release(roots["old"])
        agent.stop()
    assert_clean_log(agent)
