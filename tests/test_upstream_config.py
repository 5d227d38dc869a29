"""An upstream storage-proxy config loads unchanged and means the same (issue 20, item 5).

``tests/data/upstream-storage-proxy-<release>-sample.toml`` are upstream's ``configs/storage-proxy/sample.toml``
byte for byte, as released in 23.03.5 (the contract; the same file up to 23.03.10), 23.03.12 (the last of the
23.03 line: adds a ``kmanila`` volume) and 24.09.0 (adds ``vast``). Volumes of those upstream-only backends are
accepted and not served.
"""

from __future__ import annotations

import difflib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import uuid
from pathlib import Path

import httpx
import pytest

from tests.support import AUTH_HEADER, ROOT, free_port, make_agent

DATA = Path(__file__).parent / "data"
RELEASES = ("23.03.5", "23.03.12", "24.09.0")
UPSTREAM_ONLY = {"kmanila", "vast", "exascaler"}


def _self_signed(cert: Path, key: Path) -> None:
    cert.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )


def _localised(sample: Path, where: Path) -> tuple[str, int, int]:
    """The sample with the minimal substitutions a test needs, and nothing else:
    - the volume paths (/vfroot/..., /mnt/vfroot/..., /gpfs/...) moved under ``where``;
    - the two ports (6021, 6022) replaced by free ones;
    - one table appended: ``[catalog] path`` (the agent's own section; without it the test would write the
      node's /var/lib/storage-agent/catalog.db).
    The relative TLS paths (configs/storage-proxy/ssl/...) stay as they are: like upstream, the agent reads
    them relative to the config file's directory, where the test puts a fresh self-signed pair."""
    text = sample.read_text()
    client, manager = free_port(), free_port()
    out = text
    for prefix in ('"/vfroot/', '"/mnt/vfroot/', '"/gpfs/'):
        out = out.replace(prefix, f'"{where}{prefix[1:]}')
    out = out.replace("port = 6021 }", f"port = {client} }}").replace("port = 6022 }", f"port = {manager} }}")
    changed = [
        line for line in difflib.unified_diff(text.splitlines(), out.splitlines(), lineterm="", n=0)
        if line[:1] in "+-" and line[:3] not in ("+++", "---")
    ]
    assert changed and all(("path = " in line or "port = " in line) for line in changed), changed
    out += "\n# added by the test: the agent's catalogue inside the test directory\n"
    out += f'[catalog]\npath = "{where}/catalog.db"\n'
    return out, client, manager


def _cli(*args: str, cwd: Path | str = "/") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True, text=True, timeout=120,
                          cwd=cwd, env=env)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="the openssl CLI is needed to make the sample's TLS pair")
@pytest.mark.parametrize("release", RELEASES)
def test_upstream_sample_config_loads_unchanged_and_serves(tmp_path: Path, release: str) -> None:
    sample = DATA / f"upstream-storage-proxy-{release}-sample.toml"
    declared = tomllib.loads(sample.read_text())["volume"]
    text, client_port, manager_port = _localised(sample, tmp_path)
    config = tmp_path / "storage-proxy.toml"
    config.write_text(text)
    _self_signed(tmp_path / "configs/storage-proxy/ssl/manager-api-selfsigned.cert.pem",
                 tmp_path / "configs/storage-proxy/ssl/manager-api-selfsigned.key.pem")
    (tmp_path / "vfroot" / "vfs").mkdir(parents=True)  # the vfs volume's (empty) mount point

    r = _cli("check-config", "-f", str(config))  # from /, so relative paths must be anchored to the config
    assert r.returncode == 0, r.stderr
    effective = json.loads(r.stdout)
    assert effective["api"]["manager"]["ssl-cert"] == str(tmp_path / "configs/storage-proxy/ssl/"
                                                           "manager-api-selfsigned.cert.pem")
    assert effective["storage-proxy"]["scandir-limit"] == 1000
    listed = {line.strip("# ").strip() for line in r.stderr.splitlines()}
    assert "storage-proxy.num-proc" not in listed  # honoured: num-proc HTTP workers
    for key in ("etcd", "storage-proxy.event-loop", "logging.console.colored",
                "debug.asyncio", "volume.netapp.options.netapp_xcp_cmd", "volume.netapp.options.netapp_nfs_host"):
        assert key in listed, (key, r.stderr)

    log_path = tmp_path / "agent.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "agent", "serve", "-f", str(config)], stdout=log,
                                stderr=subprocess.STDOUT, cwd="/", env={**os.environ, "PYTHONPATH": str(ROOT)})
    manager = f"https://127.0.0.1:{manager_port}"
    headers = {AUTH_HEADER: "some-secret-shared-with-manager"}
    try:
        with httpx.Client(base_url=manager, headers=headers, verify=False, timeout=10) as api:
            deadline = time.monotonic() + 120  # the appliance volumes' endpoints (*.example.com) are retried
            while True:
                assert proc.poll() is None, log_path.read_text()
                try:
                    if api.get("/status").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.2)
            volumes = {v["name"]: v for v in api.get("/volumes").json()["volumes"]}
            assert set(volumes) == {n for n, v in declared.items() if v["backend"] not in UPSTREAM_ONLY}
            assert volumes["local"]["backend"] == "vfs" and volumes["gpfs"]["backend"] == "gpfs"
            qsid, folder = f"qs{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
            vfid = f"{qsid}/{folder}"
            assert api.post("/quota-scope", json={"volume": "local", "qsid": qsid}).status_code == 204
            assert api.post("/folder/create", json={"volume": "local", "vfid": vfid}).status_code == 204
            assert (tmp_path / "vfroot" / "vfs" / qsid / folder[:2] / folder[2:4] / folder[4:]).is_dir()
            assert httpx.get(f"http://127.0.0.1:{client_port}/openapi.json", timeout=10).status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(60)
    out = log_path.read_text()
    assert rc == 0, out
    assert "Traceback" not in out, out
    assert out.count("config keys accepted with no effect here") == 1, out
    for name, vol in declared.items():
        if vol["backend"] in UPSTREAM_ONLY:
            assert f"volume {name} is NOT served: backend {vol['backend']!r} is not supported" in out


def test_scandir_limit_zero_means_no_limit(tmp_path: Path) -> None:
    """Upstream: ``scandir-limit = 0`` lists every entry (the agent refused to start with exit 2)."""
    agent = make_agent(tmp_path / "agent", storage_proxy={"scandir-limit": 0}).start()
    try:
        with agent.client() as api:
            qsid, folder = f"qs{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
            assert api.post("/quota-scope", json={"volume": "local", "qsid": qsid}).status_code == 204
            vfid = f"{qsid}/{folder}"
            assert api.post("/folder/create", json={"volume": "local", "vfid": vfid}).status_code == 204
            where = agent.volume_root() / qsid / folder[:2] / folder[2:4] / folder[4:]
            count = 1000 + int.from_bytes(os.urandom(1)) + 1  # more than the default limit
            print(f"entries: {count}")
            for i in range(count):
                (where / f"f{i}").touch()
            r = api.post("/folder/file/list", json={"volume": "local", "vfid": vfid, "relpath": "."})
            assert r.status_code == 200, r.text
            assert len(r.json()["items"]) == count
    finally:
        agent.stop()


@pytest.mark.parametrize(
    "user,group,expected",
    [
        ("nobody", "nogroup", ("nobody", "nogroup")),
        (65534, "65534", ("nobody", "nogroup")),
        ("nobody", "nobody", ("nobody", "nobody's primary group")),  # upstream looks a group name up as a user
        ("", -1, (None, None)),  # upstream: empty or -1 = not set
    ],
)
def test_user_and_group_resolve_as_upstream(tmp_path: Path, user: object, group: object, expected: tuple) -> None:
    import grp
    import pwd

    from agent.config import load
    from tests.support import to_toml

    try:
        nobody = pwd.getpwnam("nobody")
        grp.getgrnam("nogroup")
    except KeyError:
        pytest.skip("no nobody/nogroup on this system")
    agent = make_agent(tmp_path / "agent", storage_proxy={"user": user, "group": group})
    agent.config_path.write_text(to_toml(agent.config))
    config = load(agent.config_path)
    want_user = None if expected[0] is None else nobody.pw_uid
    group_names = {g.gr_name: g.gr_gid for g in grp.getgrall()}
    want_group = {None: None, "nogroup": group_names["nogroup"],
                  "nobody's primary group": group_names.get("nobody", nobody.pw_gid)}[expected[1]]
    assert (config.storage_proxy.user, config.storage_proxy.group) == (want_user, want_group)


def test_unknown_user_is_a_config_error_naming_the_key(tmp_path: Path) -> None:
    from tests.support import to_toml

    agent = make_agent(tmp_path / "agent", storage_proxy={"user": f"no-such-{uuid.uuid4().hex[:6]}"})
    agent.config_path.write_text(to_toml(agent.config))
    r = _cli("check-config", "-f", str(agent.config_path))
    assert r.returncode == 2 and "storage-proxy.user" in r.stderr and "no such user" in r.stderr, r.stderr


def test_blank_host_listens_on_every_interface(tmp_path: Path) -> None:
    """Upstream allows ``service-addr.host = ""``: every interface (loopback included)."""
    agent = make_agent(tmp_path / "agent")
    agent.config["api"]["client"]["service-addr"]["host"] = ""
    agent.start()
    try:
        assert httpx.get(f"{agent.client_url}/openapi.json", timeout=10).status_code == 200
    finally:
        assert agent.stop() == 0
