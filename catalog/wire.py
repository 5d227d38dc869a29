"""The writer socket's frames and its client: how a worker's catalogue writes reach the engine.

A frame is a 4-byte big-endian length and that many bytes of UTF-8 JSON (lone surrogates, as
``surrogateescape`` leaves them in file names, pass through). A request is
``{"call": "Catalog.add_vfolder", "args": {name: value}}``; its answer ``{"ok": true, "result": value}`` or
``{"ok": false, "kind": "IntegrityError", "msg": "..."}``. One request is in flight per connection at a
time; the client keeps a few connections open and runs concurrent calls on separate ones (the host's
writer thread then commits them together).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import select
import sqlite3
import struct
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from catalog.db import CatalogCorrupt, CatalogError, WriterUnavailable
from catalog.writes import RemoteWrite

# A metadata payload (up to 10 Mi characters, sent as a body of at most ~11 MiB) plus its envelope fits with
# room to spare; a length above this is refused before a byte of the body is read.
MAX_FRAME = 32 * 2**20
HEADER = struct.Struct(">I")
IDLE_CONNECTIONS = 16  # kept open between calls; more are opened when more calls are in flight
MAX_CONNECTIONS = 64  # calls in flight per worker; more wait for a free connection (file descriptors are finite)


class WriteRefused(CatalogError):
    """The host refused the request: not a remote write, or arguments that do not fit its signature."""


class FrameError(Exception):
    """A frame that cannot be read: too long, cut short, not JSON."""


def encode(message: object) -> bytes:
    body = json.dumps(message, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode(
        "utf-8", "surrogatepass"
    )
    if len(body) > MAX_FRAME:
        raise FrameError(f"a frame of {len(body)} bytes is longer than the limit of {MAX_FRAME}")
    return HEADER.pack(len(body)) + body


def _no_constants(name: str) -> object:
    raise ValueError(f"{name} is not a JSON number")


def decode(body: bytes) -> Any:
    try:
        return json.loads(body.decode("utf-8", "surrogatepass"), parse_constant=_no_constants)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise FrameError(f"not a JSON frame: {e}") from None


async def read_frame(reader: asyncio.StreamReader) -> Any:
    """The next frame's value; :class:`asyncio.IncompleteReadError` at a clean end of stream."""
    (size,) = HEADER.unpack(await reader.readexactly(HEADER.size))
    if size > MAX_FRAME:
        raise FrameError(f"a frame of {size} bytes is longer than the limit of {MAX_FRAME}")
    return decode(await reader.readexactly(size))


# -- errors: the host's exception by kind, raised again in the worker ----------------------------------------

_DBAPI_KINDS = (
    "IntegrityError",
    "OperationalError",
    "DataError",
    "ProgrammingError",
    "NotSupportedError",
    "InternalError",
    "InterfaceError",
    "DatabaseError",
)


def error_frame(e: BaseException) -> dict[str, Any]:
    """What the host answers for a call that raised ``e``."""
    if isinstance(e, sa.exc.DBAPIError) and type(e).__name__ in _DBAPI_KINDS:
        return {"ok": False, "kind": type(e).__name__, "msg": str(e.orig)}
    if isinstance(e, CatalogCorrupt):
        return {"ok": False, "kind": "CatalogCorrupt", "msg": str(e), "detail": e.detail}
    if isinstance(e, WriteRefused):
        return {"ok": False, "kind": "WriteRefused", "msg": str(e)}
    if isinstance(e, CatalogError):
        return {"ok": False, "kind": "CatalogError", "msg": str(e)}
    return {"ok": False, "kind": "Error", "msg": f"{type(e).__name__}: {e}"}


def error_from(reply: dict[str, Any], call: str) -> Exception:
    """The exception a failed call raises in the worker: the same kind the host's call raised."""
    kind, msg = str(reply.get("kind")), str(reply.get("msg"))
    if kind in _DBAPI_KINDS:
        orig = getattr(sqlite3, kind)(msg)
        return getattr(sa.exc, kind)(f"{call} in the engine's writer", None, orig)
    if kind == "CatalogCorrupt":
        return CatalogCorrupt(msg, str(reply.get("detail", msg)))
    if kind == "WriteRefused":
        return WriteRefused(msg)
    if kind == "CatalogError":
        return CatalogError(msg)
    return CatalogError(f"the catalogue writer failed in {call}: {msg}")


# -- the client --------------------------------------------------------------------------------------------


class _Link:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self._poll: select.poll | None = None
        sock = writer.get_extra_info("socket")
        if sock is not None:
            self._poll = select.poll()
            self._poll.register(sock.fileno(), select.POLLIN | select.POLLRDHUP)

    def alive(self) -> bool:
        """Whether an idle connection can carry a call: nothing may be readable on it between calls, so
        readable means the host closed it (stopped, restarted, killed), even before the loop noticed."""
        if self.reader.at_eof() or self.writer.is_closing() or self._poll is None:
            return False
        return not self._poll.poll(0)

    def close(self) -> None:
        self.writer.close()


class WriterClient:
    """A worker's side of the writer socket (made by :meth:`Catalog.open_remote`; not used directly).

    Connects on first use and again after the host went away; a host that cannot be reached within ``wait``
    seconds, or that accepted a call and answered nothing within ``reply_wait``, is :class:`WriterUnavailable`.
    A call whose connection broke after it was sent is not sent again (the host may have applied it): it
    raises :class:`WriterUnavailable` too, and the HTTP client may repeat the request.
    """

    def __init__(self, socket_path: Path, *, wait: float = 5.0, reply_wait: float = 60.0) -> None:
        self.socket_path = Path(socket_path)
        self.wait = wait
        self.reply_wait = reply_wait
        self._idle: list[_Link] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._slots = asyncio.Semaphore(MAX_CONNECTIONS)
        self._closed = False

    def _unavailable(self, what: str) -> WriterUnavailable:
        return WriterUnavailable(
            f"the storage-agent engine process is not answering on {self.socket_path} ({what}); "
            "catalogue writes wait for it: try again when it is back"
        )

    async def _connect(self) -> _Link:
        deadline = time.monotonic() + self.wait
        delay = 0.02
        while True:
            try:
                return _Link(*await asyncio.open_unix_connection(self.socket_path))
            except OSError as e:  # not there yet (FileNotFoundError), nobody listening (ConnectionRefusedError), ...
                left = deadline - time.monotonic()
                if left <= 0:
                    raise self._unavailable(f"no connection within {self.wait:g} s: {e.strerror or e}") from None
                await asyncio.sleep(min(delay, left))
                delay = min(delay * 2, 0.25)

    async def _take(self) -> _Link:
        while self._idle:
            link = self._idle.pop()
            if link.alive():
                return link
            link.close()  # the host closed it while idle (it stopped or restarted): never used again
        return await self._connect()

    def _give_back(self, link: _Link) -> None:
        if len(self._idle) < IDLE_CONNECTIONS and not self._closed and link.alive():
            self._idle.append(link)
        else:
            link.close()

    async def call(self, spec: RemoteWrite, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Run ``spec`` on the engine's catalogue with these arguments; its result, or its error raised here."""
        if self._closed:
            raise CatalogError("the catalogue is closed")
        frame = encode({"call": spec.name, "args": spec.arguments(args, kwargs)})
        if self._loop is not asyncio.get_running_loop():
            self._adopt_loop()
        async with self._slots:
            return await self._call(spec, frame)

    def _adopt_loop(self) -> None:
        """Connections (and the semaphore) belong to the loop that made them: a new loop starts afresh."""
        self._drop_idle()
        self._loop = asyncio.get_running_loop()
        self._slots = asyncio.Semaphore(MAX_CONNECTIONS)

    async def _call(self, spec: RemoteWrite, frame: bytes) -> Any:
        link = await self._take()
        try:
            link.writer.write(frame)
            async with asyncio.timeout(self.reply_wait):
                await link.writer.drain()
                reply = await read_frame(link.reader)
        except TimeoutError:
            link.close()
            raise self._unavailable(f"no answer to {spec.name} within {self.reply_wait:g} s") from None
        except (OSError, asyncio.IncompleteReadError, FrameError) as e:
            link.close()
            raise self._unavailable(f"the connection broke during {spec.name}: {e}") from None
        except BaseException:  # cancelled: the answer may still come, so the connection cannot be reused
            link.close()
            raise
        self._give_back(link)
        if not isinstance(reply, dict) or "ok" not in reply:
            raise CatalogError(f"the catalogue writer answered {spec.name} with a malformed frame")
        if not reply["ok"]:
            raise error_from(reply, spec.name)
        return spec.result(reply.get("result"))

    def _drop_idle(self) -> None:
        for link in self._idle:
            with contextlib.suppress(RuntimeError):  # its loop is closed already
                link.close()
        self._idle.clear()

    async def close(self) -> None:
        self._closed = True
        self._drop_idle()


__all__ = ["MAX_FRAME", "FrameError", "WriteRefused", "WriterClient", "decode", "encode", "read_frame"]
