"""A thread pool whose threads are never joined past a bound: a call stuck in a hung mount never holds a stop.

``concurrent.futures.ThreadPoolExecutor`` threads are joined twice when the process ends: ``asyncio.run``
shuts the loop's default executor down with ``wait=True`` (no bound before Python 3.12), and the interpreter
joins every such thread at exit. One thread blocked in a hung NFS or FUSE mount (a backend's init, a listing
whose request was long cancelled) then holds the stop forever. This pool's threads are daemon threads:
:meth:`DaemonPool.shutdown` waits for them at most ``join_timeout`` seconds, names the ones still busy (and
what they run) in a warning, and returns; the interpreter leaves them to the kernel at exit.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

log = logging.getLogger(__name__)

_STOP = object()


def _what(fn: Callable[..., Any], args: tuple[Any, ...]) -> str:
    """A readable name of a call: ``asyncio.to_thread`` hands ``partial(Context.run, f, ...)``, named by ``f``."""
    inner = getattr(fn, "func", None)
    if inner is not None:  # functools.partial
        fn, args = inner, getattr(fn, "args", ())
    if getattr(fn, "__qualname__", "") == "Context.run" and args:
        fn = args[0]
    module = getattr(fn, "__module__", None) or ""
    name = getattr(fn, "__qualname__", None) or repr(fn)
    return f"{module}.{name}" if module else name


class DaemonPool(ThreadPoolExecutor):
    """At most ``max_workers`` daemon threads (started on demand), each running ``initializer`` first.

    A ThreadPoolExecutor by type only (``loop.set_default_executor`` accepts nothing else since Python 3.11):
    every method it serves by is its own, none of ThreadPoolExecutor's state is made or used."""

    def __init__(
        self,
        max_workers: int,
        thread_name_prefix: str,
        initializer: Callable[[], object] | None = None,
        join_timeout: float = 5.0,
    ) -> None:  # ThreadPoolExecutor.__init__ is not called: its threads would be joined at exit
        self._max = max_workers
        self._prefix = thread_name_prefix
        self._init_fn = initializer
        self.join_timeout = join_timeout
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._idle = threading.Semaphore(0)
        self._lock = threading.Lock()
        self._daemons: list[threading.Thread] = []
        self._running: dict[str, tuple[str, float]] = {}  # thread name -> (what it runs, since when)
        self._shut = False

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        with self._lock:
            if self._shut:
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._queue.put((future, fn, args, kwargs))
            if not self._idle.acquire(blocking=False) and len(self._daemons) < self._max:
                thread = threading.Thread(
                    target=self._work, name=f"{self._prefix}_{len(self._daemons)}", daemon=True
                )
                thread.start()
                self._daemons.append(thread)
        return future

    def _work(self) -> None:
        name = threading.current_thread().name
        if self._init_fn is not None:
            try:
                self._init_fn()
            except Exception:
                log.exception("thread %s: its initializer failed", name)
        while True:
            item = self._queue.get()
            if item is _STOP:
                self._queue.put(_STOP)  # for the next thread
                return
            future, fn, args, kwargs = item
            del item
            if future.set_running_or_notify_cancel():
                self._running[name] = (_what(fn, args), time.monotonic())
                try:
                    result = fn(*args, **kwargs)
                except BaseException as e:  # noqa: BLE001 - handed to the future
                    future.set_exception(e)
                else:
                    future.set_result(result)
                finally:
                    self._running.pop(name, None)
            del future, fn, args, kwargs
            self._idle.release()

    def busy(self) -> list[str]:
        """The threads running a call now: ``name: what (for N s)``."""
        now = time.monotonic()
        return [f"{name}: {what} (for {now - since:.0f} s)" for name, (what, since) in list(self._running.items())]

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._shut = True
            if cancel_futures:
                while True:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if item is not _STOP:
                        item[0].cancel()
            self._queue.put(_STOP)
        if not wait:
            return
        deadline = time.monotonic() + self.join_timeout
        for thread in list(self._daemons):
            thread.join(max(0.0, deadline - time.monotonic()))
        stuck = self.busy()
        if stuck:
            log.warning("%d thread(s) of %s still busy after %g s (a hung mount?), left behind: %s", len(stuck),
                        self._prefix, self.join_timeout, "; ".join(stuck))
