"""A child of ``serve`` (an engine, an HTTP worker, the FUSE view) stops when the process that started it dies."""

from __future__ import annotations

import ctypes
import logging
import os
import signal

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
PARENT_PID = "STORAGE_AGENT_PARENT_PID"  # set by the spawning process: who the child must die with


def child_env() -> dict[str, str]:
    """The environment of a child that calls :func:`die_with_parent`."""
    return {**os.environ, PARENT_PID: str(os.getpid())}


def die_with_parent() -> None:
    """Get SIGTERM when the parent dies, so no orphan keeps a mount or a port.

    The death signal only covers a parent that dies after it is set; one that died between the fork and
    here has already handed the child to another process, which the parent's pid (from :func:`child_env`)
    tells: then the child stops at once."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    expected = os.environ.get(PARENT_PID, "")
    if expected.isdigit() and os.getppid() != int(expected):
        log.error("the process that started this one (pid %s) has already exited: stopping", expected)
        raise SystemExit(1)
