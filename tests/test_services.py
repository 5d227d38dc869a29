"""Background service helpers: a periodic tick that survives its own failures, and a clean stop."""

from __future__ import annotations

import asyncio

from agent.runtime.services import Periodic


def test_a_failing_tick_is_logged_and_the_next_one_comes(caplog) -> None:  # noqa: ANN001 - pytest fixture
    calls: list[int] = []

    async def tick() -> None:
        calls.append(len(calls))
        if len(calls) == 1:
            raise RuntimeError("first tick breaks")

    async def main() -> bool:
        service = Periodic("ticker", 0.01, tick)
        await service.start()
        for _ in range(200):
            if len(calls) >= 3:
                break
            await asyncio.sleep(0.01)
        await service.stop()
        task = service._task
        return task is not None and task.done()

    assert asyncio.run(main())
    assert len(calls) >= 3
    assert "ticker failed" in caplog.text and "first tick breaks" in caplog.text
