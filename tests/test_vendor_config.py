"""Vendor volume options: checked by check-config and at start-up, secrets never printed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from backends.vendors import VENDOR_BACKENDS
from backends.vendors.appliance import ApplianceVolume, RestTarget
from backends.vendors.gpfs import GpfsOptions
from tests.support import ROOT, make_agent, to_toml

WEKA = {
    "weka_endpoint": "https://weka01:14000",
    "weka_username": "admin",
    "weka_password": "hunter2-weka",
    "weka_fs_name": "fs1",
}


def _run(tmp_path: Path, command: str, options: dict[str, object]) -> subprocess.CompletedProcess[str]:
    root = tmp_path / "mount"
    root.mkdir(exist_ok=True)
    (root / "version.txt").write_text("3\n")
    agent = make_agent(tmp_path / "agent", volumes={"v": {"backend": "weka", "path": str(root), "options": options}})
    agent.config_path.write_text(to_toml(agent.config))
    return subprocess.run(
        [sys.executable, "-m", "agent", command, "--config", str(agent.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


def test_check_config_masks_appliance_secrets(tmp_path: Path) -> None:
    r = _run(tmp_path, "check-config", WEKA)
    assert r.returncode == 0, r.stderr
    assert "hunter2-weka" not in r.stdout and '"weka_password": "***"' in r.stdout
    assert '"weka_username": "admin"' in r.stdout


def test_missing_option_is_a_config_error(tmp_path: Path) -> None:
    options = {k: v for k, v in WEKA.items() if k != "weka_fs_name"}
    for command in ("check-config", "serve"):
        r = _run(tmp_path, command, options)
        assert r.returncode == 2, (command, r.stdout, r.stderr)
        assert "[volume.v]" in r.stderr and "weka_fs_name" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr and "hunter2-weka" not in r.stderr


def test_every_vendor_builds_its_client_from_its_own_options() -> None:
    """Each vendor names where its REST API is (``RestTarget``); the shared base builds the client from that."""
    for cls in set(VENDOR_BACKENDS.values()):
        opts = {k: "1" if k.endswith("_version") else f"x-{k}" for k, f in cls.Options.model_fields.items()
                if f.is_required() or k.endswith("_version")}
        opts[cls.target.endpoint] = "https://appliance.example:8443/"
        vol = cls("v", Path("/nonexistent"), opts)
        assert vol.client.base_url.startswith("https://appliance.example:8443/"), vol.client.base_url
        assert "{" not in vol.client.base_url and vol.quota is vol.quota
        assert vol.client.ssl is False  # every vendor's verify option defaults to off, as upstream's do


def test_a_target_naming_an_unknown_option_fails_on_import() -> None:
    with pytest.raises(TypeError, match=r"lacks: \['gpfs_user', 'gpfs_api'\]"):

        class Mistyped(ApplianceVolume):
            Options = GpfsOptions
            target = RestTarget("gpfs_endpoint", "/{gpfs_api}", "gpfs_verify_ssl", ("gpfs_user", "gpfs_password"))
