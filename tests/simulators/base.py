"""Common machinery of the appliance simulators: a loopback aiohttp server in its own thread.

Each simulator keeps its state in plain Python objects that tests may read and
change from the test thread (simple assignments; a lock guards the fault
queue), answers unknown routes, wrong methods, malformed bodies and bad
credentials the way its vendor documents, and can be told to misbehave:
answer 5xx (before or after doing the work), answer slowly, answer a body of
the wrong shape, or forget every session/token it handed out.
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web


class SimError(Exception):
    """Raised by handlers; the middleware answers it in the vendor's error shape."""

    def __init__(self, status: int, message: str, code: str | int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code


@dataclass
class Fault:
    status: int | None  # answer with this status...
    delay: float  # ...or after sleeping this long
    times: int
    path_contains: str
    method: str | None = None  # only requests with this method (None: any)
    body: str | None = None  # answer this body (with ``status``) instead of the real answer
    content_type: str = "application/json"
    applied: bool = False  # do the work first, then answer ``status`` (a lost success)

    def matches(self, method: str, path: str) -> bool:
        return self.path_contains in path and self.method in (None, method)


def dir_usage(path: Path) -> tuple[int, int]:
    """(logical bytes of files and links, entries) below ``path`` - what the appliance's accounting reports."""
    total = 0
    entries = 0
    for top, dirs, files in os.walk(path):
        entries += len(dirs) + len(files)
        for name in files:
            try:
                total += os.lstat(os.path.join(top, name)).st_size
            except FileNotFoundError:
                continue
    return total, entries


def check_fields(body: Any, required: Iterable[str], optional: Iterable[str] = ()) -> dict[str, Any]:
    """A JSON object with exactly the required keys plus any of the optional ones."""
    if not isinstance(body, dict):
        raise SimError(400, "request body must be a JSON object")
    required = set(required)
    missing = sorted(required - body.keys())
    if missing:
        raise SimError(400, f"missing required field(s): {', '.join(missing)}")
    extra = sorted(body.keys() - required - set(optional))
    if extra:
        raise SimError(400, f"unexpected field(s): {', '.join(extra)}")
    return body


async def json_body(request: web.Request) -> Any:
    raw = await request.read()
    if not raw:
        raise SimError(400, "request body is missing")
    if request.content_type != "application/json":
        raise SimError(415, f"unsupported content type {request.content_type!r}; use application/json")
    try:
        return json.loads(raw)
    except ValueError:
        raise SimError(400, "request body is not valid JSON") from None


class Simulator:
    """Subclasses define ``routes(app)``, ``authorize(request)`` and ``error(status, message, code)``."""

    name = "appliance"

    def __init__(self, mount: Path) -> None:
        self.mount = mount
        self.calls: list[tuple[str, str]] = []
        self._faults: list[Fault] = []
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self.port = 0
        self._tls = False

    # -- what subclasses provide ---------------------------------------------------

    def routes(self, app: web.Application) -> None:
        raise NotImplementedError

    def authorize(self, request: web.Request) -> None:
        """Raise SimError(401, ...) for bad credentials; public routes return early."""

    def error(self, status: int, message: str, code: str | int | None) -> web.Response:
        return web.json_response({"message": message}, status=status)

    # -- fault injection -------------------------------------------------------------

    def fail(
        self,
        status: int = 500,
        times: int = 1,
        path_contains: str = "",
        method: str | None = None,
        applied: bool = False,
    ) -> None:
        """Answer ``status``; with ``applied`` only after the request took effect (the answer is what is lost)."""
        with self._lock:
            self._faults.append(Fault(status, 0.0, times, path_contains, method, applied=applied))

    def slow(self, seconds: float, times: int = 1, path_contains: str = "", method: str | None = None) -> None:
        with self._lock:
            self._faults.append(Fault(None, seconds, times, path_contains, method))

    def garble(
        self,
        body: str = "{}",
        content_type: str = "application/json",
        times: int = 1,
        path_contains: str = "",
        method: str | None = None,
        status: int = 200,
    ) -> None:
        """Answer ``body`` instead of the real answer (nothing is done): ``{}``, a text page, a wrong shape."""
        with self._lock:
            self._faults.append(Fault(status, 0.0, times, path_contains, method, body, content_type))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def _take_fault(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for f in self._faults:
                if f.matches(method, path):
                    f.times -= 1
                    if f.times <= 0:
                        self._faults.remove(f)
                    return f
        return None

    def count(self, method: str, path_contains: str) -> int:
        return sum(1 for m, p in list(self.calls) if m == method and path_contains in p)

    # -- the server -------------------------------------------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.calls.append((request.method, request.path_qs))
        fault = self._take_fault(request.method, request.path_qs)
        if fault is None:
            return await self._handle(request, handler)
        if fault.body is not None:
            return web.Response(status=fault.status or 200, text=fault.body, content_type=fault.content_type)
        if fault.applied and fault.status is not None:
            await self._handle(request, handler)
            return self.error(fault.status, f"injected failure {fault.status} after applying the request", None)
        if fault.status is not None:
            return self.error(fault.status, f"injected failure {fault.status}", None)
        await asyncio.sleep(fault.delay)
        return await self._handle(request, handler)

    async def _handle(self, request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            routing = request.match_info.http_exception
            if routing is not None:
                raise routing
            self.authorize(request)
            return await handler(request)
        except SimError as e:
            return self.error(e.status, e.message, e.code)
        except web.HTTPMethodNotAllowed:
            return self.error(405, f"method {request.method} is not allowed on {request.path}", None)
        except web.HTTPNotFound:
            return self.error(404, f"no such resource: {request.path}", None)

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware])
        self.routes(app)
        return app

    @property
    def url(self) -> str:
        return f"{'https' if self._tls else 'http'}://127.0.0.1:{self.port}"

    def start(self, port: int = 0, ssl_context: ssl.SSLContext | None = None) -> Simulator:
        self._tls = ssl_context is not None
        ready = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)

            async def up() -> None:
                self._runner = web.AppRunner(self.app(), access_log=None)
                await self._runner.setup()
                site = web.TCPSite(self._runner, "127.0.0.1", port, ssl_context=ssl_context)
                await site.start()
                self.port = site._server.sockets[0].getsockname()[1]

            try:
                loop.run_until_complete(up())
            except BaseException as e:  # noqa: BLE001 - handed to the starting thread
                errors.append(e)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=run, name=f"sim-{self.name}", daemon=True)
        self._thread.start()
        ready.wait(10)
        if errors:
            raise errors[0]
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop = None
