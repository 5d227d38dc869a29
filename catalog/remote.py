"""The engine's writer host: other processes' catalogue writes, run on the one writer (issue 21, choice (b)).

Wiring, in the engine process (the one that opened the catalogue writable and upgraded it)::

    catalog = await Catalog.open_or_rebuild(path)
    host = WriterHost(catalog, socket_path, on_write=engine_hook)   # on_write: optional, see below
    await host.start()          # listening: workers may connect from now on
    ...
    await host.stop()           # before catalog.close(): calls in flight finish and are answered
    await catalog.close()

and in each HTTP worker::

    catalog = await Catalog.open_remote(path, socket_path, wait=5.0)

The socket is a Unix stream socket, mode 0600 (only the agent's user connects), bound under a temporary
name and renamed into place, so a stale file left by a killed engine is replaced and no peer ever sees
a half-set-up socket; a live host already on that path is an error. Frames are those of
:mod:`catalog.wire`. A request names a method marked ``@writes`` (:data:`catalog.writes.REMOTE_WRITES`)
and its arguments, checked against the method's type hints; anything else is refused with an error frame
and the connection goes on. A frame that cannot be read (too long, not JSON) is answered with an error and
that connection alone is closed. Calls on different connections run concurrently, so the writer thread
commits them together (group commit).

``on_write(name, kwargs, result)`` is called on the event loop after each remote write succeeded (e.g.
``"UsageStore.request_rescan"``, ``{"key": (volume, qsid, folder_id)}``): the engine's way to act on a
worker's write at once (start watching a new vfolder, rescan) instead of polling the catalogue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from catalog.db import CatalogError
from catalog.store import Catalog
from catalog.usage_store import UsageStore
from catalog.wire import FrameError, WriterClient, WriteRefused, encode, error_frame, read_frame
from catalog.writes import REMOTE_WRITES, ArgumentError, to_json

log = logging.getLogger(__name__)

OnWrite = Callable[[str, dict[str, Any], Any], None]


class _Conn:
    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.busy = False


class WriterHost:
    """Serves :meth:`Catalog.open_remote` catalogues of other processes on ``socket_path`` (see the module)."""

    def __init__(self, catalog: Catalog, socket_path: str | Path, *, on_write: OnWrite | None = None) -> None:
        if catalog.db.readonly or catalog.db.remote is not None:
            raise CatalogError("a writer host needs the catalogue opened writable in this process")
        self.catalog = catalog
        self.socket_path = Path(socket_path)
        self.on_write = on_write
        self._targets: dict[str, object] = {"Catalog": catalog, "UsageStore": UsageStore(catalog.db)}
        self._server: asyncio.Server | None = None
        self._conns: dict[asyncio.Task[None], _Conn] = {}
        self._stopping = False
        self._inode: int | None = None  # of the socket file this host made: stop() removes that one only
        self.calls = 0  # writes run for peers
        self.refused = 0  # requests refused (unknown method, bad arguments, unreadable frame)

    async def start(self) -> None:
        for spec in REMOTE_WRITES.values():
            spec.hints  # noqa: B018 - resolve every hint now: a bad one fails the start, not a worker's call
        sock = await asyncio.to_thread(self._bind)
        self._server = await asyncio.start_unix_server(self._serve, sock=sock)
        log.info("catalogue writer host listening on %s", self.socket_path)

    def _bind(self) -> socket.socket:
        path = self.socket_path
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            mode = path.lstat().st_mode
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISSOCK(mode):
                raise CatalogError(f"{path} exists and is not a socket: not replacing it")
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                probe.settimeout(1.0)
                try:
                    probe.connect(str(path))
                except OSError:
                    pass  # stale: its engine is gone
                else:
                    raise CatalogError(f"another catalogue writer host is listening on {path}")
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(tmp))
            os.chmod(tmp, 0o600)
            sock.listen(128)
            os.replace(tmp, path)
            self._inode = path.lstat().st_ino
        except BaseException:
            sock.close()
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
        sock.setblocking(False)
        return sock

    async def stop(self, timeout: float = 30.0) -> None:
        """Stop listening, let calls in flight finish and be answered, close every connection."""
        self._stopping = True
        if self._server is not None:
            self._server.close()
        for conn in self._conns.values():
            if not conn.busy:
                conn.writer.close()
        tasks = list(self._conns)
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=timeout)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            if self._inode is not None and self.socket_path.lstat().st_ino == self._inode:
                self.socket_path.unlink()  # never another host's socket (a failed start, a newer engine)
        self._inode = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        conn = self._conns[task] = _Conn(writer)
        try:
            while not self._stopping:
                try:
                    request = await read_frame(reader)
                except asyncio.IncompleteReadError:
                    break  # the peer closed (a clean end, or a frame cut short: nothing to answer)
                except FrameError as e:  # the stream cannot be trusted past this point
                    self.refused += 1
                    log.warning("catalogue writer host: closing a connection: %s", e)
                    writer.write(encode(error_frame(WriteRefused(str(e)))))
                    await writer.drain()
                    break
                conn.busy = True
                reply = await self._answer(request)
                try:
                    frame = encode(reply)
                except FrameError as e:
                    frame = encode(error_frame(CatalogError(f"the answer cannot be sent: {e}")))
                writer.write(frame)
                await writer.drain()
                conn.busy = False
        except OSError:  # the peer went away mid-answer
            pass
        finally:
            del self._conns[task]
            writer.close()

    async def _answer(self, request: object) -> dict[str, Any]:
        name = request.get("call") if isinstance(request, dict) else None
        spec = REMOTE_WRITES.get(name) if isinstance(name, str) else None
        target = self._targets.get(spec.name.split(".", 1)[0]) if spec is not None else None
        if spec is None or target is None:
            self.refused += 1
            what = repr(name) if isinstance(name, str) else "a request without a method name"
            return error_frame(WriteRefused(f"{what[:200]} is not a remote catalogue write"))
        assert isinstance(request, dict)
        try:
            kwargs = spec.check(request.get("args", {}))
        except ArgumentError as e:
            self.refused += 1
            return error_frame(WriteRefused(str(e)[:1000]))
        try:
            result = await spec.fn(target, **kwargs)
            payload = to_json(result)
        except Exception as e:
            return error_frame(e)
        self.calls += 1
        if self.on_write is not None:
            try:
                self.on_write(spec.name, kwargs, result)
            except Exception:
                log.exception("catalogue writer host: on_write hook failed after %s", spec.name)
        return {"ok": True, "result": payload}


__all__ = ["WriterClient", "WriterHost"]
