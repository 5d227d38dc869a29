"""Backends that know usage themselves (``fast-size``) are polled through the volume interface, not walked
or watched. The volume here is a real vfs volume on a real directory whose own report is its tree usage."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from pathlib import Path

from agent.config import validate
from agent.engine.usage import UsageEngine
from agent.http import usage
from agent.runtime.context import Agent
from backends.base import Capability
from backends.ids import VFolderID
from backends.vfs import VfsVolume
from backends.walk import TreeUsage
from catalog import Catalog
from tests.support import make_agent


class ReportingVolume(VfsVolume):
    """A volume that reports usage itself, as btrfs qgroups or a vendor quota API would."""

    capabilities = VfsVolume.capabilities | {Capability.FAST_SIZE}

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.reports = 0

    async def fast_usage(self, vfid: VFolderID) -> TreeUsage | None:
        self.reports += 1
        return await self.tree_usage(vfid)


def test_fast_backends_are_polled_and_never_walked_by_the_engine(tmp_path: Path) -> None:
    proc = make_agent(tmp_path / "agent", usage={"fast-poll-interval": 0.2})
    config = validate(proc.config, "test config")

    async def main() -> None:
        catalog = await Catalog.open(config.catalog.path)
        vol = ReportingVolume("local", proc.volume_root(), {})
        await vol.init()
        qsid = f"qs-{uuid.uuid4().hex[:6]}"
        await vol.quota.create(qsid, None)
        vfid = VFolderID(qsid, uuid.uuid4())
        await vol.create_vfolder(vfid)
        await catalog.add_vfolder("local", qsid, vfid.hex)
        agent = Agent(config=config, catalog=catalog, volumes={"local": vol})
        engine = UsageEngine(agent, config.usage)
        await engine.start()
        agent.services.append(engine)
        try:
            first = await usage.get(agent, vol, vfid)
            assert (first.file_count, first.used_bytes, first.source) == (0, 0, "fast")
            (vol.vfolder_path(vfid) / "data").write_bytes(os.urandom(4096))
            deadline = time.monotonic() + 10
            while (await usage.get(agent, vol, vfid)).used_bytes != 4096:
                assert time.monotonic() < deadline, "the polled figure never followed the write"
                await asyncio.sleep(0.05)
            assert engine.describe()["directories"] == 0  # no tree kept: nothing walked by the engine
            assert vol.reports >= 2
            row = await catalog.get_usage("local", qsid, vfid.hex)
            assert row is not None and row.source == "fast"
        finally:
            await engine.stop()
            await catalog.close()

    asyncio.run(main())
