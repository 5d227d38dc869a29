"""vfolder lifecycle operations racing each other: no 500, no lost delete, disk and catalogue in step.

Real agent, real HTTP from many threads, real SQLite. The storm tests are seeded (the seed is printed)
and bounded to a few seconds; each defect they found is also pinned by a plain test here.
"""

from __future__ import annotations

import asyncio
import os
import random
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from backends.rmtree import remove_tree
from tests.client_helpers import TUS, claims_of, head, patch, staged_file, upload_token, vfolder_path
from tests.support import AgentProcess, eventually

VOL = "local"


@pytest.fixture
def cli(agent: AgentProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=agent.client_url, timeout=60) as c:
        yield c


def _rows(agent: AgentProcess, sql: str, *args: object) -> list[tuple]:
    con = sqlite3.connect(f"file:{agent.workdir / 'catalog.db'}?mode=ro", uri=True, timeout=10)
    try:
        return con.execute(sql, args).fetchall()
    finally:
        con.close()


def _new_scope(api: httpx.Client) -> str:
    qsid = f"qs-{uuid.uuid4().hex[:8]}"
    r = api.post("/quota-scope", json={"volume": VOL, "qsid": qsid})
    assert r.status_code == 204, r.text
    return qsid


def _on_disk(agent: AgentProcess, qsid: str) -> set[str]:
    base = agent.volume_root() / qsid
    found = set()
    for a in os.listdir(base):
        if a.startswith("."):
            continue
        for b in os.listdir(base / a):
            for rest in os.listdir(base / a / b):
                found.add(str(uuid.UUID(a + b + rest)))
    return found


def _in_catalogue(agent: AgentProcess, qsid: str) -> set[str]:
    rows = _rows(agent, "SELECT folder_id FROM vfolders WHERE volume = ? AND qsid = ?", VOL, qsid)
    return {str(uuid.UUID(r[0])) for r in rows}


def _staging(agent: AgentProcess, qsid: str) -> set[str]:
    try:
        return set(os.listdir(agent.volume_root() / qsid / ".staging"))
    except FileNotFoundError:
        return set()


def _fill(agent: AgentProcess, vfid: str, files: int = 30) -> None:
    root = vfolder_path(agent, vfid)
    for i in range(files):
        d = root / f"d{i % 3}"
        d.mkdir(exist_ok=True)
        (d / f"f{i}").write_bytes(b"x" * 100)


# -- item 2: parallel deletes in one fresh scope --------------------------------------------------


def test_parallel_deletes_in_a_fresh_scope_remove_every_tree(agent, api) -> None:  # noqa: ANN001
    """Ten deletes at once of different vfolders of one scope: each 204 means the tree is gone."""
    for n in range(12):
        qsid = _new_scope(api)
        vfids = [f"{qsid}/{uuid.uuid4().hex}" for _ in range(10)]
        for i, v in enumerate(vfids):
            assert api.post("/folder/create", json={"volume": VOL, "vfid": v}).status_code == 204
            _fill(agent, v, files=(n + i) % 4 * 5)  # removals of different lengths: the staging dir empties often
        barrier = threading.Barrier(len(vfids))

        def delete(v: str, barrier: threading.Barrier = barrier) -> int:
            with agent.client() as c:
                barrier.wait()
                return c.post("/folder/delete", json={"volume": VOL, "vfid": v}).status_code

        with ThreadPoolExecutor(len(vfids)) as pool:
            codes = list(pool.map(delete, vfids))
        assert codes == [204] * len(vfids)
        assert _on_disk(agent, qsid) == set(), "a delete answered 204 and left its tree in place"
        assert _staging(agent, qsid) == set()
        r = api.request("DELETE", "/quota-scope", json={"volume": VOL, "qsid": qsid})
        assert r.status_code == 204, r.text


# -- item 3: create / delete / clone storms on one aa/bb prefix --------------------------------------


def _prefixed(prefix: str, rng: random.Random, n: int) -> list[str]:
    return [str(uuid.UUID(prefix + f"{rng.getrandbits(128 - 4 * len(prefix)):0{32 - len(prefix)}x}")) for _ in range(n)]


def _storm(agent: AgentProcess, seconds: float, threads: int, op: Callable[[httpx.Client, random.Random], int],
           seed: int) -> Counter[int]:
    codes: Counter[int] = Counter()
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def run(k: int) -> None:
        rng = random.Random(seed * 1000 + k)
        with agent.client() as c, httpx.Client(base_url=agent.client_url, timeout=60) as client_api:
            c.client_api = client_api  # type: ignore[attr-defined]
            while time.monotonic() < deadline:
                code = op(c, rng)
                with lock:
                    codes[code] += 1

    with ThreadPoolExecutor(threads) as pool:
        for f in [pool.submit(run, k) for k in range(threads)]:
            f.result()
    return codes


def test_create_delete_clone_storm_on_one_prefix_answers_cleanly(agent, api) -> None:  # noqa: ANN001
    seed = random.randrange(1 << 30)
    print(f"seed={seed}")
    qsid = _new_scope(api)
    ids = [f"{qsid}/{f}" for f in _prefixed("abcd", random.Random(seed), 6)]

    def op(c: httpx.Client, rng: random.Random) -> int:
        kind = rng.choice(["create", "create", "delete", "delete", "clone"])
        if kind == "clone":
            body = {"src_volume": VOL, "src_vfid": rng.choice(ids), "dst_vfid": rng.choice(ids)}
            return c.post("/folder/clone", json=body).status_code
        return c.post(f"/folder/{kind}", json={"volume": VOL, "vfid": rng.choice(ids)}).status_code

    codes = _storm(agent, 3, 8, op, seed)
    print(dict(codes))
    assert all(code < 500 for code in codes), f"server errors (seed={seed}): {dict(codes)}"
    assert codes[204] > 0
    assert _on_disk(agent, qsid) == _in_catalogue(agent, qsid)
    assert _staging(agent, qsid) == set()


# -- item 4: upload sessions end with their vfolder ---------------------------------------------------


def test_deleting_a_vfolder_ends_its_upload_sessions(agent, api, cli) -> None:  # noqa: ANN001
    qsid = _new_scope(api)
    vfid = f"{qsid}/{uuid.uuid4().hex}"
    assert api.post("/folder/create", json={"volume": VOL, "vfid": vfid}).status_code == 204
    token = upload_token(api, vfid, "big.bin", 1000)
    assert patch(cli, token, 0, b"a" * 500).status_code == 204
    staged = staged_file(agent, token)
    assert staged.exists()
    assert api.post("/folder/delete", json={"volume": VOL, "vfid": vfid}).status_code == 204
    assert not staged.exists(), "the vfolder's staged upload bytes outlived it"
    assert head(cli, token).status_code == 404
    r = patch(cli, token, 500, b"b" * 500)
    assert r.status_code == 404 and "no-such-upload-session" in r.text, r.text
    assert _rows(agent, "SELECT count(*) FROM upload_sessions") == [(0,)]
    r = api.request("DELETE", "/quota-scope", json={"volume": VOL, "qsid": qsid})
    assert r.status_code == 204, r.text


def test_an_old_token_never_publishes_into_a_recreated_vfolder(agent, api, cli) -> None:  # noqa: ANN001
    qsid = _new_scope(api)
    vfid = f"{qsid}/{uuid.uuid4().hex}"
    assert api.post("/folder/create", json={"volume": VOL, "vfid": vfid}).status_code == 204
    old = upload_token(api, vfid, "x.bin", 10)
    assert patch(cli, old, 0, b"01234").status_code == 204
    assert api.post("/folder/delete", json={"volume": VOL, "vfid": vfid}).status_code == 204
    assert api.post("/folder/create", json={"volume": VOL, "vfid": vfid}).status_code == 204
    r = patch(cli, old, 5, b"56789")
    assert r.status_code == 404, r.text
    assert not (vfolder_path(agent, vfid) / "x.bin").exists()
    new = upload_token(api, vfid, "x.bin", 10)
    assert claims_of(new)["inc"] and claims_of(new)["inc"] != claims_of(old)["inc"]  # the incarnation, named


# -- (a) the whole lifecycle at once -----------------------------------------------------------------------


def test_lifecycle_stress_keeps_disk_and_catalogue_in_step(agent, api) -> None:  # noqa: ANN001
    """create / delete / clone / tus upload / file ops from many threads on few ids sharing their prefix."""
    seed = int(os.environ.get("LIFECYCLE_SEED", random.randrange(1 << 30)))
    print(f"seed={seed} (LIFECYCLE_SEED={seed} repeats it)")
    qsid = _new_scope(api)
    rng0 = random.Random(seed)
    ids = [f"{qsid}/{f}" for f in _prefixed("beef", rng0, 5) + _prefixed("be", rng0, 2)]
    failures: list[str] = []

    def upload(c: httpx.Client, rng: random.Random, vfid: str) -> int:
        size = rng.choice([0, 10, 3000])
        r = c.post("/folder/file/upload", json={"volume": VOL, "vfid": vfid, "relpath": f"u{rng.randrange(3)}",
                                                "size": size})
        if r.status_code != 200:
            return r.status_code
        token = r.json()["token"]
        cli: httpx.Client = c.client_api  # type: ignore[attr-defined]
        half = size // 2
        codes = []
        for start, end in ((0, half), (half, size)):
            if end > start:
                headers = dict(TUS, **{"Upload-Offset": str(start)})
                codes.append(cli.patch("/upload", params={"token": token}, content=b"u" * (end - start),
                                       headers=headers).status_code)
        codes.append(head(cli, token).status_code)
        return max(codes)

    def op(c: httpx.Client, rng: random.Random) -> int:
        vfid = rng.choice(ids)
        kind = rng.choice(["create", "create", "delete", "clone", "upload", "upload", "mkdir", "rename", "rm",
                           "list", "fetch"])
        if kind in ("create", "delete"):
            return c.post(f"/folder/{kind}", json={"volume": VOL, "vfid": vfid}).status_code
        if kind == "clone":
            body = {"src_volume": VOL, "src_vfid": vfid, "dst_vfid": rng.choice(ids)}
            return c.post("/folder/clone", json=body).status_code
        if kind == "upload":
            return upload(c, rng, vfid)
        name = f"d{rng.randrange(3)}"
        body = {"volume": VOL, "vfid": vfid, "relpath": name}
        if kind == "mkdir":
            r = c.post("/folder/file/mkdir", json={**body, "exist_ok": True})
        elif kind == "rename":
            r = c.post("/folder/file/rename", json={**body, "new_name": f"d{rng.randrange(3)}"})
        elif kind == "rm":
            r = c.post("/folder/file/delete", json={"volume": VOL, "vfid": vfid, "relpaths": [name, "u0"],
                                                    "recursive": True})
        elif kind == "list":
            r = c.post("/folder/file/list", json={"volume": VOL, "vfid": vfid, "relpath": "."})
        else:
            r = c.post("/folder/file/fetch", json={"volume": VOL, "vfid": vfid, "relpath": "u1"})
        if r.status_code >= 500:
            failures.append(f"{kind} {vfid}: {r.status_code} {r.text[:300]}")
        return r.status_code

    codes = _storm(agent, 4, 10, op, seed)
    print(dict(codes))
    assert all(100 <= code < 500 for code in codes), f"server errors (seed={seed}): {dict(codes)} {failures}"
    # settled (every request answered): the catalogue and the disk agree exactly
    assert _on_disk(agent, qsid) == _in_catalogue(agent, qsid), f"seed={seed}"
    sessions = _rows(agent, "SELECT session_id, folder_id, state FROM upload_sessions WHERE qsid = ?", qsid)
    known = {uuid.UUID(f).hex for f in _in_catalogue(agent, qsid)}
    assert all(f in known for _, f, _ in sessions), "an upload session outlived its vfolder"
    open_staged = {f"upload-{s}" for s, _, state in sessions if state == "open"}
    assert _staging(agent, qsid) <= open_staged, f"leftovers in .staging (seed={seed})"
    for v in _in_catalogue(agent, qsid):
        assert api.post("/folder/delete", json={"volume": VOL, "vfid": f"{qsid}/{v}"}).status_code == 204
    r = api.request("DELETE", "/quota-scope", json={"volume": VOL, "qsid": qsid})
    assert r.status_code == 204, r.text


# -- the locks themselves ---------------------------------------------------------------------------


_HOLDER = """
import asyncio, sys
from pathlib import Path
from backends.locks import EXCLUSIVE, LifecycleLocks

async def main():
    async with LifecycleLocks(Path(sys.argv[1])).hold([(sys.argv[2], EXCLUSIVE)], what="test"):
        print("held", flush=True)
        await asyncio.sleep(60)

asyncio.run(main())
"""


def test_lifecycle_locks_hold_between_processes(tmp_path) -> None:  # noqa: ANN001
    """A lock another agent process holds makes this one wait, then answer Busy (409); shared locks coexist."""
    from backends.errors import Busy
    from backends.locks import EXCLUSIVE, SHARED, LifecycleLocks, scope_key, vfolder_key

    key = vfolder_key("local", "qs/0123")
    locks = LifecycleLocks(tmp_path / "locks")
    child = subprocess.Popen([sys.executable, "-c", _HOLDER, str(tmp_path / "locks"), key],
                             stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(Path.cwd())})
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == b"held"

        async def attempt(mode: int) -> None:
            async with locks.hold([(key, mode)], what="vfolder qs/0123", wait=0.3):
                pass

        for mode in (SHARED, EXCLUSIVE):
            with pytest.raises(Busy, match="vfolder qs/0123"):
                asyncio.run(attempt(mode))
    finally:
        child.kill()
        child.wait()
    asyncio.run(attempt(EXCLUSIVE))

    async def shared_twice() -> None:  # two holders of one scope, shared; clone src == dst merges to exclusive
        s = scope_key("local", "qs")
        async with locks.hold([(s, SHARED)], what="a"), locks.hold([(s, SHARED)], what="b", wait=0.3):
            pass
        async with locks.hold([(key, SHARED), (key, EXCLUSIVE)], what="c", wait=0.3):
            pass

    asyncio.run(shared_twice())


def test_an_upload_session_of_a_vanished_vfolder_is_ended_at_start_up(agent, api, cli) -> None:  # noqa: ANN001
    """The agent died between a delete's removal and the end of its sessions: start-up ends them."""
    qsid = _new_scope(api)
    vfid = f"{qsid}/{uuid.uuid4().hex}"
    assert api.post("/folder/create", json={"volume": VOL, "vfid": vfid}).status_code == 204
    token = upload_token(api, vfid, "y.bin", 10)
    assert patch(cli, token, 0, b"01234").status_code == 204
    staged = staged_file(agent, token)
    agent.stop()
    gone = vfolder_path(agent, vfid)
    remove_tree(gone)
    gone.parent.rmdir()
    gone.parent.parent.rmdir()
    con = sqlite3.connect(agent.workdir / "catalog.db")
    with con:
        con.execute("DELETE FROM vfolders WHERE folder_id = ?", (uuid.UUID(vfid.partition("/")[2]).hex,))
    con.close()
    agent.start()

    def ended() -> None:
        assert not staged.exists()

    eventually(ended)
    with httpx.Client(base_url=agent.client_url, timeout=60) as c:
        assert head(c, token).status_code == 404
    with agent.client() as c:
        r = c.request("DELETE", "/quota-scope", json={"volume": VOL, "qsid": qsid})
        assert r.status_code == 204, r.text


def test_a_patch_running_while_its_vfolder_is_deleted_leaves_nothing_behind(agent, api, cli) -> None:  # noqa: ANN001
    qsid = _new_scope(api)
    vfid = f"{qsid}/{uuid.uuid4().hex}"
    assert api.post("/folder/create", json={"volume": VOL, "vfid": vfid}).status_code == 204
    token = upload_token(api, vfid, "z.bin", 300)
    staged = staged_file(agent, token)
    deleted = threading.Event()

    def body() -> Iterator[bytes]:
        yield b"a" * 100

        def under_way() -> None:  # the PATCH holds its session and has opened its staged file
            assert staged.exists()

        eventually(under_way)
        r = api.post("/folder/delete", json={"volume": VOL, "vfid": vfid})
        assert r.status_code == 204, r.text
        deleted.set()
        yield b"b" * 100

    headers = dict(TUS, **{"Upload-Offset": "0"})
    r = cli.patch("/upload", params={"token": token}, content=body(), headers=headers)
    assert deleted.is_set()
    assert r.status_code == 404 and "no-such-upload-session" in r.text, r.text
    assert not staged.exists(), "the PATCH re-created or kept bytes of a deleted vfolder's upload"
    assert head(cli, token).status_code == 404
    r = api.request("DELETE", "/quota-scope", json={"volume": VOL, "qsid": qsid})
    assert r.status_code == 204, r.text
