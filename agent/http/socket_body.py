"""A big request body moved from the socket into a file with splice(2), past aiohttp's parser.

Through aiohttp a body reaches Python as 256 KiB ``bytes`` (one copy out of the kernel, a parser pass) and
is copied back into the page cache by the write. For a big tus PATCH the bytes go socket → pipe → file
inside the kernel instead. The price: aiohttp's parser never sees the rest of that message, so the
connection cannot carry another request and the answer closes it (``Connection: close``; tus clients open
a new one). Only for plain TCP with a Content-Length; TLS and chunked bodies take the usual path.

The receive buffer of such a connection is raised to RCVBUF_BYTES as soon as the PATCH is seen (after its
token is verified, before the catalogue is asked): a new connection starts with a small one (``tcp_rmem``'s
default, 128 KiB) that the kernel grows only as the application reads, so while the handler looked up the
session and took its lock (a few ms, more on a busy CPU) the client stalled after its first 128 KiB. The
Backend.AI SDK opens a connection per 16 MiB PATCH, so it paid that stall on every one; with the bigger buffer
it keeps sending while the handler does its bookkeeping. A buffer set by the application is never grown by the
kernel again (``SO_RCVBUF`` turns autotuning off), so it is only set where that costs nothing: for a body of at
most EARLY_MAX_BYTES (a long one pays the first stall once, and keeps autotuning for a long-distance link), and
only when ``net.core.rmem_max`` lets it reach RCVBUF_MIN_BYTES (the default 208 KiB would cap a fast link).

Waiting for the socket happens on the event loop (no thread is held by a slow client); each burst of
arrived bytes is moved by one worker-thread call, so the event loop never copies page-cache pages itself.
A fast client's socket runs dry many times per PATCH (the splice drains it faster than a sender fills it):
after a burst of at least LINGER_MIN_BYTES the thread waits up to LINGER_MS for the next one itself, as
each hand-back to the loop and hop out again cost more than the wait. So a thread is held only while bytes
come fast; a slow client (small bursts, or pauses past LINGER_MS) still waits on the loop. Measured with
``bench/transfer_bench.py``, interleaved runs: SDK-style 16 MiB PATCHes 0.61–0.72x ``cp`` + fdatasync
against 0.58–0.60x without the wait, 8 MiB PATCHes 0.52–0.75x against 0.48x.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import functools
import os
import select
import socket
from collections.abc import Callable
from typing import Any

from aiohttp import web

from agent.http.errors import CLOSE_AFTER
from backends import cpu_placement

MIN_BYTES = 2 << 20  # smaller bodies keep their connection: the usual path costs them little
PIPE_BYTES = 1 << 20
RCVBUF_BYTES = 16 << 20  # asked for a spliced body's connection (the kernel gives min(this, rmem_max) x 2)
RCVBUF_MIN_BYTES = 4 << 20  # ... unless what the kernel would give is smaller than this
EARLY_MAX_BYTES = 64 << 20  # ... or the body is longer than this
HOP_BYTES = 16 << 20  # at most this much moved per worker-thread call (a fast client has more waiting)
# a fast client's socket runs dry between its bursts: after a burst of at least LINGER_MIN_BYTES the thread
# waits up to LINGER_MS for the next one instead of handing the wait back to the event loop (see _move)
LINGER_MIN_BYTES = 256 << 10
LINGER_MS = 2


class SocketBody:
    """The rest of one request's body, read from the socket with splice (see the module docstring)."""

    def __init__(self, request: web.Request, transport: asyncio.Transport, sock_fd: int, length: int) -> None:
        self._request = request
        self._transport = transport
        self._sock_fd = sock_fd
        self.length = length

    @classmethod
    def of(cls, request: web.Request) -> SocketBody | None:
        """The body as a SocketBody when it is worth it and possible, else None (read it the usual way).
        Called as early as possible (see the module docstring: it raises the connection's receive buffer)."""
        length = request.content_length
        transport = request.transport
        if length is None or length < MIN_BYTES or transport is None or not hasattr(os, "splice"):
            return None
        if "Transfer-Encoding" in request.headers or transport.get_extra_info("sslcontext") is not None:
            return None
        sock = transport.get_extra_info("socket")
        if sock is None:
            return None
        _raise_rcvbuf(sock, length)
        return cls(request, transport, sock.fileno(), length)  # asked before anything read the body

    async def copy_to(
        self,
        write_buffered: Callable[[list[bytes], int], Any],
        written: Callable[[int, int], Any],
        fd: int,
        pos: int,
        idle_timeout: float,
    ) -> int:
        """Move the body into ``fd`` from ``pos``; returns the bytes moved. What aiohttp already read goes
        through ``write_buffered(parts, pos)``; ``written(pos, length)`` follows each spliced range (both
        on a worker thread). Raises ConnectionResetError when the
        client goes away mid-body or sends nothing for ``idle_timeout`` seconds; what arrived before is in
        the file either way."""
        content = self._request.content
        parts: list[bytes] = []
        while chunk := content.read_nowait():
            parts.append(chunk)
        self._transport.pause_reading()  # from here on the socket is read only below, and the connection
        self._request[CLOSE_AFTER] = True  # ends with the answer, whatever it is
        self._request.protocol.close()
        loop = asyncio.get_running_loop()
        fds: list[int] = []
        done = 0
        try:
            sock = os.dup(self._sock_fd)
            fds.append(sock)
            r, w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
            fds += (r, w)
            try:
                fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
            except OSError:  # above /proc/sys/fs/pipe-max-size: the default 64 KiB pipe only costs more calls
                pass
            wide = cpu_placement.wide_executor()
            moved: int | None
            while done < self.length:
                most = min(self.length - done, HOP_BYTES)
                if parts:  # written in the first hop, before the splices that follow them
                    first = sum(len(p) for p in parts)
                    moved = await loop.run_in_executor(
                        wide, _write_then_move, write_buffered, parts, sock, r, w, fd, pos, most - first, written
                    )
                    parts = []
                else:
                    moved = await loop.run_in_executor(wide, _move, sock, r, w, fd, pos + done, most, written)
                if moved is None:  # nothing waiting: sleep on the loop until the socket is readable
                    try:
                        await _readable(loop, sock, idle_timeout)
                    except TimeoutError:
                        raise ConnectionResetError(f"no body bytes for {idle_timeout:g} s") from None
                    continue
                if moved == 0:
                    raise ConnectionResetError(f"the client closed the connection {self.length - done} bytes short")
                done += moved
            return done
        finally:
            content.feed_eof()  # aiohttp must not wait to read the rest of this body itself
            for opened in fds:
                os.close(opened)


def _raise_rcvbuf(sock: socket.socket, length: int) -> None:
    """The connection's receive buffer raised for a body of ``length`` bytes (see the module docstring)."""
    want = min(length, RCVBUF_BYTES)
    if length > EARLY_MAX_BYTES or min(want, _rmem_max()) * 2 < RCVBUF_MIN_BYTES:
        return
    try:
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) < want:  # never lowered
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, want)
    except OSError:  # an optimisation only
        pass


@functools.cache
def _rmem_max() -> int:
    """``net.core.rmem_max`` (read once: a sysctl of the host, not of a request); 0 when it cannot be read."""
    try:
        with open("/proc/sys/net/core/rmem_max") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 0


def _write_then_move(
    write_buffered: Callable[[list[bytes], int], Any],
    parts: list[bytes],
    sock: int,
    r: int,
    w: int,
    fd: int,
    pos: int,
    most: int,
    written: Callable[[int, int], Any],
) -> int:
    """The bytes aiohttp read before the handler took the socket over, then what the socket holds: one
    thread hop for both. Never None: something was written."""
    write_buffered(parts, pos)
    first = sum(len(p) for p in parts)
    return first + (_move(sock, r, w, fd, pos + first, most, written) or 0)


def _move(sock: int, r: int, w: int, fd: int, pos: int, most: int, written: Callable[[int, int], Any]) -> int | None:
    """Move what the socket holds (at most ``most`` bytes) into ``fd`` at ``pos``. None: nothing was
    waiting; 0: the peer closed the connection. On a thread of :func:`cpu_placement.wide_executor` (any
    CPU): the copy into the page cache is kernel work that on the agent's pinned CPU would take turns
    with the event loop."""
    done = 0
    burst = 0  # bytes moved since the socket last ran dry
    try:
        while done < most:
            try:
                n = os.splice(sock, w, min(most - done, PIPE_BYTES), flags=os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK)
            except BlockingIOError:
                if burst < LINGER_MIN_BYTES or not _refilled(sock):
                    return done or None
                burst = 0
                continue
            if n == 0:
                return done
            burst += n
            while n:
                k = os.splice(r, fd, n, offset_dst=pos + done, flags=os.SPLICE_F_MOVE)
                if k == 0:
                    raise OSError(errno.EIO, "splice into the staged file moved nothing")
                n -= k
                done += k
        return done
    finally:
        if done:
            written(pos, done)


def _refilled(sock: int) -> bool:
    """Whether the socket has bytes again within LINGER_MS (see :func:`_move`)."""
    p = select.poll()
    p.register(sock, select.POLLIN)
    return bool(p.poll(LINGER_MS))


async def _readable(loop: asyncio.AbstractEventLoop, fd: int, timeout: float) -> None:
    await wait_ready(loop, fd, timeout)


async def wait_ready(
    loop: asyncio.AbstractEventLoop, fd: int, timeout: float | None, *, write: bool = False
) -> None:
    """Until ``fd`` (a dup of a transport's socket: asyncio refuses a watch on the transport's own number)
    is readable, or writable with ``write``; TimeoutError after ``timeout`` seconds (None: never)."""
    ready = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    add, remove = (loop.add_writer, loop.remove_writer) if write else (loop.add_reader, loop.remove_reader)
    add(fd, wake)
    try:
        async with asyncio.timeout(timeout):
            await ready
    finally:
        remove(fd)
