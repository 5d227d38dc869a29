"""The stop of the HTTP listeners: requests in flight get ``[storage-proxy] stop-timeout`` to end, bodies included.

aiohttp's own graceful shutdown (``AppRunner.cleanup``: ``Server.pre_shutdown`` then ``Server.shutdown``)
marks every connection closing before it waits for the handlers, and a closing connection's protocol drops
every byte that arrives from then on (``RequestHandler.data_received``; aio-libs/aiohttp#2298). A download
in flight ends, but an upload whose body is still arriving waits for bytes that never come until it is
cancelled. So the agent drains first, with public aiohttp calls only, and leaves ``cleanup`` nothing to do
but close what is left:

1. the listening sites stop (``BaseSite.stop``): no new connection is accepted;
2. idle connections (no request of theirs in a handler) are closed (``RequestHandler.force_close``);
3. the requests in flight (tracked by :func:`middleware`, outermost in every app) run on, their connections
   still read, for at most the stop timeout; each answers with ``Connection: close``, and a request that
   starts on a kept-alive connection after the stop began is answered 503 (its ``msg`` says why) and closed;
4. what is still running then is cancelled, and given :data:`CANCEL_GRACE` seconds to record its outcome
   (an upload records the bytes that reached its staged file, so HEAD + PATCH resume from there).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.web import RequestHandler

from agent.http.errors import ApiError, problem_response

log = logging.getLogger(__name__)

CANCEL_GRACE = 5.0  # seconds cancelled handlers get to record their outcome before the connections are cut
STOPPING = "the storage agent is stopping (SIGTERM/SIGINT); send the request again (another connection)"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Drain:
    """This process's requests in flight (their handler tasks, by connection) and whether the stop began."""

    def __init__(self) -> None:
        self.stopping = False
        self.busy: dict[asyncio.Task[object], RequestHandler] = {}

    def forget(self, task: asyncio.Task[object]) -> None:
        self.busy.pop(task, None)

    async def stop(self, runners: list[web.AppRunner], timeout: float) -> None:
        """Steps 1-4 of the module docstring; afterwards ``runner.cleanup()`` finds no request in flight."""
        self.stopping = True
        for runner in runners:
            for site in list(runner.sites):
                await site.stop()
        await asyncio.sleep(0)  # connections accepted just before: their first request reaches the middleware
        busy_connections = set(self.busy.values())
        idle = 0
        for runner in runners:
            server = runner.server
            for conn in server.connections if server is not None else []:
                if conn not in busy_connections:
                    conn.force_close()
                    idle += 1
        tasks = set(self.busy)
        if not tasks:
            return
        log.info("waiting at most %g s for %d request(s) in flight (closed %d idle connection(s))",
                 timeout, len(tasks), idle)
        _, late = await asyncio.wait(tasks, timeout=timeout)
        late = {t for t in late if not t.done()}
        if not late:
            return
        log.warning("stop-timeout (%g s) reached: cancelling %d request(s) still in flight", timeout, len(late))
        for task in late:
            task.cancel()
        _, stuck = await asyncio.wait(late, timeout=CANCEL_GRACE)
        if stuck:
            log.warning("%d cancelled request(s) did not end within %g s; their connections are cut", len(stuck),
                        CANCEL_GRACE)


DRAIN_KEY = web.AppKey("drain", Drain)  # each app's process-wide Drain (the Agent's), set by its builder


@web.middleware
async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Outermost in every app: tracks the request while its handler runs; once the stop began, refuses new
    requests (503) and closes each connection after its answer."""
    drain = request.app[DRAIN_KEY]
    if drain.stopping:
        log.info("%s %s -> 503 (stopping)", request.method, request.path)
        response: web.StreamResponse = problem_response(ApiError(503, STOPPING, "agent-stopping"))
        response.force_close()
        return response
    task = asyncio.current_task()
    assert task is not None
    drain.busy[task] = request.protocol
    task.add_done_callback(drain.forget)  # once the answer is written, not when the handler returns
    response = await handler(request)
    if drain.stopping:
        response.force_close()  # no further request on this connection
    return response
