"""The processes ``serve`` starts under ``num-proc = N``: their command lines, and their side of the start.

Each child is a fresh interpreter (``python -m agent _engine`` / ``_worker``; never a fork of a process
that has threads or an event loop). It gets the effective config as JSON on its standard input (secrets
included: a pipe, never a file or the command line), its listening sockets as inherited descriptors
(``pass_fds``), and a pipe on which it says ``ready`` once it serves. It asks the kernel for SIGTERM when
the supervisor dies (no orphan keeps a port or the catalogue).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import socket
import sys
from typing import Any

from agent import logs
from agent.config import Config, validate
from agent.runtime.parent import die_with_parent
from backends import cpu_placement

log = logging.getLogger(__name__)

ENGINE, WORKER = "_engine", "_worker"


def role_name(role: str, index: int) -> str:
    """How a child names itself in its log records: ``engine`` or ``worker-<i>``."""
    return "engine" if role == ENGINE else f"worker-{index}"


def config_payload(config: Config) -> bytes:
    """The effective config for a child's stdin, secrets and upstream-only volumes included (the child
    validates it again, exactly as ``serve`` did)."""
    data: dict[str, Any] = config.model_dump(mode="json", by_alias=True, exclude_none=True)
    data["storage-proxy"]["secret"] = config.storage_proxy.secret.get_secret_value()
    data["api"]["manager"]["secret"] = config.api.manager.secret.get_secret_value()
    for name, backend in config.unsupported_volumes.items():
        data["volume"][name] = {"backend": backend, "path": "/"}  # left out again by validate, and logged
    return json.dumps(data).encode()


def command(
    role: str, *, ready: int, index: int = 0, fds: dict[str, list[int]] | None = None, beside_workers: bool = False,
    log_fd: int | None = None,
) -> list[str]:
    cmd = [sys.executable, "-m", "agent", role, "--ready-fd", str(ready), "--index", str(index)]
    if log_fd is not None:
        cmd += ["--log-fd", str(log_fd)]
    if beside_workers:
        cmd.append("--beside-workers")
    for name, numbers in (fds or {}).items():
        if numbers:
            cmd += [f"--{name}-fds", ",".join(map(str, numbers))]
    return cmd


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """The hidden sub-commands (not for people: ``serve`` runs them)."""
    for role in (ENGINE, WORKER):
        p = sub.add_parser(role, help=argparse.SUPPRESS)
        p.add_argument("--ready-fd", type=int, required=True)
        p.add_argument("--index", type=int, default=0)
        p.add_argument("--beside-workers", action="store_true")  # an engine restarted while workers serve
        p.add_argument("--log-fd", type=int)  # the file driver's relay to the supervisor (agent/log_relay.py)
        for name in ("manager", "client", "metrics"):
            p.add_argument(f"--{name}-fds", default="")


def _sockets(numbers: str) -> list[socket.socket]:
    out = []
    for fd in filter(None, numbers.split(",")):
        sock = socket.socket(fileno=int(fd))
        sock.setblocking(False)
        out.append(sock)
    return out


def _pin(config: Config, role: str, index: int) -> None:
    """``cpu-pin = "auto"``: the engine on the CPU a single process would take (the highest), the workers
    spread over the others, worker 0 first (each process's own threads kept together on its CPU). A number:
    every process on that CPU. ``"off"``: none."""
    setting = config.storage_proxy.cpu_pin
    cpu = cpu_placement.choose(setting)
    if cpu is None:
        return
    if role == WORKER and setting == "auto":
        cpus = sorted(cpu_placement.allowed(), reverse=True)
        cpu = cpus[(index + 1) % len(cpus)]
    cpu_placement.pin(cpu)


READY, REBUILT = b"ready\n", b"ready rebuilt\n"  # REBUILT: the engine started a new catalogue file


def _say_ready(fd: int, word: bytes = READY) -> None:
    try:
        os.write(fd, word)
    except OSError:
        pass  # a replacement: the supervisor does not wait for it
    finally:
        os.close(fd)


def run(args: argparse.Namespace) -> int:
    die_with_parent()
    config = validate(json.load(sys.stdin), "config from serve")
    logs.configure(config.logging, role=role_name(args.command, args.index), relay_fd=args.log_fd)
    _pin(config, args.command, args.index)
    if args.command == ENGINE:
        asyncio.run(_engine(config, _sockets(args.metrics_fds), args.ready_fd, args.beside_workers))
    else:
        from agent.runtime.server import Sockets

        sockets = Sockets(_sockets(args.manager_fds), _sockets(args.client_fds))
        asyncio.run(_worker(config, args.index, sockets, args.ready_fd))
    return 0


async def _engine(config: Config, metrics: list[socket.socket], ready: int, beside_workers: bool) -> None:
    from agent.runtime.server import start_engine, stop, until_stopped

    agent, runners = await start_engine(config, metrics, reconcile=not beside_workers)
    log.info("engine ready (pid %d)", os.getpid())
    # a new file at the catalogue's path (the old one corrupt or deleted): workers still hold the old one open
    _say_ready(ready, REBUILT if agent.catalog.created else READY)
    try:
        await until_stopped()
    finally:
        log.info("engine stopping")
        await stop(agent, runners)


async def _worker(config: Config, index: int, sockets: Any, ready: int) -> None:
    from agent.runtime.server import start_worker, stop, until_stopped

    agent, runners, _ = await start_worker(config, index, sockets)
    log.debug("HTTP worker %d ready (pid %d)", index, os.getpid())
    _say_ready(ready)
    try:
        await until_stopped()
    finally:
        await stop(agent, runners)
