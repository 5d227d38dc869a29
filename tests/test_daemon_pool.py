"""backends/daemon_pool.py: the agent's thread pools, whose stop never waits past its bound for a stuck call."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from backends.daemon_pool import DaemonPool


def _stuck(release: threading.Event) -> None:
    release.wait(60)


def test_results_errors_and_a_bounded_shutdown_naming_the_stuck_call(caplog: pytest.LogCaptureFixture) -> None:
    pool = DaemonPool(4, "test-pool", join_timeout=0.5)
    release = threading.Event()
    try:
        assert [f.result(10) for f in [pool.submit(pow, i, 2) for i in range(20)]] == [i * i for i in range(20)]
        with pytest.raises(ZeroDivisionError):
            pool.submit(lambda: 1 / 0).result(10)
        stuck = pool.submit(_stuck, release)
        deadline = time.monotonic() + 10
        while not pool.busy() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert any("_stuck" in line for line in pool.busy()), pool.busy()
        started = time.monotonic()
        pool.shutdown(wait=True)
        assert time.monotonic() - started < 30  # bounded (0.5 s asked; generous for a loaded machine)
        assert not stuck.done()
        assert "still busy" in caplog.text and "_stuck" in caplog.text
        assert all(t.daemon for t in threading.enumerate() if t.name.startswith("test-pool"))
        with pytest.raises(RuntimeError):
            pool.submit(pow, 2, 2)
    finally:
        release.set()
    assert stuck.result(10) is None


def test_asyncio_takes_it_as_default_executor_and_to_thread_runs_there() -> None:
    async def main() -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        loop.set_default_executor(DaemonPool(2, "test-loop-pool", join_timeout=1))
        name = await asyncio.to_thread(lambda: threading.current_thread().name)
        return name, await asyncio.to_thread(sum, range(10))

    name, total = asyncio.run(main())
    assert name.startswith("test-loop-pool_") and total == 45
