"""SIGTERM while a request is in flight: it gets ``[storage-proxy] stop-timeout`` to end, an upload's body included.

Real agents (num-proc 1 and 2), real tus PATCHes whose bodies are still arriving when the signal comes. Before
agent/http/drain.py the agent stopped through aiohttp's own shutdown, which drops every byte a connection
receives once the stop began: the PATCH waited for a body that never came and was cut at stop-timeout.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.client_helpers import TUS, MiB, staged_file, upload_token, vfolder_path
from tests.support import AgentProcess, assert_clean_log, eventually, make_agent, new_vfolder


def _held_body(first: bytes, rest: bytes, release: threading.Event) -> Iterator[bytes]:
    yield first
    release.wait(120)
    if rest:
        yield rest


def _patch_in_thread(
    agent: AgentProcess, token: str, offset: int, body: Iterator[bytes], out: list[object]
) -> threading.Thread:
    def send() -> None:
        try:
            with httpx.Client(base_url=agent.client_url, timeout=120) as cli:
                out.append(cli.patch("/upload", params={"token": token}, content=body,
                                     headers=dict(TUS, **{"Upload-Offset": str(offset)})))
        except httpx.HTTPError as e:
            out.append(e)

    thread = threading.Thread(target=send)
    thread.start()
    return thread


def _idle_keepalive(agent: AgentProcess) -> socket.socket:
    """A client connection that carried one request and stays open (HTTP/1.1 keep-alive)."""
    host, port = agent.client_url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall(b"GET /no-such-route HTTP/1.1\r\nHost: agent\r\n\r\n")
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(65536)
    assert b" 404 " in head.split(b"\r\n", 1)[0], head
    return sock


def _closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    """True once the agent closed the connection (what is still to read, the 404's body, is skipped)."""
    sock.settimeout(1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if sock.recv(65536) == b"":
                return True
        except TimeoutError:
            continue
        except ConnectionResetError:
            return True
    return False


@pytest.mark.parametrize("num_proc", [1, 2])
@pytest.mark.parametrize("size", [1 * MiB, 3 * MiB], ids=["parsed-body", "spliced-body"])
def test_an_upload_in_flight_at_sigterm_completes_and_idle_connections_close(
    tmp_path: Path, num_proc: int, size: int
) -> None:
    """The PATCH (its body paused for 5 s across the SIGTERM) answers 204 and the file is byte-identical; an
    idle kept-alive connection is closed at once; with one process new connections are refused; ``serve``
    exits 0. 3 MiB takes the spliced body path (agent/http/socket_body.py), 1 MiB aiohttp's parser."""
    agent = make_agent(tmp_path, storage_proxy={"num-proc": num_proc, "stop-timeout": 60}).start(timeout=120)
    try:
        with agent.client() as api:
            vfid = new_vfolder(api, "qs" + uuid.uuid4().hex[:8])
            data = os.urandom(size)
            token = upload_token(api, vfid, "late.bin", size)
        idle = _idle_keepalive(agent)
        release = threading.Event()
        out: list[object] = []
        thread = _patch_in_thread(agent, token, 0, _held_body(data[:1000], data[1000:], release), out)
        try:
            eventually(lambda: _assert(staged_file(agent, token).exists()), timeout=60)  # the PATCH holds it
            time.sleep(0.5)
            assert agent.proc is not None
            agent.proc.send_signal(signal.SIGTERM)
            assert _closed_by_peer(idle, 30), "the idle kept-alive connection was not closed by the stop"
            if num_proc == 1:  # the listening socket is closed (under num-proc the supervisor holds its copy)
                def refused() -> None:
                    try:
                        socket.create_connection(("127.0.0.1", int(agent.client_url.rsplit(":", 1)[1])), 2).close()
                    except ConnectionRefusedError:
                        return
                    raise AssertionError("a new connection was accepted after SIGTERM")
                eventually(refused, timeout=30)
            time.sleep(5)  # the body still waits; the stop must wait for it
            assert agent.proc.poll() is None
        finally:
            release.set()
            thread.join(120)
            idle.close()
        assert out and isinstance(out[0], httpx.Response), out
        r = out[0]
        assert r.status_code == 204, (r.status_code, r.text)
        assert r.headers["Upload-Offset"] == str(size)
        assert r.headers.get("Connection", "").lower() == "close"  # no further request on it
        assert agent.proc.wait(120) == 0
        assert (vfolder_path(agent, vfid) / "late.bin").read_bytes() == data
    finally:
        agent.stop()
    assert "did not stop within" not in agent.log(), agent.log()
    assert_clean_log(agent)


@pytest.mark.parametrize("num_proc", [1, 2])
@pytest.mark.parametrize("size", [1 * MiB, 3 * MiB], ids=["parsed-body", "spliced-body"])
def test_an_upload_past_stop_timeout_is_cancelled_and_resumes_where_its_record_says(
    tmp_path: Path, num_proc: int, size: int
) -> None:
    """A PATCH whose body stalls past stop-timeout is cancelled (the stop stays bounded, ``serve`` exits 0);
    after a restart HEAD reports exactly the bytes in the staged file, and a PATCH from there finishes a
    byte-identical file."""
    agent = make_agent(tmp_path, storage_proxy={"num-proc": num_proc, "stop-timeout": 3}).start(timeout=120)
    release = threading.Event()
    try:
        with agent.client() as api:
            vfid = new_vfolder(api, "qs" + uuid.uuid4().hex[:8])
            data = os.urandom(size)
            token = upload_token(api, vfid, "cut.bin", size)
        out: list[object] = []
        sent = size // 2
        thread = _patch_in_thread(agent, token, 0, _held_body(data[:sent], b"", release), out)
        eventually(lambda: _assert(staged_file(agent, token).exists()), timeout=60)
        time.sleep(1)
        assert agent.proc is not None
        agent.proc.send_signal(signal.SIGTERM)
        assert agent.proc.wait(60) == 0  # stop-timeout 3 s + the cancelled handler's grace, never the kill
        release.set()
        thread.join(60)
        assert out and (isinstance(out[0], httpx.HTTPError) or out[0].status_code != 204), out  # type: ignore[union-attr]
        agent.start(timeout=120)
        with httpx.Client(base_url=agent.client_url, timeout=60) as cli:
            head = cli.head("/upload", params={"token": token}, headers=TUS)
            assert head.status_code == 200, head.text
            offset = int(head.headers["Upload-Offset"])
            assert 0 <= offset <= sent
            assert staged_file(agent, token).stat().st_size == offset
            assert staged_file(agent, token).read_bytes() == data[:offset]
            r = cli.patch("/upload", params={"token": token}, content=data[offset:],
                          headers=dict(TUS, **{"Upload-Offset": str(offset)}))
            assert r.status_code == 204, r.text
        assert (vfolder_path(agent, vfid) / "cut.bin").read_bytes() == data
    finally:
        release.set()
        agent.stop()
    assert "did not stop within" not in agent.log(), agent.log()
    assert_clean_log(agent)


def _assert(cond: bool) -> None:
    assert cond
