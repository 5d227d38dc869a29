"""Volumes other nodes write to: detected by filesystem type, rescanned on a schedule, labelled ``scan``.

The "other node" is played by writes that bypass the mount the agent serves: through the NFS export's
local directory (a real kernel NFS server over loopback), or through the directory a FUSE passthrough
(bindfs) mounts. No local inotify/fanotify event sees either, exactly as for a write on another machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from xml.etree import ElementTree

import pytest

from agent.engine.usage.scanner import scan
from backends import fstype, ioprio
from tests import guest
from tests.support import ROOT, assert_clean_log, eventually, make_agent, walk

RESCAN = 2.0  # seconds: the volume's usage-rescan-interval in these tests
SLOW = 300.0  # seconds: a generous deadline for a start or a first answer (an emulated guest is that slow)


def test_local_filesystems_are_not_remote(tmp_path: Path) -> None:
    fs = fstype.detect(tmp_path)
    assert not fs.remote and fs.name in {"ext4", "xfs", "btrfs", "tmpfs", "overlay"}, fs
    assert fstype.identify(0x6969) == fstype.FsType(0x6969, "nfs", True)  # the NFS magic (linux/magic.h)
    assert fstype.identify(0x65735546).remote  # FUSE clients (Weka, ...)
    with pytest.raises(FileNotFoundError):
        fstype.detect(tmp_path / "missing")


def test_scan_readers_run_in_the_idle_io_class(tmp_path: Path) -> None:
    """A rescan's directory readers are in the idle I/O class; the caller's thread is left alone."""
    for d in range(20):
        (tmp_path / f"d{d}").mkdir()
        (tmp_path / f"d{d}" / "f").write_bytes(b"x")
    seen: dict[str, set[int | None]] = {"idle": set(), "normal": set()}
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for label, idle in (("idle", True), ("normal", False)):
            def on_open(rel: str, dfd: int, label: str = label) -> None:
                seen[label].add(ioprio.thread_class())

            dirs = scan(fd, "", threads=4, on_open=on_open, idle=idle)
            assert len(dirs) == 21
    finally:
        os.close(fd)
    assert seen["idle"] == {ioprio.IOPRIO_CLASS_IDLE}, seen
    assert ioprio.IOPRIO_CLASS_IDLE not in seen["normal"], seen
    assert ioprio.thread_class() != ioprio.IOPRIO_CLASS_IDLE  # the calling thread is unchanged


# -- the scenario, on any mount with a way around it ------------------------------------------------


def _volume_on(mount: Path, backing: Path) -> None:
    (backing / "version.txt").write_text("3\n")
    assert (mount / "version.txt").read_text() == "3\n"


def _remote_writes_are_rescanned(tmp_path: Path, mount: Path, backing: Path, fs_name: str) -> None:
    """The agent serves a vfs volume on ``mount``; files written through ``backing`` (another node) show up
    within the rescan interval, labelled ``source: scan`` with the time of the walk that saw them."""
    _volume_on(mount, backing)
    proc = make_agent(
        tmp_path / "agent",
        volumes={"remote": {"backend": "vfs", "path": str(mount)}},
        usage={"remote-rescan-interval": f"{RESCAN}s"},  # the default for such volumes (no per-volume option)
    ).start(timeout=SLOW)
    try:
        with proc.client() as api:
            qsid = f"qs-{uuid.uuid4().hex[:8]}"
            assert api.post("/quota-scope", json={"volume": "remote", "qsid": qsid}).status_code == 204
            vfid = f"{qsid}/{uuid.uuid4().hex}"
            r = api.post("/folder/create", json={"volume": "remote", "vfid": vfid})
            assert r.status_code == 204, r.text
            rel = Path(qsid) / vfid[len(qsid) + 1:][:2] / vfid[len(qsid) + 3:][:2] / vfid[len(qsid) + 5:]
            body = {"volume": "remote", "vfid": vfid}

            def answer() -> dict:
                r = api.request("GET", "/folder/usage", json=body)
                assert r.status_code == 200, r.text
                return r.json()

            def measured() -> dict:
                u = answer()
                assert u["file_count"] == 0, u
                return u

            assert eventually(measured, timeout=SLOW)["source"] == "scan"
            # the other node writes
            other = backing / rel
            (other / "ckpt").mkdir()
            for i in range(30):
                (other / "ckpt" / f"shard{i}").write_bytes(os.urandom(1000 + i))
            written = time.time()
            count, size, _ = walk(mount / rel)

            def reflects() -> dict:
                u = answer()
                assert (u["file_count"], u["used_bytes"]) == (count, size), u
                return u

            u = eventually(reflects, timeout=RESCAN * 10 + SLOW)
            assert u["source"] == "scan" and u["stale"] is False, u
            assert u["measured_at"] >= written - 0.5, (u, written)
            # never "watch" on such a volume, whatever happens
            assert answer()["source"] == "scan"
            metrics = api.get("/metrics").text
            assert f'storage_agent_usage_volume_mode{{fstype="{fs_name}",mode="scan",volume="remote"}} 1.0' in metrics
        status = subprocess.run(
            [os.sys.executable, "-m", "agent", "status", "--json", "--config", str(proc.config_path)],
            capture_output=True, text=True, timeout=SLOW, cwd=proc.workdir,
        )
        vol = json.loads(status.stdout)["volumes"][0]
        assert vol["usage"]["mode"] == "scan" and vol["usage"]["fstype"] == fs_name, vol
        assert vol["usage"]["rescan_interval_s"] == RESCAN
    finally:
        proc.stop()
    assert f"volume remote ({fs_name}) kept by scan: {fs_name} is written by other nodes too" in proc.log()
    assert_clean_log(proc)


# -- FUSE (bindfs): runs on any machine with /dev/fuse -----------------------------------------------


def _fuse_unavailable() -> str | None:
    if shutil.which("bindfs") is None:
        return "bindfs is not installed (packaging/dev-deps.sh --test installs it)"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    return None


@contextlib.contextmanager
def _bindfs(backing: Path, mount: Path) -> Iterator[None]:
    backing.mkdir(parents=True)
    mount.mkdir(parents=True)
    subprocess.run(["bindfs", "--no-allow-other", str(backing), str(mount)], check=True, timeout=30)
    try:
        yield
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(mount)], check=False, timeout=30)


@pytest.mark.skipif(_fuse_unavailable() is not None, reason=str(_fuse_unavailable()))
def test_a_fuse_volume_written_around_the_mount_is_rescanned(tmp_path: Path) -> None:
    backing, mount = tmp_path / "backing", tmp_path / "mnt"
    with _bindfs(backing, mount):
        assert fstype.detect(mount) == fstype.FsType(0x65735546, "fuse", True)
        _remote_writes_are_rescanned(tmp_path, mount, backing, "fuse")


# -- NFS: a kernel NFS server exporting a local directory over loopback -----------------------------


def _nfs_unavailable() -> str | None:
    filesystems = Path("/proc/filesystems").read_text().split()
    if "nfsd" not in filesystems or "nfs4" not in filesystems and "nfs" not in filesystems:
        for module in ("nfsd", "nfsv4"):
            if shutil.which("modprobe"):
                subprocess.run(["modprobe", "-q", module], check=False, capture_output=True, timeout=30)
        filesystems = Path("/proc/filesystems").read_text().split()
    missing = [fs for fs in ("nfsd", "nfs4") if fs not in filesystems]
    if missing:
        return (f"kernel {os.uname().release} has no {' and no '.join(missing)} filesystem "
                "(built without CONFIG_NFSD / CONFIG_NFS_V4, and no module could be loaded)")
    for tool in ("exportfs", "rpc.nfsd", "rpc.mountd"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (nfs-kernel-server; packaging/dev-deps.sh --test installs it)"
    if os.geteuid() != 0:
        return "exporting and mounting NFS needs root"
    return None


def _run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, timeout=60, capture_output=True)


def _port_open(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@contextlib.contextmanager
def _nfs_server(export: Path, mount: Path) -> Iterator[None]:
    """Start the kernel NFS server (v4 only), export ``export`` to 127.0.0.1 and mount it on ``mount``;
    undo all of it on the way out, failures included (CI starts with nothing running)."""
    export.mkdir(parents=True)
    mount.mkdir(parents=True)
    undo: list[list[str]] = []
    daemons: list[subprocess.Popen] = []
    try:
        if not os.path.ismount("/proc/fs/nfsd"):
            _run("mount", "-t", "nfsd", "nfsd", "/proc/fs/nfsd")
            undo.append(["umount", "/proc/fs/nfsd"])
        for knob in ("nfsv4gracetime", "nfsv4leasetime"):  # a fresh server refuses renames for its grace time
            with contextlib.suppress(OSError):
                Path("/proc/fs/nfsd", knob).write_text("10\n")
        if shutil.which("rpcbind") and not _port_open(111):
            daemons.append(subprocess.Popen(["rpcbind", "-f", "-w"], stdout=subprocess.DEVNULL,
                                            stderr=subprocess.DEVNULL))
            time.sleep(0.5)
        fsid = str(uuid.uuid4())
        _run("exportfs", "-o", f"rw,no_root_squash,insecure,no_subtree_check,fsid={fsid}", f"127.0.0.1:{export}")
        undo.append(["exportfs", "-u", f"127.0.0.1:{export}"])
        daemons.append(subprocess.Popen(["rpc.mountd", "-F", "-N", "2", "-N", "3"], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL))
        # v4 only; "-N 2" on a kernel without NFSv2 (Debian's 6.1: "2: Unsupported version") fails rpc.nfsd
        offered = Path("/proc/fs/nfsd/versions").read_text().split()
        _run("rpc.nfsd", *(a for v in ("2", "3") if f"+{v}" in offered for a in ("-N", v)), "4")
        undo.append(["rpc.nfsd", "0"])
        _run("mount", "-t", "nfs4", "-o", "vers=4.2,actimeo=0,lookupcache=none", f"127.0.0.1:{export}", str(mount))
        undo.append(["umount", "-f", "-l", str(mount)])
        yield
    finally:
        for cmd in reversed(undo):
            subprocess.run(cmd, check=False, timeout=60, capture_output=True)
        for daemon in reversed(daemons):
            daemon.terminate()
            try:
                daemon.wait(10)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()


@pytest.mark.skipif(_nfs_unavailable() is not None, reason=str(_nfs_unavailable()))
def test_an_nfs_volume_written_through_the_export_is_rescanned(tmp_path: Path) -> None:
    export, mount = tmp_path / "export", tmp_path / "mnt"
    with _nfs_server(export, mount):
        assert fstype.detect(mount).name == "nfs"
        _remote_writes_are_rescanned(tmp_path, mount, export, "nfs")


# -- NFS under Debian's kernel, in a guest, when this kernel has no NFS server (see tests/guest.py) ------

NFS_TEST = "tests/test_usage_remote.py::test_an_nfs_volume_written_through_the_export_is_rescanned"
GUEST_TIMEOUT = 900.0  # seconds for the whole guest run: 5½ minutes under TCG on 2 busy cores (~40x slower)


def _guest_unavailable() -> str | None:
    if _nfs_unavailable() is None:
        return "this kernel runs the NFS test itself"
    why = guest.unavailable()
    if why is None and not guest.kvm_usable() and not os.environ.get("STORAGE_AGENT_GUEST_TCG"):
        why = ("no hardware-assisted KVM here (no vmx/svm, or /dev/kvm refuses a VM: PVM's kvm_pvm runs only "
               "PVM-built kernels); emulated (TCG) the guest run takes about 5½ minutes: "
               "STORAGE_AGENT_GUEST_TCG=1 runs it anyway")
    return why and f"{_nfs_unavailable()}, and no guest kernel can run it: {why}"


_GUEST_UNAVAILABLE = _guest_unavailable()  # probed once, at collection


@pytest.mark.timeout(GUEST_TIMEOUT + 120)
@pytest.mark.skipif(_GUEST_UNAVAILABLE is not None, reason=str(_GUEST_UNAVAILABLE))
def test_the_nfs_test_passes_under_a_guest_kernel(tmp_path: Path) -> None:
    """The NFS test, run by pytest inside a QEMU guest booted with Debian's kernel (nfsd, nfsv4), on this
    checkout and venv; it must pass there, not skip. The guest's own run never boots another guest."""
    # compiled here in a second; the emulated guest would otherwise compile every module itself, for minutes
    subprocess.run([sys.executable, "-m", "compileall", "-q", "agent", "backends", "catalog", "tests"],
                   cwd=ROOT, check=True, capture_output=True, timeout=300)
    share = tmp_path / "guest"
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": str(ROOT),
           "HOME": "/root", "LANG": "C.UTF-8"}
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--basetemp", "/tmp/guest-tests",
            f"--junitxml={share / 'junit.xml'}", "--timeout", str(int(GUEST_TIMEOUT)), NFS_TEST]
    result = guest.run(argv, share, cwd=ROOT, env=env, timeout=GUEST_TIMEOUT)
    print(f"guest ({result.accel}): booted in {result.boot_s}s, done in {result.total_s:.1f}s")
    detail = f"\n--- guest pytest ---\n{result.output}\n--- guest console (end) ---\n{result.console[-4000:]}"
    assert result.returncode == 0, f"guest run ended with {result.returncode}{detail}"
    suite = ElementTree.parse(share / "junit.xml").getroot().find("testsuite")
    assert suite is not None, detail
    counts = {k: int(suite.get(k, "0")) for k in ("tests", "failures", "errors", "skipped")}
    assert counts == {"tests": 1, "failures": 0, "errors": 0, "skipped": 0}, f"{counts}{detail}"


def test_the_reader_pool_is_bounded(tmp_path: Path) -> None:
    """Many readers in flight, never more than asked for."""
    for d in range(60):
        (tmp_path / f"d{d}").mkdir()
    active = peak = 0
    lock = threading.Lock()

    def on_open(rel: str, fd: int) -> None:
        nonlocal active, peak
        with lock:
            active += 1
            peak = max(peak, active)
        time.sleep(0.01)  # a network round trip
        with lock:
            active -= 1

    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert len(scan(fd, "", threads=8, on_open=on_open)) == 61
    finally:
        os.close(fd)
    assert 1 < peak <= 8, peak


def test_usage_options_are_checked_with_the_config(tmp_path: Path) -> None:
    from agent.config import ConfigError, load
    from tests.support import to_toml

    agent = make_agent(tmp_path)
    for options, word in (({"usage-rescan-interval": "soon"}, "soon"), ({"usage-remote-writers": "maybe"}, "true")):
        agent.config["volume"]["local"]["options"] = options
        agent.config_path.write_text(to_toml(agent.config))
        with pytest.raises(ConfigError, match=word):
            load(agent.config_path)
    agent.config["volume"]["local"]["options"] = {"usage-rescan-interval": "90s", "usage-remote-writers": True}
    agent.config_path.write_text(to_toml(agent.config))
    cfg = load(agent.config_path)
    from agent.engine.usage.policy import choose
    from backends import BACKENDS

    pol = choose(BACKENDS["vfs"].capabilities, tmp_path, cfg.volume["local"].options, cfg.usage, watcher=True)
    assert (pol.mode, pol.remote, pol.rescan_interval) == ("scan", True, 90.0), pol
    assert pol.reason.startswith("usage-remote-writers = true"), pol
