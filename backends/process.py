"""The one subprocess helper: argument lists (never a shell), a timeout, stderr in the error; :func:`spawn`
for a process that lives on (the FUSE view)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from backends import cpu_placement
from backends.errors import ExternalError


@dataclass(frozen=True)
class Completed:
    argv: tuple[str, ...]
    returncode: int
    stdout: bytes
    stderr: bytes

    @property
    def text(self) -> str:
        return self.stdout.decode(errors="replace")


class CommandFailed(ExternalError):
    def __init__(self, argv: Sequence[str], returncode: int | None, stderr: str, what: str) -> None:
        super().__init__(f"{argv[0]} {what}: {stderr.strip() or 'no error output'}")
        self.argv = tuple(argv)
        self.returncode = returncode
        self.stderr = stderr


async def spawn(argv: Sequence[str], **kwargs: Any) -> asyncio.subprocess.Process:
    """Start ``argv`` (no shell) and return at once; ``kwargs`` as for ``asyncio.create_subprocess_exec``.

    Every process the agent starts comes through here: it is given every CPU the agent started with, not
    the one the agent's own threads are pinned to (backends/cpu_placement.py)."""
    with cpu_placement.widened():  # a child inherits the CPUs of the thread that forks it
        return await asyncio.create_subprocess_exec(*argv, **kwargs)


async def run(
    argv: Sequence[str],
    *,
    timeout: float = 60.0,
    input: bytes | None = None,
    check: bool = True,
    env: Mapping[str, str] | None = None,
) -> Completed:
    """Run ``argv`` and wait at most ``timeout`` seconds; kill it past that.

    With ``check`` a non-zero exit raises :class:`CommandFailed` carrying stderr.
    """
    try:
        proc = await spawn(
            argv,
            stdin=asyncio.subprocess.PIPE if input is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, **env} if env is not None else None,
        )
    except OSError as e:
        raise CommandFailed(argv, None, e.strerror or str(e), "could not be started") from e
    try:
        out, err = await asyncio.wait_for(proc.communicate(input), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise CommandFailed(argv, None, f"killed after {timeout:g} s", "timed out") from None
    done = Completed(tuple(argv), proc.returncode or 0, out, err)
    if check and done.returncode != 0:
        raise CommandFailed(argv, done.returncode, err.decode(errors="replace"), f"exited with {done.returncode}")
    return done
