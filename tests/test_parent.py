"""A child of ``serve`` never outlives the process that started it, even one that died before the child
armed its death signal (agent/runtime/parent.py)."""

from __future__ import annotations

import os
import subprocess
import sys

from agent.runtime.parent import PARENT_PID, child_env

PROBE = "from agent.runtime.parent import die_with_parent; die_with_parent(); print('alive')"


def test_a_child_whose_parent_already_died_stops_at_once() -> None:
    # as if the parent had died between fork and prctl: the child now belongs to another process
    env = {**os.environ, PARENT_PID: str(os.getpid() + 10_000_000)}
    r = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "alive" not in r.stdout
    assert "has already exited: stopping" in r.stderr


def test_a_child_of_a_live_parent_runs() -> None:
    r = subprocess.run([sys.executable, "-c", PROBE], env=child_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "alive", r.stderr
