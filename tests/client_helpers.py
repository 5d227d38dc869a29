"""Helpers for the client-API tests: tokens from the manager API, tus requests, on-disk locations."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import psutil

from tests.support import AgentProcess

TUS = {"Tus-Resumable": "1.0.0", "Content-Type": "application/offset+octet-stream"}
MiB = 1 << 20


def vfolder_path(agent: AgentProcess, vfid: str) -> Path:
    qsid, _, fid = vfid.partition("/")
    h = uuid.UUID(fid).hex
    return agent.volume_root() / qsid / h[0:2] / h[2:4] / h[4:]


def staging_dir(agent: AgentProcess, vfid: str) -> Path:
    return agent.volume_root() / vfid.partition("/")[0] / ".staging"


def staged_file(agent: AgentProcess, token: str) -> Path:
    claims = jwt.decode(token, options={"verify_signature": False})
    return staging_dir(agent, claims["vfid"]) / f"upload-{claims['session']}"


def upload_token(api: httpx.Client, vfid: str, relpath: str, size: int) -> str:
    r = api.post("/folder/file/upload", json={"volume": "local", "vfid": vfid, "relpath": relpath, "size": size})
    assert r.status_code == 200, r.text
    return r.json()["token"]


def download_token(api: httpx.Client, vfid: str, relpath: str, **extra: Any) -> str:
    body = {"volume": "local", "vfid": vfid, "relpath": relpath, **extra}
    r = api.post("/folder/file/download", json=body)
    assert r.status_code == 200, r.text
    return r.json()["token"]


def sign(agent: AgentProcess, claims: dict[str, Any], *, secret: str | None = None, lifetime: float = 3600) -> str:
    """A token signed like the agent signs them (or with another secret), with the given claims."""
    payload = {**claims, "exp": int(time.time() + lifetime)}
    return jwt.encode(payload, secret or agent.jwt_secret, algorithm="HS256")


def claims_of(token: str) -> dict[str, Any]:
    return jwt.decode(token, options={"verify_signature": False})


def patch(cli: httpx.Client, token: str, offset: int, data: Any, **params: str) -> httpx.Response:
    headers = dict(TUS, **{"Upload-Offset": str(offset)})
    return cli.patch("/upload", params={"token": token, **params}, content=data, headers=headers)


def paused_body(first: bytes, rest: bytes, release: threading.Event, wait: float = 30) -> Iterator[bytes]:
    """A PATCH body that sends ``first``, then waits for ``release`` (the PATCH holds its session meanwhile)."""
    yield first
    release.wait(wait)
    yield rest


def head(cli: httpx.Client, token: str, **params: str) -> httpx.Response:
    return cli.head("/upload", params={"token": token, **params}, headers={"Tus-Resumable": "1.0.0"})


def create_vfolder(api: httpx.Client) -> str:
    qsid = f"qs-{uuid.uuid4().hex[:8]}"
    r = api.post("/quota-scope", json={"volume": "local", "qsid": qsid})
    assert r.status_code == 204, r.text
    vfid = f"{qsid}/{uuid.uuid4().hex}"
    r = api.post("/folder/create", json={"volume": "local", "vfid": vfid})
    assert r.status_code == 204, r.text
    return vfid


class RssSampler:
    """Samples a process's resident set size in a background thread; ``peak`` and ``baseline`` in bytes."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self.proc = psutil.Process(pid)
        self.interval = interval
        self.baseline = self.proc.memory_info().rss
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss)
            except psutil.NoSuchProcess:
                return
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def growth(self) -> int:
        return self.peak - self.baseline
