"""The view as operators run it: `serve` with `[view] enabled` spawns and supervises `storage-agent view`."""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from agent.view import mounts
from tests.support import AgentProcess, assert_clean_log, make_agent

pytest.importorskip("pyfuse3", reason="the view needs pyfuse3 (extra 'fuse')")
if not os.path.exists("/dev/fuse") or os.geteuid() != 0:
    pytest.skip("FUSE mounts need /dev/fuse and root", allow_module_level=True)


def _wait(what: str, ok: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if ok():
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _view_pids(agent: AgentProcess) -> list[int]:
    assert agent.proc is not None
    return [p.pid for p in psutil.Process(agent.proc.pid).children() if "view" in " ".join(p.cmdline())]


@pytest.fixture
def viewed(tmp_path: Path) -> Iterator[tuple[AgentProcess, Path]]:
    mnt = tmp_path / "view"
    agent = make_agent(tmp_path / "agent", view={"enabled": True, "mount-root": str(mnt)})
    try:
        agent.start()
        yield agent, mnt
        agent.stop()
        assert not mounts.is_view_mounted(mnt), "serve left the view mounted after stopping"
        assert_clean_log(agent)
    finally:
        agent.kill()
        for pid in _view_pids(agent) if agent.proc and agent.proc.poll() is None else []:
            os.kill(pid, signal.SIGKILL)
        mounts.detach(mnt)


def test_view_through_serve(viewed: tuple[AgentProcess, Path]) -> None:
    agent, mnt = viewed
    api = agent.client()
    qsid = f"qs-{uuid.uuid4().hex[:8]}"
    assert api.request("POST", "/quota-scope", json={"volume": "local", "qsid": qsid}).status_code == 204
    folder = uuid.uuid4()
    vfid = f"{qsid}/{folder.hex}"
    assert api.request("POST", "/folder/create", json={"volume": "local", "vfid": vfid}).status_code == 204
    real = Path(api.request("GET", "/folder/mount", json={"volume": "local", "vfid": vfid}).json()["path"])
    files = {"a.txt": b"alpha\n", "deep/b.bin": os.urandom(3 * 2**20 + 17), "deep/er/c.bin": os.urandom(65537)}
    for rel, data in files.items():
        (real / rel).parent.mkdir(parents=True, exist_ok=True)
        (real / rel).write_bytes(data)
    os.symlink("/etc/passwd", real / "passwd")
    os.link(real / "deep/b.bin", real / "deep/er/b-again.bin")  # du through the view counts it once, as du does

    view = mnt / "local" / qsid / str(folder)
    _wait("the new vfolder in the view", lambda: view.is_dir())  # new scopes show up without a restart
    for rel, data in files.items():
        got = (view / rel).read_bytes()
        assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest(), rel
    assert sorted(os.listdir(view)) == sorted(os.listdir(real))

    # the usual tools work on it as on the real directory
    def sh(*argv: str) -> str:
        return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=True).stdout

    assert sh("du", "-sb", str(view)).split()[0] == sh("du", "-sb", str(real)).split()[0]
    assert len(sh("find", str(view)).splitlines()) == len(sh("find", str(real)).splitlines())
    shown = "%s %a %Y %u"
    assert sh("stat", "-c", shown, str(view / "deep/b.bin")) == sh("stat", "-c", shown, str(real / "deep/b.bin"))
    copy = mnt.parent / "copied"
    sh("cp", "-r", str(view), str(copy))
    for rel, data in files.items():
        assert (copy / rel).read_bytes() == data, rel
    assert os.readlink(copy / "passwd") == os.readlink(view / "passwd")  # copied as a link, still a dead end

    # the catalogue's figures beside the files equal the API's usage answer
    answer = api.request("GET", "/folder/usage", json={"volume": "local", "vfid": vfid}).json()

    def figures() -> dict[str, str]:
        out = subprocess.run(
            ["getfattr", "-d", "--absolute-names", str(view)], capture_output=True, text=True, timeout=10, check=True
        ).stdout
        pairs = (line.split("=", 1) for line in out.splitlines() if line.startswith("user.storage_agent."))
        return {k.removeprefix("user.storage_agent."): v.strip('"') for k, v in pairs}

    _wait(
        "getfattr figures to match the API",
        lambda: (figures().get("used_bytes"), figures().get("file_count"))
        == (str(answer["used_bytes"]), str(answer["file_count"])),
    )
    assert figures()["state"] == "ready"

    # allocated bytes beside the files = what the manager is told a vfolder uses (GET /folder/used-bytes)
    def allocated_matches() -> bool:
        r = api.request("GET", "/folder/used-bytes", json={"volume": "local", "vfid": vfid})
        assert r.status_code == 200, r.text
        return figures().get("allocated_bytes") == str(r.json()["used_bytes"])

    _wait("getfattr allocated_bytes to match GET /folder/used-bytes", allocated_matches)
    assert int(figures()["allocated_bytes"]) > 0

    # every write path is refused
    for attempt in (
        lambda: os.open(view / "new", os.O_WRONLY | os.O_CREAT, 0o644),
        lambda: os.open(view / "a.txt", os.O_WRONLY),
        lambda: os.unlink(view / "a.txt"),
        lambda: os.mkdir(view / "x"),
        lambda: os.rename(view / "a.txt", view / "b.txt"),
        lambda: os.chmod(view / "a.txt", 0o600),
        lambda: os.setxattr(view, "user.storage_agent.state", b"x"),
    ):
        with pytest.raises(OSError) as info:
            attempt()
        assert info.value.errno == errno.EROFS
    assert (real / "a.txt").read_bytes() == b"alpha\n"

    # a link to /etc/passwd is shown as a link, and reading through it never gives the host file
    assert stat.S_ISLNK(os.lstat(view / "passwd").st_mode)
    assert os.readlink(view / "passwd").endswith("/etc/passwd")
    cat = subprocess.run(["cat", str(view / "passwd")], capture_output=True, timeout=10)
    assert cat.returncode != 0 and cat.stdout != Path("/etc/passwd").read_bytes()

    # a stopped view never stalls the API
    (pid,) = _view_pids(agent)
    os.kill(pid, signal.SIGSTOP)
    try:
        with httpx.Client(base_url=agent.manager_url, headers=api.headers, timeout=5) as quick:
            assert quick.get("/status").status_code == 200
            assert quick.get("/volumes").status_code == 200
            r = quick.request("GET", "/folder/usage", json={"volume": "local", "vfid": vfid})
            assert r.status_code == 200 and r.json()["used_bytes"] == answer["used_bytes"]
            r = quick.request("POST", "/folder/file/list", json={"volume": "local", "vfid": vfid, "relpath": "."})
            assert r.status_code == 200 and len(r.json()["items"]) == 3
    finally:
        os.kill(pid, signal.SIGCONT)

    # a killed view: the API keeps answering and the supervisor mounts a new one
    os.kill(pid, signal.SIGKILL)
    assert api.get("/status").status_code == 200
    _wait("a new view process", lambda: _view_pids(agent) not in ([], [pid]))
    _wait("the remounted view", lambda: (view / "a.txt").read_bytes() == b"alpha\n")
    assert api.request("GET", "/folder/usage", json={"volume": "local", "vfid": vfid}).status_code == 200
    api.close()

    # stopping serve while its view is stopped still ends the view and unmounts it
    (pid,) = _view_pids(agent)
    os.kill(pid, signal.SIGSTOP)
    began = time.monotonic()
    assert agent.stop() == 0
    assert time.monotonic() - began < 15
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert not mounts.is_view_mounted(mnt)


def test_stale_mount_is_cleaned_at_start(viewed: tuple[AgentProcess, Path]) -> None:
    agent, mnt = viewed
    agent.stop()
    # a view that crashed leaves its mount behind (every access: ENOTCONN)
    crashed = subprocess.Popen([sys.executable, "-m", "agent", "view", "--config", str(agent.config_path)])
    try:
        _wait("the standalone view", lambda: mounts.is_view_mounted(mnt))
    finally:
        crashed.kill()
        crashed.wait()
    assert mounts.is_view_mounted(mnt)
    with pytest.raises(OSError) as info:
        os.listdir(mnt)
    assert info.value.errno == errno.ENOTCONN
    agent.start()
    _wait("a working view after start-up", lambda: os.listdir(mnt) == ["local"])
    assert mounts.fuse_mounts_at(mnt) == ["fuse.storage-agent-view"]  # the stale one was detached, not stacked
