"""A blocking call that may never return (a look at a hung mount), run off the event loop in a daemon thread.

``asyncio.to_thread`` runs in the loop's default executor, whose threads are joined twice when the process
stops: ``asyncio.run`` waits for the executor to shut down (without a bound before Python 3.12), and the
interpreter joins every executor thread at exit. A thread stuck in a hung NFS or FUSE mount would hold the
stop forever, until SIGKILL. A daemon thread of its own is never joined: the process stops with the call
still blocked, and the kernel ends it with the process.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import TypeVar

from backends import cpu_placement

T = TypeVar("T")


async def daemon_call(fn: Callable[[], T], name: str) -> T:
    """``fn()`` in a new daemon thread named ``name``; its result (or exception) here. Cancelling the await
    leaves the thread to finish (or hang) on its own; its answer is then dropped."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if done.done():
            return  # cancelled meanwhile
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(result)  # type: ignore[arg-type]

    def run() -> None:
        cpu_placement.background_thread()  # as the default executor's threads: SCHED_BATCH
        result, error = None, None
        try:
            result = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the awaiting task
            error = e
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:  # the loop has closed: the process is stopping, nobody waits for this answer
            pass

    threading.Thread(target=run, name=name, daemon=True).start()
    return await done
