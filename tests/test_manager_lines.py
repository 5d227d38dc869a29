"""Each supported manager line, table-driven: the exact bodies its manager sends, the answers it reads.

The tables are taken from the upstream manager of each line (lablup/backend.ai ``manager/api/vfolder.py``,
``manager/models/vfolder.py``, ``manager/models/storage.py``): which keys each call carries, how the line
spells a quota scope (23.03.5: the owner's UUID hex; 23.03.7 on: ``user:<uuid>`` / ``project:<uuid>``),
and what it reads back (a ``token``, ``file_count``/``used_bytes``, ``limit_bytes`` read with ``or None``,
mkdir's ``results`` on 200/207 since 24.03). Every call runs against a real agent over loopback; upload
and download tokens are then used on the client API as the SDK does.
"""

from __future__ import annotations

import asyncio
import os
import re
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from catalog import Catalog
from tests.client_helpers import TUS, claims_of
from tests.support import AgentProcess, assert_clean_log, make_agent

GiB = 2**30
DATA = os.urandom(70_000)

# placeholders a table's bodies use; each run fills them in for its own scope and folders
VOL, QSID, VFID, VFID2 = "<volume>", "<qsid>", "<vfid>", "<vfid2>"


@dataclass
class Run:
    """One line's walk through the table: its agent, its ids, what earlier answers handed on."""

    agent: AgentProcess
    api: httpx.Client
    qsid: str
    scope_dir: str
    folder: uuid.UUID = field(default_factory=uuid.uuid4)
    folder2: uuid.UUID = field(default_factory=uuid.uuid4)

    @property
    def vfid(self) -> str:
        return f"{self.qsid}/{self.folder.hex}"

    @property
    def vfid2(self) -> str:
        return f"{self.qsid}/{self.folder2.hex}"

    def path(self, folder: uuid.UUID | None = None) -> Path:
        h = (folder or self.folder).hex
        return self.agent.volume_root() / self.scope_dir / h[0:2] / h[2:4] / h[4:]

    def fill(self, value: Any) -> Any:
        names = {VOL: "local", QSID: self.qsid, VFID: self.vfid, VFID2: self.vfid2}
        if isinstance(value, str):
            return names.get(value, value)
        if isinstance(value, dict):
            return {k: self.fill(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.fill(v) for v in value]
        return value


Check = Callable[[Run, httpx.Response], None]


@dataclass(frozen=True)
class Call:
    what: str
    method: str
    path: str
    body: dict[str, Any] | None
    status: int
    check: Check | None = None


# -- what a manager reads from the answers --------------------------------------------------------------------


def empty(run: Run, r: httpx.Response) -> None:
    assert r.content == b""


def status_ok(run: Run, r: httpx.Response) -> None:
    assert r.json()["status"] == "ok"


def scope_made(limit: int | None) -> Check:
    def check(run: Run, r: httpx.Response) -> None:
        assert (run.agent.volume_root() / run.scope_dir).is_dir()
        assert run.path().is_dir()
        scopes = asyncio.run(_catalogue_scopes(run.agent))
        assert [s for s in scopes if s.qsid == run.scope_dir] == [
            s for s in scopes if s.qsid == run.scope_dir and s.limit_bytes == limit
        ] != []

    return check


def scope_figures(limit: int | None, *, typed: bool) -> Check:
    """GET /quota-scope as the manager reads it: ``used_bytes`` (negative = unknown), ``limit_bytes or None``."""

    def check(run: Run, r: httpx.Response) -> None:
        body = r.json()
        assert set(body) >= {"used_bytes", "limit_bytes"}
        if typed:  # the 23.03.7+ manager shows `limit_bytes or None` as the hard limit: -1 would be a limit
            assert body["limit_bytes"] == limit
            assert body["used_bytes"] is None or body["used_bytes"] >= 0
        else:
            assert body["limit_bytes"] == (-1 if limit is None else limit)
            assert isinstance(body["used_bytes"], int)

    return check


def upload_then_tus(run: Run, r: httpx.Response) -> None:
    """The token the manager hands to the SDK; the SDK's tus PATCH publishes the file."""
    token = r.json()["token"]
    assert claims_of(token)["vfid"] == run.vfid  # the scope spelled as the manager spelled it
    headers = dict(TUS, **{"Upload-Offset": "0"})
    up = httpx.patch(run.agent.client_url + "/upload", params={"token": token}, content=DATA, headers=headers)
    assert up.status_code == 204, up.text
    assert (run.path() / "d1" / "f.bin").read_bytes() == DATA


def download_then_get(run: Run, r: httpx.Response) -> None:
    token = r.json()["token"]
    assert claims_of(token)["vfid"] == run.vfid
    got = httpx.get(run.agent.client_url + "/download", params={"token": token})
    assert got.status_code == 200, got.text
    assert got.content == DATA


def listing(run: Run, r: httpx.Response) -> None:
    items = {i["name"]: i for i in r.json()["items"]}
    assert items["f.bin"]["type"] == "FILE" and items["f.bin"]["stat"]["size"] == len(DATA)
    assert {"mode", "size", "created", "modified"} <= set(items["f.bin"]["stat"])


def usage(run: Run, r: httpx.Response) -> None:
    body = r.json()
    assert isinstance(body["file_count"], int) and isinstance(body["used_bytes"], int)


def used_bytes(run: Run, r: httpx.Response) -> None:
    assert isinstance(r.json()["used_bytes"], int)


def mount_path(run: Run, r: httpx.Response) -> None:
    assert Path(r.json()["path"]) == run.path()


def mkdir_results(made: list[str], failed: list[str]) -> Check:
    """24.03+ managers read ``results`` on 200/207 (and pass 422 on as a failure)."""

    def check(run: Run, r: httpx.Response) -> None:
        results = r.json()["results"]
        assert [x["item"] for x in results["success"]] == made
        assert all(x["msg"] is None for x in results["success"])
        assert [x["item"] for x in results["failed"]] == failed
        assert all(isinstance(x["msg"], str) and x["msg"] for x in results["failed"])
        for item in made:
            assert (run.path() / item).is_dir()

    return check


def dirs_made(*names: str) -> Check:
    def check(run: Run, r: httpx.Response) -> None:
        for name in names:
            assert (run.path() / name).is_dir()

    return check


def cloned(run: Run, r: httpx.Response) -> None:
    assert (run.path(run.folder2) / "d1" / "g.bin").read_bytes() == DATA


def gone(folder: str) -> Check:
    def check(run: Run, r: httpx.Response) -> None:
        assert not run.path(run.folder if folder == "vfid" else run.folder2).exists()

    return check


def no_such_scope_named(spelling_of: Callable[[Run], str]) -> Check:
    def check(run: Run, r: httpx.Response) -> None:
        assert spelling_of(run) in r.json()["msg"]

    return check


# -- the calls every line makes with the same body ------------------------------------------------------------

FILE_CALLS = [
    Call("upload token", "POST", "/folder/file/upload",
         {"volume": VOL, "vfid": VFID, "relpath": "d1/f.bin", "size": len(DATA)}, 200, upload_then_tus),
    Call("download token", "POST", "/folder/file/download",
         {"volume": VOL, "vfid": VFID, "relpath": "d1/f.bin", "archive": False, "unmanaged_path": None},
         200, download_then_get),
    Call("list", "POST", "/folder/file/list", {"volume": VOL, "vfid": VFID, "relpath": "d1"}, 200, listing),
    Call("fetch", "POST", "/folder/file/fetch", {"volume": VOL, "vfid": VFID, "relpath": "d1/f.bin"}, 200,
         lambda run, r: None if r.content == DATA else pytest.fail("fetched bytes differ")),
    Call("usage", "GET", "/folder/usage", {"volume": VOL, "vfid": VFID}, 200, usage),
    Call("used bytes", "GET", "/folder/used-bytes", {"volume": VOL, "vfid": VFID}, 200, used_bytes),
    Call("fs usage", "GET", "/folder/fs-usage", {"volume": VOL}, 200,
         lambda run, r: None if r.json()["capacity_bytes"] > 0 else pytest.fail("no capacity")),
    Call("mount", "GET", "/folder/mount", {"volume": VOL, "vfid": VFID, "subpath": "."}, 200, mount_path),
    Call("per-vfolder quota (deprecated)", "GET", "/volume/quota", {"volume": VOL, "vfid": VFID}, 400),
    Call("rename", "POST", "/folder/file/rename",
         {"volume": VOL, "vfid": VFID, "relpath": "d1/f.bin", "new_name": "g.bin"}, 204, empty),
    Call("move", "POST", "/folder/file/move",
         {"volume": VOL, "vfid": VFID, "src_relpath": "d1/g.bin", "dst_relpath": "g.bin"}, 204, empty),
    Call("move back", "POST", "/folder/file/move",
         {"volume": VOL, "vfid": VFID, "src_relpath": "g.bin", "dst_relpath": "d1/g.bin"}, 204, empty),
    Call("clone", "POST", "/folder/clone",
         {"src_volume": VOL, "src_vfid": VFID, "dst_volume": VOL, "dst_vfid": VFID2}, 204, cloned),
    Call("delete files", "POST", "/folder/file/delete",
         {"volume": VOL, "vfid": VFID, "relpaths": ["d1/g.bin"], "recursive": False}, 200, status_ok),
    Call("delete clone", "POST", "/folder/delete", {"volume": VOL, "vfid": VFID2}, 204, gone("vfid2")),
]


def typed_tail(create_more: Call) -> list[Call]:
    """23.03.7+: the quota scope calls of the manager's GraphQL (QuotaScope, Set/UnsetQuotaScope), then delete."""
    return [
        Call("quota scope", "GET", "/quota-scope", {"volume": VOL, "qsid": QSID}, 200,
             scope_figures(10 * GiB, typed=True)),
        Call("set quota", "PATCH", "/quota-scope", {"volume": VOL, "qsid": QSID, "options": {"limit_bytes": 20 * GiB}},
             204, empty),
        Call("quota scope after set", "GET", "/quota-scope", {"volume": VOL, "qsid": QSID}, 200,
             scope_figures(20 * GiB, typed=True)),
        Call("unset quota", "DELETE", "/quota-scope/quota", {"volume": VOL, "qsid": QSID}, 204, empty),
        Call("quota scope after unset", "GET", "/quota-scope", {"volume": VOL, "qsid": QSID}, 200,
             scope_figures(None, typed=True)),
        create_more,
        Call("delete", "POST", "/folder/delete", {"volume": VOL, "vfid": VFID}, 204, gone("vfid")),
        # a retried delete (the manager's purge task after a partial failure) must not fail: 204 as upstream
        Call("delete again", "POST", "/folder/delete", {"volume": VOL, "vfid": VFID}, 204, empty),
    ]


TYPED_CREATE = Call(
    "create (scope made with its initial limit)", "POST", "/folder/create",
    {"volume": VOL, "vfid": VFID, "options": {"initial_max_size_for_quota_scope": 10 * GiB}}, 204,
    scope_made(10 * GiB),
)
# a second folder in the now existing scope, as a manager without max_vfolder_size sends it: options {}
TYPED_CREATE_MORE = Call("create in the existing scope", "POST", "/folder/create",
                         {"volume": VOL, "vfid": VFID2, "options": {}}, 204)

LINES: dict[str, tuple[Callable[[uuid.UUID], str], list[Call]]] = {
    # 23.03.5: the scope is the owner's UUID hex; the manager never creates it (the operator does: POST
    # /quota-scope); folder/create carries no options; mkdir answers nothing the manager reads.
    "23.03.5": (lambda u: u.hex, [
        Call("quota scope (operator)", "POST", "/quota-scope", {"volume": VOL, "qsid": QSID, "options": None},
             204, empty),
        Call("create", "POST", "/folder/create", {"volume": VOL, "vfid": VFID}, 204, scope_made(None)),
        Call("mkdir", "POST", "/folder/file/mkdir",
             {"volume": VOL, "vfid": VFID, "relpath": "d1", "parents": True, "exist_ok": False}, 204, empty),
        *FILE_CALLS,
        Call("quota scope (beyond 23.03.5)", "GET", "/quota-scope", {"volume": VOL, "qsid": QSID}, 200,
             scope_figures(None, typed=False)),
        Call("delete", "POST", "/folder/delete", {"volume": VOL, "vfid": VFID}, 204, gone("vfid")),
    ]),
    # 23.03.7 - 23.03.12: typed scope ids; folder/create makes a missing scope with
    # options.initial_max_size_for_quota_scope; quota scope GET / PATCH / DELETE quota; mkdir body not read.
    "23.03.7+": (lambda u: f"user:{u}", [
        TYPED_CREATE,
        Call("mkdir", "POST", "/folder/file/mkdir",
             {"volume": VOL, "vfid": VFID, "relpath": "d1", "parents": True, "exist_ok": False}, 200,
             dirs_made("d1")),
        *FILE_CALLS,
        *typed_tail(TYPED_CREATE_MORE),
    ]),
    # 23.09: as 23.03.7+ (the proxy added 409 for a duplicate POST /quota-scope, which no manager sends).
    "23.09": (lambda u: f"project:{u}", [
        TYPED_CREATE,
        Call("mkdir", "POST", "/folder/file/mkdir",
             {"volume": VOL, "vfid": VFID, "relpath": "d1", "parents": True, "exist_ok": True}, 200,
             dirs_made("d1")),
        *FILE_CALLS,
        *typed_tail(TYPED_CREATE_MORE),
    ]),
    # 24.03: mkdir's relpath may be a list (at most 50); the manager reads `results` on 200 / 207.
    "24.03": (lambda u: f"user:{u}", [
        TYPED_CREATE,
        Call("mkdir (list)", "POST", "/folder/file/mkdir",
             {"volume": VOL, "vfid": VFID, "relpath": ["d1", "d3/d4"], "parents": True, "exist_ok": False}, 200,
             mkdir_results(["d1", "d3/d4"], [])),
        Call("mkdir (list, partly existing)", "POST", "/folder/file/mkdir",
             {"volume": VOL, "vfid": VFID, "relpath": ["d1", "d5"], "parents": True, "exist_ok": False}, 207,
             mkdir_results(["d5"], ["d1"])),
        Call("mkdir (one path)", "POST", "/folder/file/mkdir",
             {"volume": VOL, "vfid": VFID, "relpath": "d6", "parents": True, "exist_ok": False}, 200,
             mkdir_results(["d6"], [])),
        Call("mkdir (all failing)", "POST", "/folder/file/mkdir",
             {"volume": VOL, "vfid": VFID, "relpath": ["d1", "d6"], "parents": True, "exist_ok": False}, 422,
             mkdir_results([], ["d1", "d6"])),
        *FILE_CALLS,
        *typed_tail(TYPED_CREATE_MORE),
    ]),
    # 24.09: as 24.03; the scope id's type is read in any case; PATCH on a missing scope only creates it.
    "24.09": (lambda u: f"project:{u}", [
        Call("set quota of a scope not made yet", "PATCH", "/quota-scope",
             {"volume": VOL, "qsid": QSID, "options": {"limit_bytes": 10 * GiB}}, 204, empty),
        Call("create (scope exists: options ignored)", "POST", "/folder/create",
             {"volume": VOL, "vfid": VFID, "options": {"initial_max_size_for_quota_scope": 5 * GiB}}, 204,
             scope_made(10 * GiB)),
        Call("mkdir (list)", "POST", "/folder/file/mkdir",
             {"volume": VOL, "vfid": VFID, "relpath": ["d1", "d1/x"], "parents": False, "exist_ok": False}, 200,
             mkdir_results(["d1", "d1/x"], [])),
        *FILE_CALLS,
        *typed_tail(TYPED_CREATE_MORE),
    ]),
}


async def _catalogue_scopes(agent: AgentProcess) -> list[Any]:
    catalog = await Catalog.open(agent.config["catalog"]["path"], readonly=True)
    try:
        return await catalog.quota_scopes("local")
    finally:
        await catalog.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    proc = make_agent(Path(tmp_path_factory.mktemp("lines")) / "agent").start()
    yield proc
    proc.stop()
    assert_clean_log(proc)


@pytest.mark.parametrize("line", list(LINES))
def test_manager_line(served: AgentProcess, line: str) -> None:
    spell, calls = LINES[line]
    owner = uuid.uuid4()
    with served.client() as api:
        run = Run(served, api, spell(owner), owner.hex)
        for call in calls:
            body = run.fill(call.body)
            r = api.request(call.method, call.path, json=body)
            assert r.status_code == call.status, f"{line}: {call.what}: {r.status_code} {r.text}"
            if call.check is not None:
                call.check(run, r)
    assert "Traceback" not in served.log()


# -- the id forms ------------------------------------------------------------------------------------------------

SAME_SCOPE = [
    lambda u: f"user:{u}",
    lambda u: f"user:{u.hex}",
    lambda u: f"USER:{str(u).upper()}",  # 24.09 reads the type in any case
    lambda u: f"project:{u.hex.upper()}",
    lambda u: f"Project:{str(u)[:13]}{str(u)[13:].replace('-', '')}",  # any dash placement uuid.UUID takes
    lambda u: u.hex,  # the 23.03.5 spelling of the same owner
]


def test_every_spelling_of_one_uuid_is_one_scope_and_one_catalogue_row(served: AgentProcess) -> None:
    owner = uuid.uuid4()
    with served.client() as api:
        folders = []
        for spell in SAME_SCOPE:
            vfid = f"{spell(owner)}/{uuid.uuid4()}"
            r = api.post("/folder/create", json={"volume": "local", "vfid": vfid, "options": {}})
            assert r.status_code == 204, (vfid, r.text)
            folders.append(vfid)
        assert sorted(p.name for p in served.volume_root().iterdir() if owner.hex in p.name) == [owner.hex]
        rows = [s for s in asyncio.run(_catalogue_scopes(served)) if s.qsid == owner.hex]
        assert len(rows) == 1
        for spell in SAME_SCOPE:  # each spelling sees every folder made under any other
            for vfid in folders:
                other = f"{spell(owner)}/{vfid.partition('/')[2]}"
                r = api.request("GET", "/folder/mount", json={"volume": "local", "vfid": other})
                assert r.status_code == 200, (other, r.text)
        r = api.request("GET", "/quota-scope", json={"volume": "local", "qsid": owner.hex})
        assert r.status_code == 200 and r.json()["limit_bytes"] == -1
        for vfid in folders:
            assert api.post("/folder/delete", json={"volume": "local", "vfid": vfid}).status_code == 204
        r = api.request("DELETE", "/quota-scope", json={"volume": "local", "qsid": f"user:{owner}"})
        assert r.status_code == 204, r.text
        assert not (served.volume_root() / owner.hex).exists()


@pytest.mark.parametrize(
    "qsid",
    ["abc\n", "abc\r\n", "\nabc", "user:", "user:xyz", f"group:{uuid.UUID(int=1)}", f"user:{uuid.UUID(int=1)}\n",
     f"user:{uuid.UUID(int=1).hex}0", f"user:{uuid.UUID(int=1).hex[:-1]}", f"user:-{uuid.UUID(int=1).hex}",
     f"user:{{{uuid.UUID(int=1)}}}", f"user:urn:uuid:{uuid.UUID(int=1)}", f"user:{uuid.UUID(int=1)}/x",
     f"user :{uuid.UUID(int=1)}", "user:" + "0" * 16 + "--" + "0" * 16, "a" * 201],
    ids=repr,
)
def test_malformed_scope_ids_are_400_and_make_nothing(served: AgentProcess, qsid: str) -> None:
    before = sorted(os.listdir(served.volume_root()))
    with served.client() as api:
        for method, body in (("POST", {"options": None}), ("PATCH", {"options": {"limit_bytes": 1}})):
            r = api.request(method, "/quota-scope", json={"volume": "local", "qsid": qsid, **body})
            assert r.status_code == 400, (method, r.text)
            assert r.json()["type"].endswith("/invalid-api-params") and "qsid" in r.json()["data"]
        vfid = f"{qsid}/{uuid.uuid4().hex}"
        r = api.post("/folder/create", json={"volume": "local", "vfid": vfid, "options": {}})
        assert r.status_code == 400, r.text
    assert sorted(os.listdir(served.volume_root())) == before


# the rule of upstream's validators, written out independently of backends/ids.py: the oracle of the search
_BARE = re.compile(r"[A-Za-z0-9]+(?:[_-][A-Za-z0-9]+)*")
_TYPED = re.compile(r"(?i:user|project):([0-9a-fA-F]+(?:-[0-9a-fA-F]+)*)")


def _expected_dir(qsid: str) -> str | None:
    if len(qsid) > 200:
        return None
    if _BARE.fullmatch(qsid):
        return qsid
    m = _TYPED.fullmatch(qsid)
    if m and len(m.group(1).replace("-", "")) == 32:
        return m.group(1).replace("-", "").lower()
    return None


_PIECES = st.sampled_from(["user", "USER", "project", "Proj", "group", ":", "-", "_", "--", "/", ".", "..", "\n",
                           "\r", "\t", " ", "\x00", "²", "٣", "ü", "0123456789abcdef", "ABCDEF", "0" * 8, "{", "}"])
_UUIDS = st.uuids().flatmap(lambda u: st.sampled_from([str(u), u.hex, str(u).upper(), u.hex.upper()]))
_SCOPE_IDS = st.one_of(
    st.lists(_PIECES, min_size=1, max_size=8).map("".join),
    st.tuples(st.sampled_from(["user:", "project:", "USER:", "user:-", "user: "]), _UUIDS,
              st.sampled_from(["", "\n", "-", "0", "/x", " "])).map("".join),
    st.text(min_size=1, max_size=40),
)


@seed(20201203)  # fixed: repeatable; hypothesis prints the falsifying example, which then becomes a plain case
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(qsid=_SCOPE_IDS)
def test_search_scope_ids_make_exactly_the_directory_upstream_names(served: AgentProcess, qsid: str) -> None:
    root = served.volume_root()
    before = set(os.listdir(root))
    expected = _expected_dir(qsid)
    with served.client() as api:
        r = api.post("/quota-scope", json={"volume": "local", "qsid": qsid, "options": None})
        assert r.status_code in (204, 400, 409), r.text
        after = set(os.listdir(root))
        if expected is None:
            assert r.status_code == 400 and after == before, (qsid, r.text)
            return
        assert r.status_code in (204, 409), (qsid, r.text)
        assert after - before <= {expected} and expected in after
        if r.status_code == 204:
            assert api.request("DELETE", "/quota-scope", json={"volume": "local", "qsid": qsid}).status_code == 204
            assert not (root / expected).exists()


def test_bare_form_keeps_the_23_03_5_contract(served: AgentProcess) -> None:
    """A bare id: create in a missing scope is refused, PATCH of a missing scope is 404, POST is idempotent."""
    qsid = f"qs-{uuid.uuid4().hex[:8]}"
    with served.client() as api:
        r = api.post("/folder/create", json={"volume": "local", "vfid": f"{qsid}/{uuid.uuid4().hex}", "options": {}})
        assert r.status_code == 404 and qsid in r.json()["msg"]
        r = api.patch("/quota-scope", json={"volume": "local", "qsid": qsid, "options": {"limit_bytes": 1}})
        assert r.status_code == 404
        assert not (served.volume_root() / qsid).exists()
        for _ in range(2):
            assert api.post("/quota-scope", json={"volume": "local", "qsid": qsid}).status_code == 204
        r = api.post("/folder/delete", json={"volume": "local", "vfid": f"{qsid}/{uuid.uuid4().hex}"})
        assert r.status_code == 404


def test_typed_answers_name_the_scope_as_sent_and_follow_23_09(served: AgentProcess) -> None:
    owner = uuid.uuid4()
    qsid = f"user:{owner}"
    with served.client() as api:
        r = api.request("GET", "/quota-scope", json={"volume": "local", "qsid": qsid})
        assert r.status_code == 404 and qsid in r.json()["msg"] and owner.hex not in r.json()["msg"]
        r = api.request("DELETE", "/quota-scope/quota", json={"volume": "local", "qsid": qsid})
        assert r.status_code == 404 and qsid in r.json()["msg"]
        assert api.post("/quota-scope", json={"volume": "local", "qsid": qsid, "options": None}).status_code == 204
        r = api.post("/quota-scope", json={"volume": "local", "qsid": qsid, "options": None})
        assert r.status_code == 409 and qsid in r.json()["msg"]  # 23.09+ answers a duplicate create with 409
        vfid = f"{qsid}/{uuid.uuid4().hex}"
        assert api.post("/folder/create", json={"volume": "local", "vfid": vfid}).status_code == 204
        r = api.request("DELETE", "/quota-scope", json={"volume": "local", "qsid": qsid})
        assert r.status_code == 409 and qsid in r.json()["msg"]
        r = api.post("/folder/file/download", json={"volume": "local", "vfid": vfid, "relpath": "x"})
        assert claims_of(r.json()["token"])["vfid"] == vfid
        assert api.post("/folder/delete", json={"volume": "local", "vfid": vfid}).status_code == 204


def test_racing_first_creates_in_one_new_typed_scope(served: AgentProcess) -> None:
    """Several folders created at once in a scope that does not exist yet: every create 204, one scope."""
    import concurrent.futures

    owner = uuid.uuid4()
    vfids = [f"user:{owner}/{uuid.uuid4().hex}" for _ in range(8)]
    body = {"initial_max_size_for_quota_scope": GiB}

    def create(vfid: str) -> int:
        with served.client() as api:
            return api.post("/folder/create", json={"volume": "local", "vfid": vfid, "options": body}).status_code

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        assert list(pool.map(create, vfids)) == [204] * 8
    rows = [s for s in asyncio.run(_catalogue_scopes(served)) if s.qsid == owner.hex]
    assert len(rows) == 1 and rows[0].limit_bytes == GiB


def test_mkdir_list_limits(served: AgentProcess) -> None:
    owner = uuid.uuid4()
    vfid = f"user:{owner}/{uuid.uuid4().hex}"
    with served.client() as api:
        assert api.post("/folder/create", json={"volume": "local", "vfid": vfid}).status_code == 204
        for relpath in ([], [f"d{i}" for i in range(51)], [1, 2]):
            r = api.post("/folder/file/mkdir", json={"volume": "local", "vfid": vfid, "relpath": relpath})
            assert r.status_code == 400 and "relpath" in r.json()["data"], r.text
        r = api.post("/folder/file/mkdir", json={"volume": "local", "vfid": vfid,
                                                  "relpath": [f"d{i}" for i in range(50)]})
        assert r.status_code == 200 and len(r.json()["results"]["success"]) == 50
        r = api.post("/folder/file/mkdir", json={"volume": "local", "vfid": vfid, "relpath": ["../x", "ok"]})
        assert r.status_code == 207, r.text
        assert [x["item"] for x in r.json()["results"]["failed"]] == ["../x"]
        assert not (served.volume_root() / owner.hex / "x").exists()


# -- health ------------------------------------------------------------------------------------------------------


def test_health_liveness_and_readiness_need_no_secret_and_name_unserved_volumes(tmp_path: Path) -> None:
    old = tmp_path / "old"
    (old / "ab" / "cd").mkdir(parents=True)  # a layout-2 volume: not served until migrated
    good = tmp_path / "good"
    good.mkdir()
    (good / "version.txt").write_text("3\n")
    agent = make_agent(tmp_path / "agent", volumes={
        "local": {"backend": "vfs", "path": str(good)},
        "old": {"backend": "vfs", "path": str(old)},
    }).start()
    try:
        r = httpx.get(agent.manager_url + "/health")
        assert r.status_code == 200
        body = r.json()
        assert body["status"] == "degraded" and body["component"] == "storage-proxy"
        checks = {c["component_id"]: c for c in body["connectivity"]["connectivity_checks"]}
        assert checks["local"]["is_healthy"] and checks["local"]["error_message"] is None
        assert not checks["old"]["is_healthy"] and "migrat" in checks["old"]["error_message"]
        assert body["connectivity"]["overall_healthy"] is False
        r = httpx.get(agent.manager_url + "/readyz")
        assert r.status_code == 503 and r.json()["status"] == "error"
        r = httpx.get(agent.manager_url + "/livez")
        assert r.status_code == 200 and r.json()["status"] == "ok"
        assert httpx.get(agent.manager_url + "/volumes").status_code == 403  # the rest still needs the secret
        (old / "version.txt").write_text("3\n")  # migrated meanwhile: served from the next check on
        r = httpx.get(agent.manager_url + "/readyz")
        assert r.status_code == 200 and r.json()["status"] == "ok"
        assert all(c["is_healthy"] for c in r.json()["connectivity"]["connectivity_checks"])

        # a volume root that stops answering (a hung mount; here a FIFO whose read blocks): the probes still
        # answer, naming it, and no second check piles up behind the first
        fifo = good / "version.fifo"
        os.mkfifo(fifo)
        os.rename(fifo, good / "version.txt")
        for _ in range(2):
            r = httpx.get(agent.manager_url + "/readyz", timeout=30)
            assert r.status_code == 503, r.text
            checks = {c["component_id"]: c for c in r.json()["connectivity"]["connectivity_checks"]}
            assert "has not answered" in checks["local"]["error_message"] and checks["old"]["is_healthy"]
        assert httpx.get(agent.manager_url + "/livez").status_code == 200
        with open(good / "version.txt", "w") as w:  # the blocked read gets its answer
            w.write("3\n")
        (good / "version.new").write_text("3\n")
        os.rename(good / "version.new", good / "version.txt")
        r = httpx.get(agent.manager_url + "/readyz", timeout=30)
        assert r.status_code == 200, r.text
    finally:
        agent.stop()
    assert_clean_log(agent)
