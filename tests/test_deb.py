"""The Debian package: built, installed with apt-get, run as its unit says, conformance-tested, purged.

The full cycle takes a few minutes and changes the machine (installs a package,
creates a system user), so it runs only with STORAGE_AGENT_DEB_TEST=1 (.ci/run
sets it). The quick checks of the packaging files below always run.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from agent.config import ConfigError, load
from tests.support import ROOT, free_port

PACKAGING = ROOT / "packaging"
UNIT_SRC = PACKAGING / "debian" / "storage-agent.service"
UNIT = Path("/lib/systemd/system/storage-agent.service")
CONFFILE = Path("/etc/storage-agent/storage-agent.toml")
SECRETS = Path("/etc/storage-agent/secrets.toml")
SUITE = ROOT.parent / "shared" / "conformance"


def unit_settings(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            key, value = line.split("=", 1)
            out.setdefault(key.strip(), []).append(value.strip())
    return out


# -- quick checks of the packaging sources -------------------------------------------


def test_packaged_config_holds_no_secret_and_loads_with_the_generated_secrets(tmp_path: Path) -> None:
    text = (PACKAGING / "storage-agent.toml").read_text()
    assert not re.search(r"^\s*secret\s*=", text, re.M), "the conffile must not carry a secret"
    conf = tmp_path / "storage-agent.toml"
    conf.write_text(text)
    with pytest.raises(ConfigError, match="secrets.toml: no such file"):
        load(conf)
    (tmp_path / "secrets.toml").write_text('[storage-proxy]\nsecret = "jwt"\n\n[api.manager]\nsecret = "mgr"\n')
    config = load(conf)
    assert config.api.manager.secret.get_secret_value() == "mgr"
    assert config.storage_proxy.secret.get_secret_value() == "jwt"
    assert config.api.manager.service_addr.host == "127.0.0.1"  # safe default: loopback only
    assert str(config.catalog.path) == "/var/lib/storage-agent/catalog.db"
    assert config.ignored_keys() == []


def test_unit_is_hardened_and_grants_sys_admin_only_in_the_drop_in() -> None:
    unit = unit_settings(UNIT_SRC.read_text())
    for key, value in {
        "User": "storage-agent", "NoNewPrivileges": "yes", "PrivateTmp": "yes", "ProtectSystem": "full",
        "ProtectHome": "yes", "StateDirectory": "storage-agent", "RuntimeDirectory": "storage-agent",
        "StandardError": "journal",
    }.items():
        assert unit[key] == [value], key
    assert "CAP_SYS_ADMIN" not in " ".join(unit["CapabilityBoundingSet"] + unit["AmbientCapabilities"])
    drop_in = unit_settings((PACKAGING / "sys-admin.conf").read_text())
    assert drop_in["CapabilityBoundingSet"] == ["CAP_SYS_ADMIN"]
    assert drop_in["AmbientCapabilities"] == ["CAP_SYS_ADMIN"]


def test_man_page_source_covers_every_command() -> None:
    out = subprocess.run([sys.executable, str(PACKAGING / "manpage.py")], capture_output=True, text=True,
                         cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), check=True).stdout
    for section in ("[COMMANDS]", "[EXIT STATUS]", "[FILES]"):
        assert section in out
    for command in ("serve", "check-config", "migrate", "status"):
        assert f".SS {command}\n" in out


# -- the full cycle ------------------------------------------------------------------

deb_cycle = pytest.mark.skipif(
    os.environ.get("STORAGE_AGENT_DEB_TEST") != "1",
    reason="slow and installs a system package: set STORAGE_AGENT_DEB_TEST=1 (.ci/run does)",
)


def sh(*argv: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    result = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{shlex.join(argv)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


def installed() -> bool:
    r = sh("dpkg-query", "-W", "-f=${Status}", "storage-agent", check=False)
    return "install ok installed" in r.stdout or "config-files" in r.stdout


def wait_for(url: str, proc: subprocess.Popen, log: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the agent exited with {proc.returncode}:\n{log.read_text()}"
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"the agent did not answer on {url}:\n{log.read_text()}")


def as_unit_user(unit: dict[str, list[str]], argv: list[str]) -> list[str]:
    """``argv`` with the unit's User=, Group= and capabilities, as systemd would start it (setpriv)."""
    caps = ",".join("+" + c.lower().removeprefix("cap_") for c in " ".join(unit["AmbientCapabilities"]).split())
    bounding = ",".join(["-all"] + [c for c in caps.split(",")])
    return [
        "setpriv", "--reuid", unit["User"][0], "--regid", unit["Group"][0], "--init-groups",
        "--inh-caps", caps, "--ambient-caps", caps, "--bounding-set", bounding, "--no-new-privs", "--", *argv,
    ]


@pytest.fixture
def package() -> Iterator[None]:
    if installed():
        sh("apt-get", "purge", "-y", "-qq", "storage-agent")
    try:
        yield
    finally:
        if installed():
            sh("apt-get", "purge", "-y", "-qq", "storage-agent", check=False)


@deb_cycle
@pytest.mark.timeout(1200)  # a cold build downloads the wheels and installs the build tools first
def test_deb_builds_installs_serves_conformance_and_purges(package: None, tmp_path: Path) -> None:
    sh("make", "deb", timeout=900)
    debs = sorted((ROOT / "dist").glob("storage-agent_*.deb"))
    assert len(debs) == 1, debs
    # As the README tells operators.
    sh("apt-get", "install", "-y", "-qq", f"./{debs[0].relative_to(ROOT)}")

    # What the package put in place.
    assert sh("storage-agent", "--version").stdout.startswith("storage-agent ")
    assert Path("/usr/share/man/man1/storage-agent.1.gz").is_file()
    assert str(CONFFILE) in sh("dpkg-query", "-W", "-f=${Conffiles}", "storage-agent").stdout
    user = pwd.getpwnam("storage-agent")
    st = SECRETS.stat()
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == user.pw_uid
    secrets = tomllib.loads(SECRETS.read_text())
    assert len(secrets["api"]["manager"]["secret"]) >= 32
    sh("dpkg-reconfigure", "storage-agent")
    assert tomllib.loads(SECRETS.read_text()) == secrets, "secrets must be generated once only"
    assert sh("storage-agent", "check-config", "-f", str(CONFFILE)).stdout.count('"***"') == 2

    # The unit as systemd would load it.
    verify = sh("systemd-analyze", "verify", str(UNIT), check=False)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    unit = unit_settings(UNIT.read_text())
    under_systemd = sh("ps", "-p", "1", "-o", "comm=").stdout.strip() == "systemd"

    client_port, manager_port = free_port(), free_port()
    CONFFILE.write_text(
        CONFFILE.read_text().replace("port = 6021", f"port = {client_port}").replace("port = 6022",
                                                                                      f"port = {manager_port}")
    )
    log = tmp_path / "agent.log"
    if under_systemd:
        sh("systemctl", "restart", "storage-agent")
        argv = ["journalctl", "-u", "storage-agent", "-f", "-n", "0", "-o", "cat"]  # follow its log
    else:
        # No systemd as PID 1: run its ExecStart as its user with its capabilities, after creating the
        # two directories systemd would (StateDirectory=, RuntimeDirectory=).
        for d in ("/var/lib/storage-agent", "/run/storage-agent"):
            os.makedirs(d, exist_ok=True)
            shutil.chown(d, user.pw_name, grp.getgrgid(user.pw_gid).gr_name)
        argv = as_unit_user(unit, shlex.split(unit["ExecStart"][0]))
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd="/")
    try:
        manager = f"http://127.0.0.1:{manager_port}"
        wait_for(manager + "/status", proc, log)
        outside = Path(tempfile.mkdtemp(prefix="sa-outside-"))
        env = dict(
            os.environ,
            ACC_MANAGER_URL=manager,
            ACC_CLIENT_URL=f"http://127.0.0.1:{client_port}",
            ACC_SECRET=secrets["api"]["manager"]["secret"],
            ACC_JWT_SECRET=secrets["storage-proxy"]["secret"],
            ACC_VOLUME="local",
            ACC_VOLUME_ROOT="/var/lib/storage-agent/volumes/local",
            ACC_OUTSIDE_BASE=str(outside),
        )
        env.pop("ACC_PEER", None)
        cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", str(SUITE)]
        suite = subprocess.run(cmd, env=env, cwd=SUITE, capture_output=True, text=True, timeout=900)
        shutil.rmtree(outside, ignore_errors=True)
        summary = suite.stdout.strip().splitlines()[-1] if suite.stdout.strip() else ""
        print("conformance against the installed agent:", summary)
        assert suite.returncode == 0, suite.stdout[-6000:] + suite.stderr[-2000:]
        status = sh("storage-agent", "status", check=False)  # the packaged config is the default
        assert status.returncode == 0, status.stdout + status.stderr
    finally:
        if under_systemd:
            sh("systemctl", "stop", "storage-agent", check=False)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert "Traceback" not in text, text
    if not under_systemd:
        assert proc.returncode == 0, text  # a clean stop on SIGTERM

    # Purge: nothing of the package is left but what Debian policy keeps (the system user).
    sh("apt-get", "purge", "-y", "-qq", "storage-agent")
    assert not installed()
    for path in ("/usr/bin/storage-agent", "/usr/lib/storage-agent", "/etc/storage-agent", str(UNIT),
                 "/usr/share/man/man1/storage-agent.1.gz", "/usr/share/doc/storage-agent", "/var/lib/storage-agent",
                 "/run/storage-agent"):
        assert not os.path.lexists(path), f"{path} left after purge"
    pwd.getpwnam("storage-agent")  # kept: files on volumes may still belong to it
