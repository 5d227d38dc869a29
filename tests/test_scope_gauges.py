"""``/metrics`` quota-scope gauges (catalog.report.scope_gauges) agree with the per-scope rule
(Catalog.scope_used_bytes) on random catalogues: the grouped queries are one read of the same figures."""

from __future__ import annotations

import asyncio
import random
import uuid
from pathlib import Path

from catalog import Catalog
from catalog.report import scope_gauges


def test_scope_gauges_match_the_per_scope_figures(tmp_path: Path) -> None:
    seed = random.randrange(2**32)
    print(f"seed: {seed}")
    rng = random.Random(seed)

    async def main() -> None:
        cat = await Catalog.open(tmp_path / "c.db")
        try:
            for round_ in range(5):
                expected: dict[tuple[str, str], int | None] = {}
                for vol in ("a", "b"):
                    for _ in range(rng.randrange(0, 6)):
                        qsid = f"qs{round_}{uuid.UUID(int=rng.getrandbits(128)).hex[:8]}"
                        limit = rng.choice([None, rng.randrange(1, 2**40)])
                        await cat.add_quota_scope(vol, qsid, limit)
                        for _ in range(rng.randrange(0, 5)):
                            folder = uuid.UUID(int=rng.getrandbits(128)).hex
                            await cat.add_vfolder(vol, qsid, folder)
                            if rng.random() < 0.8:  # some vfolders are not measured yet
                                await cat.put_usage(vol, qsid, folder, used_bytes=rng.randrange(2**30),
                                                    file_count=rng.randrange(100),
                                                    allocated_bytes=rng.randrange(2**30), source="scan")
                        if rng.random() < 0.2:  # a backend that reports the scope's own figure
                            await cat.put_scope_usage(vol, qsid, rng.randrange(2**40), "quota")
                        expected[(vol, qsid)] = limit
                gauges = {(g.volume, g.qsid): g for g in await scope_gauges(cat)}
                assert {k for k in gauges if k in expected} == set(expected)
                for (vol, qsid), g in gauges.items():
                    assert g.used_bytes == await cat.scope_used_bytes(vol, qsid), (seed, vol, qsid)
                    row = await cat.get_quota_scope(vol, qsid)
                    assert row is not None and g.limit_bytes == row.limit_bytes
        finally:
            await cat.close()

    asyncio.run(main())
