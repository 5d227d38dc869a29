"""The memory trimmer hands the free pages a fragmented heap holds back to the kernel."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from agent.runtime import memory_trim

ROOT = Path(__file__).resolve().parent.parent

# A fresh process, so the heap is only what the script makes: 1 MiB-ish holes between live blocks,
# the shape many connections' shrunk read buffers leave, which free() alone never gives back.
SCRIPT = textwrap.dedent(
    """
    import asyncio, json, time
    import psutil
    from agent.runtime import memory_trim

    def rss():
        return psutil.Process().memory_info().rss

    first = bytearray(300_000)  # freed, a mapped block raises glibc's mmap threshold, as asyncio's reads do
    del first
    blocks = [bytearray(200_000) for _ in range(500)]  # ~100 MB from the heap, every page touched
    keep = blocks[::10]
    del blocks  # 9 of every 10 freed: holes inside the heap
    before = rss()

    async def main():
        trimmer = memory_trim.trimmer(0.05)
        await trimmer.start()
        deadline = time.monotonic() + 10
        while rss() > before - 50 * 2**20 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await trimmer.stop()

    asyncio.run(main())
    print(json.dumps({"before": before, "after": rss(), "trims": memory_trim.TRIMS._value.get(), "kept": len(keep)}))
    """
)


@pytest.mark.skipif(not memory_trim.AVAILABLE, reason="the C library has no malloc_trim (not glibc)")
def test_free_pages_inside_the_heap_go_back_to_the_kernel() -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True
    )
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["before"] - figures["after"] >= 50 * 2**20, figures  # most of the ~90 MB of holes returned
    assert figures["trims"] >= 1
