"""The engine's catalogue writer host: the one writer of the HTTP workers' catalogue writes (num-proc = N).

A service of the engine process around :class:`catalog.remote.WriterHost` (the socket ``<catalogue>.writer``
beside the catalogue file). It also hands the usage engine the requests workers post to its mailbox
(:meth:`catalog.usage_store.UsageStore.request_rescan`: a vfolder created, cloned, deleted, or a refresh) the moment
they are written, so a new vfolder is measured at once rather than at the engine's next look (2 s).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from catalog.remote import WriterHost

if TYPE_CHECKING:
    from agent.runtime.context import Agent

MAILBOX_WRITES = frozenset({"UsageStore.request_rescan"})


def socket_path(catalog_path: Path) -> Path:
    return catalog_path.with_name(catalog_path.name + ".writer")


class CatalogueWriter:
    name = "catalogue writer host"

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.host = WriterHost(agent.catalog, socket_path(agent.config.catalog.path), on_write=self._written)

    async def start(self) -> None:
        await self.host.start()

    async def stop(self) -> None:
        await self.host.stop()

    def _written(self, name: str, _kwargs: dict[str, Any], _result: Any) -> None:
        if name in MAILBOX_WRITES:
            from agent.http.usage import engine_of

            engine = engine_of(self.agent)
            if engine is not None:
                engine.requests_posted()


def factory(agent: Agent) -> CatalogueWriter:
    return CatalogueWriter(agent)
