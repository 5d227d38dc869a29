"""``[logging]`` drivers as upstream names them: ``file`` writes upstream's path/filename and rotates it."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

from tests.support import ROOT, assert_clean_log, make_agent, to_toml


def test_file_driver_writes_json_lines_and_rotates(tmp_path: Path) -> None:
    logs = tmp_path / "logs" / "nested"  # upstream creates the directory
    rotation, backups = 2048, 2
    agent = make_agent(
        tmp_path / "agent",
        logging={
            "level": "INFO",
            "drivers": ["console", "file", "logstash"],
            "file": {"path": str(logs), "filename": "storage-proxy.log", "rotation-size": "2k",
                     "backup-count": backups},
            "logstash": {"endpoint": {"host": "127.0.0.1", "port": 9}, "protocol": "tcp"},
        },
    )
    agent.start()
    try:
        with agent.client() as api:
            for _ in range(60):  # each 4xx is logged at INFO: enough lines to rotate more than `backups` times
                r = api.post("/folder/create", json={"volume": "nowhere", "vfid": f"qs1/{uuid.uuid4().hex}"})
                assert r.status_code == 404
    finally:
        assert agent.stop() == 0
    assert_clean_log(agent)
    files = sorted(p.name for p in logs.iterdir())
    assert files == ["storage-proxy.log", "storage-proxy.log.1", "storage-proxy.log.2"], files
    lines = []
    for name in files:
        data = (logs / name).read_bytes()
        assert 0 < len(data) <= rotation, (name, len(data))
        lines += [json.loads(line) for line in data.decode().splitlines()]
    assert all({"timestamp", "level", "name", "message"} <= set(rec) for rec in lines)
    assert any("unknown volume 'nowhere'" in rec["message"] for rec in lines)
    console = agent.log()
    assert "unknown volume 'nowhere'" in console  # the console driver is served alongside
    # logstash is accepted, with one warning naming it
    assert sum("logstash" in line and "WARNING" in line for line in console.splitlines()) == 1, console


def test_file_driver_without_its_table_is_a_config_error(tmp_path: Path) -> None:
    agent = make_agent(tmp_path / "agent", logging={"drivers": ["file"]})
    agent.config_path.write_text(to_toml(agent.config))
    r = subprocess.run([sys.executable, "-m", "agent", "check-config", "-f", str(agent.config_path)],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 2 and "logging.file" in r.stderr, r.stderr
