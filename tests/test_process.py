"""The one subprocess helper: argument lists, timeouts, stderr in the error."""

from __future__ import annotations

import asyncio
import sys

import pytest

from backends.process import CommandFailed, run


def test_output_and_input() -> None:
    done = asyncio.run(run([sys.executable, "-c", "import sys; print(sys.stdin.read().upper())"], input=b"abc"))
    assert done.returncode == 0 and done.text.strip() == "ABC"


def test_failure_carries_stderr() -> None:
    with pytest.raises(CommandFailed) as e:
        asyncio.run(run([sys.executable, "-c", "import sys; sys.stderr.write('boom here'); sys.exit(3)"]))
    assert e.value.returncode == 3 and "boom here" in str(e.value)
    done = asyncio.run(run([sys.executable, "-c", "raise SystemExit(4)"], check=False))
    assert done.returncode == 4


def test_timeout_kills_the_command() -> None:
    with pytest.raises(CommandFailed, match="timed out"):
        asyncio.run(run(["sleep", "30"], timeout=0.3))


def test_missing_program_and_no_shell() -> None:
    with pytest.raises(CommandFailed, match="could not be started"):
        asyncio.run(run(["/nonexistent/program"]))
    done = asyncio.run(run(["echo", "$HOME; rm -rf /"]))
    assert done.text == "$HOME; rm -rf /\n"
