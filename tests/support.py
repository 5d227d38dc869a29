"""Start a real ``storage-agent serve`` process on free loopback ports, for tests and the conformance run."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.engine.usage.watchers import fanotify_unavailable

ROOT = Path(__file__).resolve().parent.parent
AUTH_HEADER = "X-BackendAI-Storage-Auth-Token"


WORKER_HEADER = "X-Storage-Agent-Worker"  # names the HTTP worker that answered (num-proc > 1)


def children(pid: int) -> list[int]:
    out: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        text = Path(f"/proc/{pid}/task/{task}/children").read_text()
        out += [int(p) for p in text.split()]
    return out


def cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")


def roles(agent: AgentProcess) -> dict[str, list[int]]:
    """The supervisor's children by role: ``engine`` and ``worker <i>``."""
    assert agent.proc is not None
    out: dict[str, list[int]] = {}
    for pid in children(agent.proc.pid):
        try:
            args = cmdline(pid)
        except (FileNotFoundError, ProcessLookupError):  # gone, or a zombie being reaped (ESRCH on read)
            continue
        if "_engine" in args:
            out.setdefault("engine", []).append(pid)
        elif "_worker" in args:
            out.setdefault(f"worker {args[args.index('--index') + 1]}", []).append(pid)
    return out


def worker_pids(agent: AgentProcess) -> list[int]:
    """The pids of a num-proc agent's HTTP workers."""
    return sorted(pid for role, pids in roles(agent).items() if role.startswith("worker") for pid in pids)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def to_toml(data: dict[str, Any]) -> str:
    """Enough TOML for agent configs: tables of scalars and inline tables."""
    lines: list[str] = []

    def table(prefix: str, body: dict[str, Any]) -> None:
        scalars = {k: v for k, v in body.items() if not (isinstance(v, dict) and v and _is_table(v))}
        tables = {k: v for k, v in body.items() if k not in scalars}
        if prefix and scalars:
            lines.append(f"[{prefix}]")
        for k, v in scalars.items():
            lines.append(f"{k} = {_toml_value(v)}")
        if scalars:
            lines.append("")
        for k, v in tables.items():
            table(f"{prefix}.{k}" if prefix else k, v)

    table("", data)
    return "\n".join(lines) + "\n"


def _is_table(v: dict[str, Any]) -> bool:
    return any(isinstance(x, dict) for x in v.values()) or "backend" in v or "service-addr" in v


@dataclass
class AgentProcess:
    """A running agent; ``stop`` / ``kill`` / ``start`` act on the real process."""

    workdir: Path
    config: dict[str, Any]
    proc: subprocess.Popen | None = None
    wrapper: list[str] = field(default_factory=list)  # a command the agent runs under (e.g. setpriv ...)
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_path = self.workdir / "agent.log"

    @property
    def manager_url(self) -> str:
        return f"http://127.0.0.1:{self.config['api']['manager']['service-addr']['port']}"

    @property
    def client_url(self) -> str:
        return f"http://127.0.0.1:{self.config['api']['client']['service-addr']['port']}"

    @property
    def secret(self) -> str:
        return self.config["api"]["manager"]["secret"]

    @property
    def jwt_secret(self) -> str:
        return self.config["storage-proxy"]["secret"]

    @property
    def config_path(self) -> Path:
        return self.workdir / "agent.toml"

    def volume_root(self, name: str = "local") -> Path:
        return Path(self.config["volume"][name]["path"])

    def start(self, timeout: float = 30.0) -> AgentProcess:
        self.config_path.write_text(to_toml(self.config))
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [*self.wrapper, sys.executable, "-m", "agent", "serve", "--config", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
            )
        deadline = time.monotonic() + timeout
        # num-proc > 1: one worker's answer is not all of them ready (a test that breaks something at once would
        # break a worker's start): each must have answered, on connections of their own (the kernel spreads them)
        workers = int(self.config.get("storage-proxy", {}).get("num-proc", 1))
        answered: set[str | None] = set()
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent exited with {self.proc.returncode}:\n{self.log()}")
            try:
                r = httpx.get(self.manager_url + "/status", timeout=1)
                if r.status_code == 200:
                    answered.add(r.headers.get(WORKER_HEADER))
                if r.status_code == 200 and (workers <= 1 or len(answered - {None}) >= workers):
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"agent did not answer within {timeout} s:\n{self.log()}")

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.manager_url, headers={AUTH_HEADER: self.secret}, timeout=60)


def make_agent(workdir: Path, *, volumes: dict[str, dict[str, Any]] | None = None, **sections: Any) -> AgentProcess:
    """An agent config with a fresh vfs volume ``local`` (layout 3) under ``workdir``, on free ports."""
    workdir.mkdir(parents=True, exist_ok=True)
    if volumes is None:
        root = workdir / "volume"
        root.mkdir(exist_ok=True)
        (root / "version.txt").write_text("3\n")
        volumes = {"local": {"backend": "vfs", "path": str(root)}}
    config: dict[str, Any] = {
        "storage-proxy": {"node-id": "test-node", "secret": secrets.token_hex(16), "session-expire": "1d"},
        "api": {
            "client": {"service-addr": {"host": "127.0.0.1", "port": free_port()}},
            "manager": {"service-addr": {"host": "127.0.0.1", "port": free_port()}, "secret": secrets.token_hex(16)},
        },
        "volume": volumes,
        "catalog": {"path": str(workdir / "catalog.db")},
    }
    for key, value in sections.items():
        config.setdefault(key.replace("_", "-"), {}).update(value)
    return AgentProcess(workdir, config)


@contextmanager
def served_agent(workdir: Path, **sections: Any) -> Iterator[AgentProcess]:
    """A started :func:`make_agent` that is stopped afterwards, its log checked free of server errors."""
    proc = make_agent(workdir, **sections).start()
    try:
        yield proc
    finally:
        proc.stop()
    assert_clean_log(proc)


def new_vfolder(api: httpx.Client, qsid: str) -> str:
    """A new quota scope ``qsid`` with one new vfolder in it, on the volume ``local``; its vfid."""
    assert api.post("/quota-scope", json={"volume": "local", "qsid": qsid}).status_code == 204
    value = f"{qsid}/{uuid.uuid4().hex}"
    assert api.post("/folder/create", json={"volume": "local", "vfid": value}).status_code == 204
    return value


def filled_vfolder(agent: AgentProcess, api: httpx.Client, dirs: int, files: int) -> tuple[str, Path]:
    """A new vfolder (scope ``qs``) of ``dirs`` x ``files`` small files, long to copy or to remove: its vfid
    and its root on disk."""
    vfid = new_vfolder(api, "qs")
    qsid, folder = vfid.split("/")
    root = agent.volume_root() / qsid / folder[:2] / folder[2:4] / folder[4:]
    for d in range(dirs):
        (root / f"d{d:03}").mkdir()
        for f in range(files):
            (root / f"d{d:03}" / f"f{f}").write_bytes(b"x" * (f % 7))
    return vfid, root


# the usage engine's watchers, fanotify skipped where the kernel or the capabilities lack it
WATCHERS = [
    "inotify",
    pytest.param(
        "fanotify",
        marks=pytest.mark.skipif(
            fanotify_unavailable(["/tmp"]) is not None, reason=f"fanotify: {fanotify_unavailable(['/tmp'])}"
        ),
    ),
]


def assert_clean_log(agent: AgentProcess) -> None:
    text = agent.log()
    assert "Traceback" not in text and "unexpected error" not in text, f"agent log shows a server error:\n{text}"


def walk(root: Path | bytes) -> tuple[int, int, int]:
    """(entries, st_size sum, allocated bytes like `du -s -B1`) of a tree, links not followed."""
    count = size = 0
    st = os.lstat(root)
    seen = {(st.st_dev, st.st_ino)}
    alloc = st.st_blocks * 512
    stack = [os.fsencode(root)]
    while stack:
        d = stack.pop()
        with os.scandir(d) as it:
            for e in it:
                st = e.stat(follow_symlinks=False)
                count += 1
                size += st.st_size
                if (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    alloc += st.st_blocks * 512
                if e.is_dir(follow_symlinks=False):
                    stack.append(e.path)
    return count, size, alloc


def eventually(fn: Callable[[], Any], timeout: float = 20.0) -> Any:
    """``fn()``'s value once it stops failing an assertion; its last failure after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return fn()
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


__all__ = ["ROOT", "AgentProcess", "assert_clean_log", "eventually", "free_port", "make_agent", "os", "walk"]
