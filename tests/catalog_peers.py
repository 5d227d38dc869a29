"""The processes of tests/test_catalog_remote.py: an engine-like writer host and worker-like writers.

    python -m tests.catalog_peers host DB SOCKET
        opens DB writable (upgrade, WAL), serves it with WriterHost on SOCKET, prints "ready", runs until
        SIGTERM (then stops the host and closes the catalogue) or SIGKILL
    python -m tests.catalog_peers writer DB SOCKET NAME COUNT
        opens DB with Catalog.open_remote and makes COUNT rounds of writes (vfolder, usage, upload session,
        metadata, rescan request), yielding between them so two writers interleave; prints one JSON line:
        what each write returned
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from pathlib import Path

from catalog import Catalog
from catalog.remote import WriterHost
from catalog.usage_store import UsageStore

VOLUME, QSID = "vol1", "qs1"


async def host(db: Path, sock: Path) -> None:
    catalog = await Catalog.open(db)
    await catalog.add_quota_scope(VOLUME, QSID, None)
    writes: list[str] = []
    server = WriterHost(catalog, sock, on_write=lambda name, _kwargs, _result: writes.append(name))
    await server.start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print("ready", flush=True)
    await stop.wait()
    await server.stop()
    await catalog.close()
    print(json.dumps({"calls": server.calls, "refused": server.refused, "hooked": len(writes)}), flush=True)


async def writer(db: Path, sock: Path, name: str, count: int) -> None:
    catalog = await Catalog.open_remote(db, sock, wait=30.0)
    usage = UsageStore(catalog.db)
    out: dict[str, list[object]] = {"added": [], "sessions": [], "seen": []}
    for i in range(count):
        folder = f"{name}-{i:04d}"
        out["added"].append(await catalog.add_vfolder(VOLUME, QSID, folder))
        await catalog.put_usage(VOLUME, QSID, folder, used_bytes=i, file_count=i + 1, allocated_bytes=4096 * i,
                                source="scan")
        row = await catalog.create_upload_session(VOLUME, QSID, folder, f"{name}/{i}", i, time.time() + 3600)
        out["sessions"].append(row.session_id)
        await catalog.set_metadata(VOLUME, QSID, folder, json.dumps({"writer": name, "i": i}))
        await usage.request_rescan((VOLUME, QSID, folder))
        # what this process reads back at once (WAL: the host's commit is visible to a new read)
        seen = await catalog.get_usage(VOLUME, QSID, folder)
        out["seen"].append(None if seen is None else seen.file_count)
        await asyncio.sleep(0)
    await catalog.close()
    print(json.dumps(out), flush=True)


def main() -> None:
    role, db, sock = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    if role == "host":
        asyncio.run(host(db, sock))
    else:
        asyncio.run(writer(db, sock, sys.argv[4], int(sys.argv[5])))


if __name__ == "__main__":
    main()
