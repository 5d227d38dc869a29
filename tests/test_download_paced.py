"""GET /download's sendfile on worker threads (agent/http/downloads.py _sendfile_wide), driven by clients that
read at their own pace: one that stops reading for a while (the socket fills; the wait moves to the event
loop, which keeps answering others) gets every byte, in order, after it resumes, with a Range as well; one
that goes away mid-body leaves the agent serving. Real agent, real sockets; the file and pauses are seeded."""

from __future__ import annotations

import hashlib
import os
import random
import socket
import time

import httpx

from tests.client_helpers import download_token, vfolder_path
from tests.support import assert_clean_log

MiB = 1 << 20


def _request(url: httpx.URL, extra: str = "") -> socket.socket:
    sock = socket.create_connection((url.host, url.port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)  # a small window: the agent's side fills
    target = url.raw_path.decode()
    sock.sendall(f"GET {target} HTTP/1.1\r\nHost: {url.host}\r\nConnection: close\r\n{extra}\r\n".encode())
    return sock


def _read_all(sock: socket.socket, rng: random.Random, pauses: int) -> bytes:
    data = bytearray()
    while chunk := sock.recv(256 * 1024):
        data += chunk
        if pauses and rng.random() < 0.05:
            pauses -= 1
            time.sleep(rng.uniform(0.1, 0.4))  # longer than the worker thread lingers (20 ms)
    return bytes(data)


def _body(raw: bytes) -> tuple[bytes, bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return head, body


def test_a_reader_that_pauses_gets_every_byte_and_others_are_answered(agent, api, vfid):
    seed = random.randrange(1 << 32)
    print(f"seed {seed}")
    rng = random.Random(seed)
    content = rng.randbytes(24 * MiB + rng.randrange(MiB))
    (vfolder_path(agent, vfid) / "big.bin").write_bytes(content)
    token = download_token(api, vfid, "big.bin")
    url = httpx.URL(agent.client_url + "/download", params={"token": token})

    sock = _request(url)
    time.sleep(0.5)  # read nothing yet: the agent's send has to wait for room
    with httpx.Client(base_url=agent.client_url, timeout=10) as other:  # the loop is free meanwhile
        r = other.get("/download", params={"token": token}, headers={"Range": "bytes=0-99"})
        assert r.status_code == 206 and r.content == content[:100]
    with sock:
        head, body = _body(_read_all(sock, rng, pauses=4))
    assert head.startswith(b"HTTP/1.1 200"), head[:80]
    assert hashlib.sha256(body).digest() == hashlib.sha256(content).digest()

    start = rng.randrange(len(content) // 2)
    end = start + rng.randrange(8 * MiB, 12 * MiB)
    with _request(url, f"Range: bytes={start}-{end}\r\n") as sock:
        head, body = _body(_read_all(sock, rng, pauses=2))
    assert head.startswith(b"HTTP/1.1 206"), head[:80]
    assert body == content[start : end + 1]
    assert_clean_log(agent)


def test_a_reader_that_goes_away_mid_body_leaves_the_agent_serving(agent, api, vfid):
    content = os.urandom(32 * MiB)
    (vfolder_path(agent, vfid) / "big.bin").write_bytes(content)
    token = download_token(api, vfid, "big.bin")
    url = httpx.URL(agent.client_url + "/download", params={"token": token})
    for _ in range(3):
        sock = _request(url)
        sock.recv(MiB)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST
        sock.close()
    with httpx.Client(base_url=agent.client_url, timeout=30) as cli:
        r = cli.get("/download", params={"token": token})
    assert r.status_code == 200 and r.content == content
    assert_clean_log(agent)
