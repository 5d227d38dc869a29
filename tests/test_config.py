"""Configuration: upstream configs load unchanged; every error names its key, with no traceback."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import ConfigError, embedded, load, parse_duration, parse_size

UPSTREAM = """
[etcd]
namespace = "local"
addr = { host = "127.0.0.1", port = 2379 }
user = ""
password = ""

[storage-proxy]
node-id = "i-storage-proxy-01"
num-proc = 4
pid-file = "/run/storage-proxy.pid"
event-loop = "uvloop"
scandir-limit = 1000
max-upload-size = "100g"
secret = "some-secret-private-for-storage-proxy"
session-expire = "1d"

[api.client]
service-addr = { host = "0.0.0.0", port = 6021 }
ssl-enabled = false

[api.manager]
service-addr = { host = "127.0.0.1", port = 6022 }
ssl-enabled = false
secret = "some-secret-shared-with-manager"

[debug]
enabled = false

[logging]
level = "INFO"
drivers = ["console"]

[logging.pkg-ns]
"" = "WARNING"
"ai.backend" = "INFO"

[logging.console]
colored = true
format = "verbose"

[volume.local]
backend = "vfs"
path = "/vfroot/local"

[volume.other]
backend = "vfs"
path = "/vfroot/other"
options = { foo = "bar" }
"""


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True, text=True, timeout=60)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def test_upstream_config_loads_unchanged(tmp_path: Path) -> None:
    config = load(write(tmp_path, UPSTREAM))
    assert config.storage_proxy.secret.get_secret_value() == "some-secret-private-for-storage-proxy"
    assert config.storage_proxy.max_upload_size == 100 * 2**30
    assert config.storage_proxy.session_expire == 86400
    assert config.api.manager.service_addr.port == 6022
    assert set(config.volume) == {"local", "other"}
    assert config.volume["other"].options == {"foo": "bar"}
    assert str(config.catalog.path) == "/var/lib/storage-agent/catalog.db"
    no_effect = config.no_effect_keys()
    assert {"etcd", "storage-proxy.event-loop", "logging.console.colored", "debug.enabled"} <= set(no_effect)
    assert "storage-proxy.num-proc" not in no_effect and config.storage_proxy.num_proc == 4  # honoured
    assert config.logging.drivers == ["console"] and config.logging.console.format == "verbose"
    assert config.logging.pkg_ns == {"": "WARNING", "ai.backend": "INFO"}


def test_check_config_masks_secrets_and_lists_ignored_keys(tmp_path: Path) -> None:
    r = cli("check-config", "-f", str(write(tmp_path, UPSTREAM)))
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert "some-secret" not in r.stdout
    assert data["api"]["manager"]["secret"] == "***"
    assert data["volume"]["local"]["path"] == "/vfroot/local"
    assert "accepted with no effect" in r.stderr and "etcd" in r.stderr and "storage-proxy.event-loop" in r.stderr


@pytest.mark.parametrize(
    "edit,key",
    [
        (lambda t: t.replace('secret = "some-secret-shared-with-manager"', ""), "api.manager.secret"),
        (lambda t: t.replace("port = 6022", 'port = "lots"'), "api.manager.service-addr.port"),
        (lambda t: t.replace('max-upload-size = "100g"', 'max-upload-size = "huge"'), "storage-proxy.max-upload-size"),
        (lambda t: t.replace('session-expire = "1d"', 'session-expire = "soon"'), "storage-proxy.session-expire"),
        (lambda t: t.replace('path = "/vfroot/local"', 'path = "relative/dir"'), "volume.local.path"),
        (lambda t: t.replace('backend = "vfs"\npath = "/vfroot/local"', 'backend = "zfs"\npath = "/v"'),
         "volume.local.backend"),
        (lambda t: t.replace("ssl-enabled = false\nsecret", "ssl-enabled = true\nsecret"), "api.manager.ssl-enabled"),
        (lambda t: t.replace(
            "ssl-enabled = false\nsecret",
            'ssl-enabled = true\nssl-cert = "/nonexistent/cert.pem"\nssl-privkey = "/nonexistent/key.pem"\nsecret',
        ), "api.manager.ssl-cert"),
    ],
    ids=[
        "missing-secret", "bad-port", "bad-size", "bad-duration", "relative-path", "unknown-backend", "ssl-no-cert",
        "ssl-cert-missing",
    ],
)
def test_config_errors_name_the_key(tmp_path: Path, edit, key: str) -> None:  # noqa: ANN001
    path = write(tmp_path, edit(UPSTREAM))
    with pytest.raises(ConfigError) as e:
        load(path)
    assert key in str(e.value)
    for command in ("check-config", "serve"):
        r = cli(command, "--config", str(path))
        assert r.returncode == 2, (command, r.stdout, r.stderr)
        assert key in r.stderr and "Traceback" not in r.stderr


def test_invalid_toml_and_missing_file(tmp_path: Path) -> None:
    r = cli("check-config", "-f", str(write(tmp_path, "[storage-proxy\nsecret = 1")))
    assert r.returncode == 2 and "not valid TOML" in r.stderr and "Traceback" not in r.stderr
    r = cli("serve", "-f", str(tmp_path / "nope.toml"))
    assert r.returncode == 2 and "no such file" in r.stderr


def test_sizes_and_durations() -> None:
    assert parse_size("100g") == 100 * 2**30
    assert parse_size("512M") == 512 * 2**20
    assert parse_size("1TiB") == 2**40
    assert parse_size(4096) == 4096
    assert parse_duration("1d") == 86400
    assert parse_duration("90m") == 5400
    assert parse_duration(30) == 30
    for bad in ("x", "1y", True):
        with pytest.raises(ValueError):
            parse_duration(bad)


def test_embedded_default_generates_secrets_once(tmp_path: Path) -> None:
    first = embedded(tmp_path / "var")
    secrets_file = tmp_path / "var" / "secrets.json"
    assert stat.S_IMODE(secrets_file.stat().st_mode) == 0o600
    assert (tmp_path / "var" / "volumes" / "local" / "version.txt").read_text().strip() == "3"
    assert first.catalog.path == (tmp_path / "var" / "catalog.db").resolve()
    second = embedded(tmp_path / "var")
    assert second.api.manager.secret.get_secret_value() == first.api.manager.secret.get_secret_value()
    assert second.storage_proxy.secret.get_secret_value() == first.storage_proxy.secret.get_secret_value()
    assert first.api.manager.secret.get_secret_value() != first.storage_proxy.secret.get_secret_value()
