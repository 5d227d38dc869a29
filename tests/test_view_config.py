"""The `[view]` section, the `view` sub-command's config errors, and the mount-table helpers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from agent.config import ConfigError, validate
from agent.view import mounts
from tests.support import ROOT, make_agent, to_toml


def _config(tmp_path: Path, **view: Any) -> dict[str, Any]:
    agent = make_agent(tmp_path / "agent", view=view) if view else make_agent(tmp_path / "agent")
    return agent.config


def test_view_defaults_and_values(tmp_path: Path) -> None:
    config = validate(_config(tmp_path), "test")
    assert config.view.enabled is False and config.view.scopes == "*"
    assert config.view.mount_root == Path("/mnt/storage-agent")
    config = validate(_config(tmp_path, enabled=True, **{"mount-root": "/srv/view"}, scopes=["qs-a", "b_c"]), "t")
    assert config.view.enabled and config.view.mount_root == Path("/srv/view")
    assert config.view.shows("qs-a") and not config.view.shows("qs-z")


@pytest.mark.parametrize(
    ("view", "message"),
    [
        ({"mount-root": "relative/dir"}, "view.mount-root: must be an absolute path"),
        ({"scopes": "all"}, "view.scopes"),
        ({"scopes": ["bad qsid"]}, "view.scopes"),
        ({"enabled": "maybe"}, "view.enabled"),
    ],
)
def test_view_errors_name_the_key(tmp_path: Path, view: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        validate(_config(tmp_path, **view), "agent.toml")
    assert message in str(info.value)


def test_mount_root_may_not_overlap_a_volume(tmp_path: Path) -> None:
    data = _config(tmp_path, enabled=True)
    data["view"]["mount-root"] = str(Path(data["volume"]["local"]["path"]) / "view")
    with pytest.raises(ConfigError, match="overlaps volume.local.path"):
        validate(data, "agent.toml")
    data["view"]["enabled"] = False  # a disabled view never mounts: no reason to refuse the config
    validate(data, "agent.toml")


def test_view_command_reports_config_errors(tmp_path: Path) -> None:
    data = _config(tmp_path, **{"mount-root": "not/absolute"})
    path = tmp_path / "agent.toml"
    path.write_text(to_toml(data))
    r = subprocess.run(
        [sys.executable, "-m", "agent", "view", "--config", str(path)], capture_output=True, text=True, cwd=ROOT,
        timeout=60,
    )
    assert r.returncode == 2, r.stderr
    assert "view.mount-root: must be an absolute path" in r.stderr and "Traceback" not in r.stderr


def test_mountinfo_paths_are_unescaped(tmp_path: Path) -> None:
    assert mounts._unescape(r"/mnt/with\040space\011tab\134slash") == "/mnt/with space\ttab\\slash"
    assert mounts.fuse_mounts_at(tmp_path) == []  # nothing mounted there
    assert mounts.detach(tmp_path) is False  # and nothing to detach
