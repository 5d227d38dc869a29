"""``[storage-proxy] user`` / ``group``: an agent started as root serves as that user (agent/runtime/privileges.py)."""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import socket
import uuid
from pathlib import Path

import httpx
import pytest

from agent.runtime.privileges import BASE, CAP_SYS_ADMIN, NAMES
from tests.support import ROOT, AgentProcess, assert_clean_log, eventually, make_agent

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="starting an agent as root needs root")

USER, GROUP = "nobody", "nogroup"


def _ids() -> tuple[int, int]:
    try:
        return pwd.getpwnam(USER).pw_uid, grp.getgrnam(GROUP).gr_gid
    except KeyError:
        pytest.skip(f"no {USER}/{GROUP} user and group on this system")


def _status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, v in (line.split(":", 1) for line in lines)}


def _privileged_port() -> int:
    """A free port below 1024: only root may bind it, so serving there shows the bind came before the switch."""
    for port in range(1023, 900, -1):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    pytest.skip("no free port below 1024")


def _mask(caps: frozenset[int]) -> int:
    return sum(1 << c for c in caps)


def _folder(agent: AgentProcess, api, qsid: str) -> Path:  # noqa: ANN001
    folder = uuid.uuid4().hex
    assert api.post("/quota-scope", json={"volume": "local", "qsid": qsid}).status_code == 204
    r = api.post("/folder/create", json={"volume": "local", "vfid": f"{qsid}/{folder}"})
    assert r.status_code == 204, r.text
    return agent.volume_root() / qsid / folder[:2] / folder[2:4] / folder[4:]


def test_kept_capabilities_are_those_the_packaged_unit_grants() -> None:
    """The README promises the same set either way an agent runs as its own user."""
    unit = (ROOT / "packaging/debian/storage-agent.service").read_text()
    granted = next(line for line in unit.splitlines() if line.startswith("AmbientCapabilities="))
    assert set(granted.split("=", 1)[1].split()) == {NAMES[c] for c in BASE}
    drop_in = (ROOT / "packaging/sys-admin.conf").read_text()
    assert f"AmbientCapabilities={NAMES[CAP_SYS_ADMIN]}" in drop_in


@needs_root
def test_root_start_serves_as_the_configured_user(tmp_path: Path) -> None:
    uid, gid = _ids()
    pid_file = tmp_path / "run" / "agent.pid"
    pid_file.parent.mkdir()
    agent = make_agent(tmp_path / "agent", storage_proxy={"pid-file": str(pid_file)})
    agent.start().stop()  # first as root: the catalogue is root's ...
    assert Path(agent.config["catalog"]["path"]).stat().st_uid == 0
    agent.config["storage-proxy"].update(user=USER, group=GROUP)
    agent.config["api"]["client"]["service-addr"]["port"] = _privileged_port()
    agent.start()  # ... then as the user, who is handed the catalogue
    try:
        assert agent.proc is not None
        status = _status(agent.proc.pid)
        assert status["Uid"].split() == [str(uid)] * 4, status["Uid"]
        assert status["Gid"].split() == [str(gid)] * 4, status["Gid"]
        assert "0" not in status["Groups"].split()
        # only what the packaged unit grants (CAP_SYS_ADMIN: the default watcher is fanotify), and ambient too
        kept = BASE | {CAP_SYS_ADMIN}
        assert int(status["CapEff"], 16) == _mask(kept), status["CapEff"]
        assert int(status["CapAmb"], 16) == _mask(kept), status["CapAmb"]
        assert int(status["CapBnd"], 16) == _mask(kept), status["CapBnd"]
        assert pid_file.read_text().strip() == str(agent.proc.pid)
        assert httpx.get(f"{agent.client_url}/openapi.json", timeout=10).status_code == 200  # the port below 1024
        with agent.client() as api:
            where = _folder(agent, api, f"qs{uuid.uuid4().hex[:8]}")
            # what the agent creates belongs to the configured user, as with upstream
            assert (where.stat().st_uid, where.stat().st_gid) == (uid, gid)
            assert Path(agent.config["catalog"]["path"]).stat().st_uid == uid
            # the kept capabilities work: a file of another user, in a directory only root may write, is removed
            inner = where / "locked"
            inner.mkdir()
            (inner / "f").write_bytes(b"x" * 10)
            os.chown(inner / "f", 12345, 12345)
            inner.chmod(0o500)
            os.chown(inner, 0, 0)
            vfid = f"{where.parts[-4]}/{''.join(where.parts[-3:])}"
            r = api.post("/folder/delete", json={"volume": "local", "vfid": vfid})
            assert r.status_code in (200, 204), r.text
            eventually(lambda: not where.exists(), timeout=30)
            metrics = api.get("/metrics")  # the process figures read /proc/self, non-dumpable after the switch
            assert metrics.status_code == 200 and "process_open_fds" in metrics.text
        assert "running as uid" in agent.log() and "watching with fanotify" in agent.log()
    finally:
        assert agent.stop() == 0, agent.log()
    assert not pid_file.exists(), "the pid file is removed at the end"
    assert_clean_log(agent)


@needs_root
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) is needed to withhold a capability")
def test_a_capability_the_process_lacks_is_not_kept_and_fanotify_falls_back(tmp_path: Path) -> None:
    """Root without CAP_SYS_ADMIN in its bounding set (a container): the drop keeps the rest, says what is
    missing, and the usage engine watches with inotify; usage still follows writes."""
    uid, _gid = _ids()
    agent = make_agent(tmp_path / "agent", storage_proxy={"user": USER, "group": GROUP})
    agent.wrapper = ["setpriv", "--bounding-set", "-sys_admin", "--"]
    agent.start()
    try:
        assert agent.proc is not None
        status = _status(agent.proc.pid)
        assert status["Uid"].split() == [str(uid)] * 4
        assert int(status["CapEff"], 16) == _mask(BASE)
        text = agent.log()
        assert "CAP_SYS_ADMIN is not held" in text and "inotify" in text, text
        with agent.client() as api:
            qsid = f"qs{uuid.uuid4().hex[:8]}"
            where = _folder(agent, api, qsid)
            vfid = f"{qsid}/{''.join(where.parts[-3:])}"
            (where / "data").write_bytes(os.urandom(64 * 1024))

            def measured() -> None:
                r = api.request("GET", "/folder/usage", json={"volume": "local", "vfid": vfid})
                assert r.status_code == 200 and r.json()["used_bytes"] >= 64 * 1024, r.text

            eventually(measured, timeout=30)
    finally:
        assert agent.stop() == 0, agent.log()
    assert_clean_log(agent)


@needs_root
def test_the_view_process_mounts_after_the_switch(tmp_path: Path) -> None:
    """The FUSE view is started after the switch: it runs as the configured user and mounts thanks to the
    ambient CAP_SYS_ADMIN it inherits."""
    pytest.importorskip("pyfuse3", reason="the view needs pyfuse3 (extra 'fuse')")
    if not os.path.exists("/dev/fuse"):
        pytest.skip("FUSE mounts need /dev/fuse")
    import psutil

    from agent.view import mounts

    uid, gid = _ids()
    mnt = tmp_path / "view"
    agent = make_agent(tmp_path / "agent", storage_proxy={"user": USER, "group": GROUP},
                       view={"enabled": True, "mount-root": str(mnt)})
    try:
        agent.start()
        with agent.client() as api:
            qsid = f"qs{uuid.uuid4().hex[:8]}"
            where = _folder(agent, api, qsid)
            (where / "hello").write_bytes(b"hi\n")
            folder = uuid.UUID("".join(where.parts[-3:]))
            seen = mnt / "local" / qsid / str(folder) / "hello"

            def shown() -> None:
                assert seen.exists(), f"{seen} not in the view"
                assert seen.read_bytes() == b"hi\n"

            eventually(shown, timeout=30)
        assert agent.proc is not None
        views = [p for p in psutil.Process(agent.proc.pid).children() if "view" in " ".join(p.cmdline())]
        assert views, "no view process"
        status = _status(views[0].pid)
        assert status["Uid"].split() == [str(uid)] * 4 and status["Gid"].split() == [str(gid)] * 4
        assert int(status["CapEff"], 16) & (1 << CAP_SYS_ADMIN)
        assert agent.stop() == 0
        assert not mounts.is_view_mounted(mnt)
        assert_clean_log(agent)
    finally:
        agent.kill()
        mounts.detach(mnt)


@needs_root
def test_file_log_keeps_rotating_after_the_switch(tmp_path: Path) -> None:
    """The file log is opened as root (before the switch) and handed to the user: rotation, which renames and
    creates files in its directory, goes on as that user."""
    uid, gid = _ids()
    logs = tmp_path / "logs"
    agent = make_agent(tmp_path / "agent", storage_proxy={"user": USER, "group": GROUP},
                       logging={"drivers": ["file"], "file": {"path": str(logs), "filename": "sp.log",
                                                              "rotation-size": "1k", "backup-count": 3}})
    agent.start()
    try:
        with agent.client() as api:
            for _ in range(40):
                assert api.post("/folder/create", json={"volume": "nowhere", "vfid": "qs1/" + uuid.uuid4().hex}
                                ).status_code == 404
    finally:
        assert agent.stop() == 0, agent.log()
    names = sorted(p.name for p in logs.iterdir())
    assert names == ["sp.log", "sp.log.1", "sp.log.2", "sp.log.3"], names
    assert (logs.stat().st_uid, logs.stat().st_gid) == (uid, gid)  # the directory the agent created
    assert all((logs / n).stat().st_uid == uid for n in names)
    assert "Traceback" not in agent.log() and "Logging error" not in agent.log()
