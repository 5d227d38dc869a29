"""A quota scope's used bytes follow one rule (catalog/scope_used.py) in every reader: the HTTP side's
``sum_ready`` over the rows, ``Catalog.scope_used_bytes``, ``/metrics``' grouped ``scope_gauges`` and the FUSE
view's ``ReadOnlyCatalog.scope_totals``, on random catalogues (missing vfolders and unmeasured ones included)."""

from __future__ import annotations

import asyncio
import random
import uuid
from pathlib import Path

from catalog import Catalog
from catalog.readonly import ReadOnlyCatalog
from catalog.report import scope_gauges
from catalog.scope_used import sum_ready


def test_every_reader_gives_a_scope_the_same_used_bytes(tmp_path: Path) -> None:
    seed = random.randrange(2**32)
    print(f"seed: {seed}")
    rng = random.Random(seed)

    async def main() -> None:
        cat = await Catalog.open(tmp_path / "c.db")
        view = ReadOnlyCatalog(tmp_path / "c.db")
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
                            if rng.random() < 0.25:  # its directory went: it counts no more
                                await cat.mark_vfolder_missing(vol, qsid, folder)
                        expected[(vol, qsid)] = limit
                gauges = {(g.volume, g.qsid): g for g in await scope_gauges(cat)}
                assert {k for k in gauges if k in expected} == set(expected)
                for (vol, qsid), g in gauges.items():
                    rows = await cat.vfolders(vol, qsid)
                    usage = {r.folder_id: await cat.get_usage(vol, qsid, r.folder_id) for r in rows}
                    allocated = {f: None if u is None else u.allocated_bytes for f, u in usage.items()}
                    rule = sum_ready(rows, allocated.__getitem__)
                    assert g.used_bytes == rule, (seed, vol, qsid)
                    assert await cat.scope_used_bytes(vol, qsid) == rule, (seed, vol, qsid)
                    assert view.scope_totals(vol, qsid).used_bytes == rule, (seed, vol, qsid)
                    row = await cat.get_quota_scope(vol, qsid)
                    assert row is not None and g.limit_bytes == row.limit_bytes
        finally:
            view.close()
            await cat.close()

    asyncio.run(main())
