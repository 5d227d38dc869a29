"""The shared vendor REST client: which calls are repeated, and the checked reading of answers."""

from __future__ import annotations

import asyncio
import logging
import math
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from backends.vendors.rest import ApplianceError, BasicAuth, Reply, RestClient, field, number, objects
from tests.simulators.gpfs import GpfsSimulator
from tests.support import free_port

QUOTAS = "/filesystems/gpfs0/quotas"
SET_QUOTA = {"operationType": "setQuota", "quotaType": "FILESET", "objectName": "fs1", "blockHardLimit": "1K"}


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GpfsSimulator]:
    mount = tmp_path_factory.mktemp("rest") / "mount"
    mount.mkdir()
    s = GpfsSimulator(mount).start()
    yield s
    s.stop()


def _with_client(url: str, use: Callable[[RestClient], Awaitable[Reply]], **kw: Any) -> Reply:
    """Run ``use`` with a client on ``url`` (fast back-off) and close it again."""

    async def go() -> Reply:
        options: dict[str, Any] = {"retries": 3, "backoff": 0.01, "timeout": 5, **kw}
        client = RestClient("GPFS", url + "/scalemgmt/v2", auth=BasicAuth("admin", "admin001"), **options)
        await client.open()
        try:
            return await use(client)
        finally:
            await client.close()

    return asyncio.run(go())


def _set_quota(client: RestClient, **kw: Any) -> Awaitable[Reply]:
    return client.call("POST", QUOTAS, op="set quota of fileset 'fs1'", json=SET_QUOTA, **kw)


def test_post_answered_5xx_is_not_repeated(sim: GpfsSimulator) -> None:
    before = sim.count("POST", QUOTAS)
    sim.fail(503, times=3, path_contains=QUOTAS, method="POST")
    try:
        with pytest.raises(ApplianceError, match=r"GPFS \(.*\): set quota of fileset 'fs1' failed: HTTP 503"):
            _with_client(sim.url, _set_quota)
    finally:
        sim.clear_faults()
    assert sim.count("POST", QUOTAS) == before + 1


def test_get_answered_5xx_is_repeated(sim: GpfsSimulator) -> None:
    before = sim.count("GET", "/cluster")
    sim.fail(503, times=2, path_contains="/cluster", method="GET")
    reply = _with_client(sim.url, lambda c: c.get("/cluster", op="read cluster info"))
    assert reply.status == 200
    assert sim.count("GET", "/cluster") == before + 3


def test_post_marked_idempotent_is_repeated(sim: GpfsSimulator) -> None:
    before = sim.count("POST", QUOTAS)
    sim.fail(503, times=1, path_contains=QUOTAS, method="POST")
    reply = _with_client(sim.url, lambda c: _set_quota(c, idempotent=True))
    assert reply.status == 202
    assert sim.count("POST", QUOTAS) == before + 2


def test_post_answered_too_late_is_not_repeated(sim: GpfsSimulator) -> None:
    before = sim.count("POST", QUOTAS)
    sim.slow(1.0, times=3, path_contains=QUOTAS, method="POST")
    try:
        with pytest.raises(ApplianceError, match=r"no answer within the request timeout \(not retried"):
            _with_client(sim.url, _set_quota, timeout=0.3)
    finally:
        sim.clear_faults()
    assert sim.count("POST", QUOTAS) == before + 1


def test_post_to_a_closed_port_is_repeated(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Connection refused: the appliance saw nothing, so even a POST is sent again once it listens."""
    (tmp_path / "mount").mkdir()
    port = free_port()
    late = GpfsSimulator(tmp_path / "mount")
    timer = threading.Timer(0.4, late.start, kwargs={"port": port})
    timer.start()
    try:
        with caplog.at_level(logging.WARNING, logger="backends.vendors.rest"):
            reply = _with_client(f"http://127.0.0.1:{port}", _set_quota, retries=8, backoff=0.1)
    finally:
        timer.join()
        late.stop()
    assert reply.status == 202
    assert late.count("POST", QUOTAS) == 1
    assert "retry 1/8" in caplog.text


# -- the checked accessor ------------------------------------------------------------------

LABEL = "X (http://x)"


def _problem(call: Callable[[], Any]) -> str:
    with pytest.raises(ApplianceError) as info:
        call()
    message = str(info.value)
    assert message.startswith(f"{LABEL}: read it: unexpected answer (")
    return message[len(f"{LABEL}: read it: unexpected answer (") : -1]


@pytest.mark.parametrize(
    ("body", "path", "kw", "problem"),
    [
        ({}, ("jobs",), {}, "no jobs"),
        ({"a": {}}, ("a", "b"), {}, "no a.b"),
        ("Service Unavailable", ("jobs",), {}, "the answer is text 'Service Unavailable', not an object"),
        ("", ("jobs",), {}, "the answer is empty, not an object"),
        ({"jobs": "abc"}, ("jobs", 0), {}, "jobs is text 'abc', not a list"),  # never a string's first letter
        ({"jobs": []}, ("jobs", 0), {}, "no jobs.0"),
        ({"a": [1]}, ("a",), {"kind": dict}, "a is a list, not an object"),
        ({"a": "x"}, ("a", "b"), {"default": 0}, "a is text 'x', not an object"),  # a default never hides a shape
        ([], (), {"kind": dict}, "the answer is a list, not an object"),
    ],
)
def test_field_names_what_is_wrong(body: Any, path: tuple[str | int, ...], kw: dict[str, Any], problem: str) -> None:
    assert _problem(lambda: field(body, *path, op="read it", label=LABEL, **kw)) == problem


@pytest.mark.parametrize(
    ("body", "path", "default", "value"),
    [
        ({"a": {"b": 1}}, ("a", "b"), None, 1),
        ({"a": {}}, ("a", "b"), 7, 7),
        ({"a": None}, ("a", "b"), 7, 7),
        ({"a": {"b": None}}, ("a", "b"), 7, 7),
        ({"a": [5, 6]}, ("a", -1), None, 6),
    ],
)
def test_field_reads_and_defaults(body: Any, path: tuple[str | int, ...], default: Any, value: Any) -> None:
    assert field(body, *path, op="read it", label=LABEL, default=default) == value


def test_objects_and_numbers() -> None:
    assert objects({"r": [{"x": 1}]}, "r", op="read it", label=LABEL) == [{"x": 1}]
    assert _problem(lambda: objects({"r": [{}, 3]}, "r", op="read it", label=LABEL)) == "r.1 is 3, not an object"
    assert number({"n": "123"}, "n", op="read it", label=LABEL) == 123  # OneFS sends some sizes as strings
    assert number({"n": 2.5}, "n", op="read it", label=LABEL, cast=float) == 2.5
    assert number({}, "n", op="read it", label=LABEL, default=0) == 0
    assert _problem(lambda: number({"n": "1.5"}, "n", op="read it", label=LABEL)) == "n is text '1.5', not a number"
    assert _problem(lambda: number({"n": True}, "n", op="read it", label=LABEL)) == "n is True, not a number"
    assert _problem(lambda: number({"n": {}}, "n", op="read it", label=LABEL)) == "n is an object, not a number"
    assert _problem(lambda: number({"n": "inf"}, "n", op="read it", label=LABEL, cast=float)) == (
        "n is text 'inf', not a number"
    )
    assert _problem(lambda: number({"n": math.nan}, "n", op="read it", label=LABEL, cast=float)) == (
        "n is nan, not a number"
    )
