"""The simulators themselves refuse what the real appliances refuse, in each vendor's error shape.

These checks keep the simulators honest: a backend that sent a wrong method,
path, field or credential would be refused by them as by the appliance.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.simulators.base import Simulator
from tests.simulators.gpfs import GpfsSimulator
from tests.simulators.netapp import NetappSimulator
from tests.simulators.onefs import OnefsSimulator
from tests.simulators.purestorage import PureSimulator
from tests.simulators.weka import WekaSimulator


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@pytest.fixture
def started(tmp_path: Path) -> Iterator[Callable[[type[Simulator]], Simulator]]:
    sims: list[Simulator] = []

    def start(cls: type[Simulator]) -> Simulator:
        (tmp_path / "mount").mkdir(exist_ok=True)
        sims.append(cls(tmp_path / "mount").start())
        return sims[-1]

    yield start
    for s in sims:
        s.stop()


def gpfs_message(r: httpx.Response) -> str:
    body = r.json()
    assert body["status"]["code"] == r.status_code
    return body["status"]["message"]


def ontap_message(r: httpx.Response) -> str:
    return r.json()["error"]["message"]


def errors_message(r: httpx.Response) -> str:
    return r.json()["errors"][0]["message"]


def weka_message(r: httpx.Response) -> str:
    return r.json()["message"]


GPFS_AUTH = basic("admin", "admin001")
GPFS = "/scalemgmt/v2/filesystems/gpfs0"
ONTAP_AUTH = basic("admin", "netapp1!")
ONEFS_AUTH = basic("root", "a")

# (simulator, method, path, headers, json body, expected status, message extractor, words in the message)
CASES: list[tuple[type[Simulator], str, str, dict[str, str], Any, int, Callable[[httpx.Response], str], str]] = [
    (GpfsSimulator, "GET", "/scalemgmt/v2/cluster", basic("admin", "x"), None, 401, gpfs_message, "Unauthorized"),
    (GpfsSimulator, "PUT", GPFS + "/filesets", GPFS_AUTH, {}, 405, gpfs_message, "not allowed"),
    (GpfsSimulator, "GET", GPFS + "/no-such-thing", GPFS_AUTH, None, 404, gpfs_message, "no such resource"),
    (GpfsSimulator, "POST", GPFS + "/filesets", GPFS_AUTH, {"path": "/x"}, 400, gpfs_message, "filesetName"),
    (
        GpfsSimulator,
        "POST",
        GPFS + "/filesets",
        GPFS_AUTH,
        {"filesetName": "a", "bogus": 1},
        400,
        gpfs_message,
        "unexpected field(s): bogus",
    ),
    (
        GpfsSimulator,
        "POST",
        GPFS + "/quotas",
        GPFS_AUTH,
        {"operationType": "setQuota", "quotaType": "FILESET", "objectName": "a", "blockHardLimit": "ten"},
        400,
        gpfs_message,
        "invalid limit",
    ),
    (
        WekaSimulator,
        "GET",
        "/api/v2/fileSystems",
        {"Authorization": "Bearer forged"},
        None,
        401,
        weka_message,
        "invalid or expired",
    ),
    (WekaSimulator, "POST", "/api/v2/login", {}, {"username": "admin"}, 400, weka_message, "password"),
    (
        WekaSimulator,
        "POST",
        "/api/v2/login",
        {},
        {"username": "admin", "password": "no"},
        401,
        weka_message,
        "Invalid username or password",
    ),
    (WekaSimulator, "DELETE", "/api/v2/login", {}, None, 405, weka_message, "not allowed"),
    (
        NetappSimulator,
        "GET",
        "/api/storage/volumes?name=vol1",
        basic("admin", "x"),
        None,
        401,
        ontap_message,
        "not authorized",
    ),
    (
        NetappSimulator,
        "GET",
        "/api/storage/volumes?name=vol1&colour=red",
        ONTAP_AUTH,
        None,
        400,
        ontap_message,
        'Unexpected argument "colour"',
    ),
    (
        NetappSimulator,
        "POST",
        "/api/storage/qtrees",
        ONTAP_AUTH,
        {"svm": {"uuid": "x"}, "name": "q"},
        400,
        ontap_message,
        "volume.uuid",
    ),
    (NetappSimulator, "PUT", "/api/storage/qtrees", ONTAP_AUTH, {}, 405, ontap_message, "not allowed"),
    (PureSimulator, "GET", "/api/1.8/arrays", {}, None, 401, errors_message, "log in again"),
    (PureSimulator, "POST", "/api/login", {"api-token": "wrong"}, None, 401, errors_message, "invalid API token"),
    (
        OnefsSimulator,
        "GET",
        "/platform/12/quota/quotas",
        basic("root", "x"),
        None,
        401,
        errors_message,
        "Authorization required",
    ),
    (
        OnefsSimulator,
        "POST",
        "/platform/12/quota/quotas",
        ONEFS_AUTH,
        {"path": "/ifs/data/ai"},
        400,
        errors_message,
        "type",
    ),
    (
        OnefsSimulator,
        "POST",
        "/platform/12/quota/quotas",
        ONEFS_AUTH,
        {"path": "/ifs/data/ai", "type": "directory", "thresholds": {"hardest": 1}},
        400,
        errors_message,
        "hardest",
    ),
    (OnefsSimulator, "PATCH", "/platform/12/quota/quotas", ONEFS_AUTH, {}, 405, errors_message, "not allowed"),
]


@pytest.mark.parametrize(
    ("cls", "method", "path", "headers", "body", "status", "message", "words"),
    CASES,
    ids=[f"{c[0].name}-{c[1]}-{c[5]}-{i}" for i, c in enumerate(CASES)],
)
def test_refusals(
    started: Callable[[type[Simulator]], Simulator],
    cls: type[Simulator],
    method: str,
    path: str,
    headers: dict[str, str],
    body: Any,
    status: int,
    message: Callable[[httpx.Response], str],
    words: str,
) -> None:
    sim = started(cls)
    r = httpx.request(method, sim.url + path, headers=headers, json=body, timeout=10)
    assert r.status_code == status, r.text
    assert words in message(r), r.text


def test_onefs_quota_on_missing_path(started: Callable[[type[Simulator]], Simulator]) -> None:
    sim = started(OnefsSimulator)
    r = httpx.post(
        sim.url + "/platform/12/quota/quotas",
        headers=ONEFS_AUTH,
        timeout=10,
        json={"path": "/ifs/data/ai/nope", "type": "directory", "thresholds": {"hard": 1}},
    )
    assert r.status_code == 404 and r.json()["errors"][0]["code"] == "AEC_NOT_FOUND"


def test_weka_quota_inode_must_match_path(started: Callable[[type[Simulator]], Simulator]) -> None:
    sim = started(WekaSimulator)
    (sim.mount / "a").mkdir()
    token = httpx.post(sim.url + "/api/v2/login", json={"username": "admin", "password": "secret"}).json()
    auth = {"Authorization": "Bearer " + token["data"]["access_token"]}
    r = httpx.put(
        sim.url + "/api/v2/fileSystems/fs-uid-0001/quota/1", headers=auth, json={"path": "/a", "hard_limit_bytes": 10}
    )
    assert r.status_code == 400 and "does not match" in r.json()["message"]
