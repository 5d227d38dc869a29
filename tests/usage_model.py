"""A seeded, model-based fuzzer of the usage engine (issue 22), shared by ``tests/test_usage_fuzz.py``
(a fixed seed set) and ``bench/usage_fuzz.py`` (many rounds).

Each round applies a burst of operations straight to a vfolder's tree on disk — files created, appended,
truncated, overwritten by rename; directories made, removed, renamed within and across depths, rotated
like checkpoints, moved out of the vfolder and back (with hard links inside, written through their
outside names); hard links, symlinks in and out, chmod, unicode and non-UTF-8 names; with and without
pauses — then waits for the answer to settle and compares it with a fresh walk (``used_bytes``,
``file_count``; ``/folder/used-bytes`` against ``du -s -B1``). The model is the disk itself: the engine
must agree with it once nothing moves. An answer still flagged stale at the deadline is a *flagged*
mismatch (allowed); a settled answer that is wrong is a failure.
"""

from __future__ import annotations

import functools
import os
import random
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tests.support import walk

NAMES = [b"a", b"b", b"ckpt", b"data", "é".encode(), "日本".encode(), b"\xff", b"x\xfey", b"sp ace", b"n.1"]


def du(path: bytes) -> int:
    """``du -s -B1`` of a tree (the reference for ``/folder/used-bytes``)."""
    out = subprocess.run(["du", "-s", "-B1", path], capture_output=True, check=True).stdout
    return int(out.split()[0])


@dataclass
class Outcome:
    ok: bool
    flagged: bool  # a mismatch the answer admitted (still stale at the deadline)
    detail: str = ""


@dataclass
class Model:
    root: bytes  # the vfolder on disk
    outside: bytes  # a directory on the same filesystem, outside every vfolder
    sibling: bytes | None  # another vfolder (hard links across vfolders)
    rng: random.Random
    log: list[str] = field(default_factory=list)
    pauses: bool = True  # False: applying seeds offline (a pause changes nothing on disk)

    # -- picking --------------------------------------------------------------------------------

    def dirs(self, base: bytes | None = None) -> list[bytes]:
        base = base or self.root
        out = [base]
        for dirpath, dirnames, _ in os.walk(base):
            out.extend(os.path.join(dirpath, d) for d in dirnames if not os.path.islink(os.path.join(dirpath, d)))
        return out

    def files(self, base: bytes | None = None) -> list[bytes]:
        base = base or self.root
        out = []
        for dirpath, _, filenames in os.walk(base):
            for f in filenames:
                p = os.path.join(dirpath, f)
                if os.path.isfile(p) and not os.path.islink(p):
                    out.append(p)
        return out

    def name(self) -> bytes:
        return self.rng.choice(NAMES) + str(self.rng.randrange(100)).encode()

    def newpath(self, base: bytes | None = None) -> bytes:
        return os.path.join(self.rng.choice(self.dirs(base)), self.name())

    # -- operations ------------------------------------------------------------------------------

    def op_create(self) -> None:
        with open(self.newpath(), "wb") as f:
            f.write(os.urandom(self.rng.choice([0, 1, 100, 4096, 5000, 70_000])))

    def op_append(self) -> None:
        fs = self.files()
        if fs:
            with open(self.rng.choice(fs), "ab") as f:
                f.write(b"a" * self.rng.randrange(1, 30_000))

    def op_truncate(self) -> None:
        fs = self.files()
        if fs:
            os.truncate(self.rng.choice(fs), self.rng.randrange(0, 9000))

    def op_overwrite_by_rename(self) -> None:
        fs = self.files()
        if fs:
            target = self.rng.choice(fs)
            tmp = target + b".tmp"
            with open(tmp, "wb") as f:
                f.write(b"o" * self.rng.randrange(0, 20_000))
            os.rename(tmp, target)

    def op_mkdir(self) -> None:
        os.mkdir(self.newpath())

    def op_rmdir(self) -> None:
        empty = [d for d in self.dirs()[1:] if not os.listdir(d)]
        if empty:
            os.rmdir(self.rng.choice(empty))

    def op_rm_rf(self) -> None:
        ds = self.dirs()[1:]
        if ds:
            shutil.rmtree(self.rng.choice(ds))

    def op_rename(self) -> None:
        ds, fs = self.dirs(), self.files()
        src = self.rng.choice(ds[1:] + fs) if len(ds) > 1 or fs else None
        if src is None:
            return
        dst_dir = self.rng.choice([d for d in ds if not (d + b"/").startswith(src + b"/")])
        dst = os.path.join(dst_dir, self.name())
        if os.path.isdir(src) and os.path.isdir(dst) and os.listdir(dst):
            return
        if os.path.isdir(src) != os.path.isdir(dst) and os.path.exists(dst):
            return
        os.rename(src, dst)

    def op_rotate(self) -> None:
        base = self.rng.choice(self.dirs())
        a, b, c = (os.path.join(base, n) for n in (b"ckpt", b"ckpt.new", b"ckpt.old"))
        for d in (a, b):
            if not os.path.isdir(d) or os.path.islink(d):
                if os.path.lexists(d):
                    return
                os.makedirs(os.path.join(d, b"sub"))
                with open(os.path.join(d, b"w"), "wb") as f:
                    f.write(os.urandom(self.rng.randrange(1, 9000)))
                with open(os.path.join(d, b"sub", b"w"), "wb") as f:
                    f.write(os.urandom(self.rng.randrange(1, 9000)))
        if os.path.lexists(c):
            return
        for _ in range(self.rng.randrange(1, 40)):
            os.rename(a, c)
            os.rename(b, a)
            os.rename(c, b)

    def op_out_and_back(self) -> None:
        """A subtree (with a hard link to a file staying inside) leaves, is written through its outside
        names, and maybe comes back."""
        ds = self.dirs()[1:]
        if not ds:
            return
        d = self.rng.choice(ds)
        keep = [f for f in self.files() if not f.startswith(d + b"/")]
        if keep:
            os.link(self.rng.choice(keep), os.path.join(d, b"hl" + str(self.rng.randrange(1000)).encode()))
        away = os.path.join(self.outside, self.name())
        if os.path.lexists(away):
            return
        os.rename(d, away)
        for f in self.files(away)[:3]:
            with open(f, "ab") as fh:
                fh.write(b"w" * self.rng.randrange(1, 50_000))
        if self.rng.random() < 0.5:
            back = self.newpath()
            if not os.path.lexists(back):
                os.rename(away, back)

    def op_write_outside(self) -> None:
        """Write through names outside the vfolder (subtrees moved out earlier, links to siblings)."""
        fs = self.files(self.outside)
        if self.sibling:
            fs += self.files(self.sibling)
        for f in self.rng.sample(fs, min(3, len(fs))):
            with open(f, "ab") as fh:
                fh.write(b"o" * self.rng.randrange(1, 40_000))

    def op_hardlink(self) -> None:
        fs = self.files()
        if fs:
            dst = self.newpath()
            if not os.path.lexists(dst):
                os.link(self.rng.choice(fs), dst)

    def op_link_to_sibling(self) -> None:
        fs = self.files()
        if fs and self.sibling:
            dst = os.path.join(self.sibling, self.name())
            if not os.path.lexists(dst):
                os.link(self.rng.choice(fs), dst)

    def op_symlink(self) -> None:
        target = self.rng.choice([b"/etc", b"../..", b"a0", self.outside, b"x" * self.rng.randrange(1, 200)])
        dst = self.newpath()
        if not os.path.lexists(dst):
            os.symlink(target, dst)

    def op_chmod(self) -> None:
        fs = self.files() + self.dirs()[1:]
        if fs:
            os.chmod(self.rng.choice(fs), self.rng.choice([0o644, 0o600, 0o755, 0o700]))

    def op_pause(self) -> None:
        pause = self.rng.choice([0.01, 0.05, 0.2])
        if self.pauses:
            time.sleep(pause)

    OPS: tuple[tuple[str, int], ...] = (
        ("create", 10), ("append", 6), ("truncate", 3), ("overwrite_by_rename", 3), ("mkdir", 6),
        ("rmdir", 2), ("rm_rf", 1), ("rename", 8), ("rotate", 2), ("out_and_back", 2), ("write_outside", 3),
        ("hardlink", 3), ("link_to_sibling", 1), ("symlink", 2), ("chmod", 2), ("pause", 3),
    )  # fmt: skip

    def burst(self, n: int) -> None:
        names = [o for o, _ in self.OPS]
        weights = [w for _, w in self.OPS]
        for _ in range(n):
            op = self.rng.choices(names, weights)[0]
            self.log.append(op)
            try:
                getattr(self, f"op_{op}")()
            except (FileNotFoundError, FileExistsError, OSError) as e:
                self.log.append(f"  ({type(e).__name__})")

    def trim(self, limit: int = 400) -> None:
        """Keep the tree small enough for many rounds."""
        if walk(self.root)[0] > limit:
            for e in os.listdir(self.root):
                p = os.path.join(self.root, e)
                if os.path.isdir(p) and not os.path.islink(p):
                    shutil.rmtree(p)
                else:
                    os.unlink(p)


def diagnose(catalog: Any, vfid: str, root: bytes) -> str:
    """Where a settled wrong answer comes from: the engine's per-directory rows (written through to the
    catalogue) that differ from a fresh read of the same directory, rows of directories that are gone and
    directories without a row. Printed with each failure (replaying a failure may need the whole run)."""
    import sqlite3

    from agent.engine.usage.aggregates import encode_links, read_dir

    qsid, hexid = vfid.split("/")
    with sqlite3.connect(f"file:{catalog}?mode=ro", uri=True) as db:
        rows = db.execute(
            "SELECT d.relpath, d.ino, d.entries, d.size_bytes, d.allocated_bytes, d.links FROM usage_dirs d "
            "JOIN usage_vfolders v ON v.id = d.vf WHERE v.qsid = ? AND v.folder_id = ?",
            (qsid, hexid),
        ).fetchall()
    held = {os.fsdecode(bytes(r[0]) if not isinstance(r[0], str) else os.fsencode(r[0])): r[1:] for r in rows}
    on_disk = {os.fsdecode(os.path.relpath(d, root)) if d != root else "" for d in Model(root, root, None,
               random.Random(0)).dirs()}
    out = []
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for rel in sorted(held.keys() | on_disk):
            agg = read_dir(fd, rel) if rel in on_disk else None
            now = None if agg is None else (agg.ino, agg.entries, agg.size, agg.alloc, encode_links(agg.links))
            if rel not in held:
                out.append(f"    no row: {rel!r} (disk {now})")
            elif now is None:
                out.append(f"    row of a directory not on disk: {rel!r} {held[rel]}")
            elif tuple(held[rel]) != now:
                out.append(f"    {rel!r}: row {tuple(held[rel])} disk {now}")
    finally:
        os.close(fd)
    return "\n".join(out) or "    every row matches the disk"


def settle_and_compare(
    answers: Callable[[], tuple[dict[str, Any], dict[str, Any]]], root: bytes, deadline: float = 30.0,
    why: Callable[[], str] | None = None,
) -> Outcome:
    """Wait for a settled answer (``stale`` and ``pending`` false on both calls) and compare it with the
    disk; an answer that never settles is a flagged mismatch."""
    end = time.monotonic() + deadline
    while True:
        u, ub = answers()
        settled = not (u["stale"] or u.get("pending") or ub["stale"] or ub.get("pending"))
        count, size, _ = walk(root)
        alloc = du(root)
        right = (u["file_count"], u["used_bytes"], ub["used_bytes"]) == (count, size, alloc)
        if settled:
            if right:
                return Outcome(True, False)
            # a settled answer must be right: look once more (the walk and the answer were not atomic,
            # but nothing writes the tree now)
            u, ub = answers()
            if (u["file_count"], u["used_bytes"], ub["used_bytes"]) == (count, size, alloc) or u["stale"]:
                return Outcome(True, False)
            time.sleep(3.0)  # say whether the engine corrected itself later (lag not flagged) or never
            later, ub_later = answers()
            late = (later["file_count"], later["used_bytes"], ub_later["used_bytes"]) == (count, size, alloc)
            return Outcome(
                False, False, f"settled answer {u['file_count']}/{u['used_bytes']}/{ub['used_bytes']} "
                f"!= disk {count}/{size}/{alloc} ({'right 3 s later' if late else 'still wrong 3 s later'})"
                + (f"\n{why()}" if why is not None else "")
            )
        if time.monotonic() > end:
            return Outcome(right, not right, "" if right else "still stale at the deadline")
        time.sleep(0.05)


@dataclass
class RoundResult:
    seed: int
    vfolder: str  # "main" | "sibling"
    outcome: Outcome
    ops: list[str]


def _vfolder(api: Any, agent: Any) -> tuple[str, bytes]:
    import uuid

    qsid = f"qs-{uuid.uuid4().hex[:8]}"
    r = api.post("/quota-scope", json={"volume": "local", "qsid": qsid})
    assert r.status_code == 204, r.text
    vfid = f"{qsid}/{uuid.uuid4().hex}"
    r = api.post("/folder/create", json={"volume": "local", "vfid": vfid})
    assert r.status_code == 204, r.text
    hexid = vfid.split("/")[1]
    path = agent.volume_root() / qsid / hexid[:2] / hexid[2:4] / hexid[4:]
    return vfid, os.fsencode(path)


def _answers(api: Any, vfid: str) -> Callable[[], tuple[dict[str, Any], dict[str, Any]]]:
    def get() -> tuple[dict[str, Any], dict[str, Any]]:
        body = {"volume": "local", "vfid": vfid}
        u = api.request("GET", "/folder/usage", json=body)
        ub = api.request("GET", "/folder/used-bytes", json=body)
        assert u.status_code == 200 and ub.status_code == 200, (u.text, ub.text)
        return u.json(), ub.json()

    return get


def prepare(root: bytes, outside: bytes, sibling: bytes, seed: int) -> Model:
    """The trims that precede the burst of ``seed`` (the tree before a round depends only on the seeds
    before it: nothing the engine does writes the tree)."""
    model = Model(root, outside, sibling, random.Random(seed))
    model.trim()
    Model(sibling, outside, None, random.Random(seed)).trim(200)
    if len(model.files(outside)) > 200:
        shutil.rmtree(outside)
        os.makedirs(outside)
    return model


def run_rounds(
    watcher: str,
    seeds: list[int],
    workdir: Any,
    *,
    ops: int = 25,
    on_round: Callable[[RoundResult], None] | None = None,
    offline: list[int] | None = None,
    config: dict[str, Any] | None = None,
) -> list[RoundResult]:
    """One agent watching with ``watcher``; each seed is one burst on the same two vfolders (the tree is
    trimmed now and then), compared after it settles. ``offline``: seeds applied to the tree first with the
    agent stopped (fast: no settling), so a seed of a long run can be replayed with only the last few live
    (the agent's start-up scan reads the tree the offline seeds left)."""
    from tests.support import make_agent

    agent = make_agent(workdir, **{"usage": {"watcher": watcher}, **(config or {})}).start()
    results: list[RoundResult] = []
    outside = b""
    try:
        with agent.client() as api:
            vfid, root = _vfolder(api, agent)
            sib_vfid, sibling = _vfolder(api, agent)
        outside = root + b"-outside"
        os.makedirs(outside, exist_ok=True)
        if offline:
            agent.stop()
            for seed in offline:
                model = prepare(root, outside, sibling, seed)
                model.pauses = False
                model.burst(ops)
            agent.start()
        with agent.client() as api:
            for seed in seeds:
                model = prepare(root, outside, sibling, seed)
                settle_and_compare(_answers(api, vfid), root)  # the trim itself is not under test
                settle_and_compare(_answers(api, sib_vfid), sibling)
                model.burst(ops)
                for name, vid, path in (("main", vfid, root), ("sibling", sib_vfid, sibling)):
                    why = functools.partial(diagnose, agent.workdir / "catalog.db", vid, path)
                    res = RoundResult(seed, name, settle_and_compare(_answers(api, vid), path, why=why), model.log)
                    results.append(res)
                    if on_round is not None:
                        on_round(res)
    finally:
        if outside:
            shutil.rmtree(outside, ignore_errors=True)
        agent.stop()
    return results
