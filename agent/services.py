"""Background services that live beside the HTTP listeners for the whole run of ``serve``.

Each feature that needs a long-running task (the usage engine, the upload
sweeper, the FUSE view supervisor, ...) provides a :class:`Service`; the server
starts them after reconciliation, in order, and stops them in reverse order.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from agent.context import Agent


class Service(Protocol):
    name: str

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


ServiceFactory = Callable[["Agent"], "Service | None"]


def factories() -> list[ServiceFactory]:
    """The services ``serve`` runs; a factory returns None when its feature is disabled by config."""
    from agent import memory_trim, usage
    from agent.uploads import sweeper  # imported here: agent.uploads needs the context this module helps define
    from agent.view import supervisor as view_supervisor

    return [usage.factory, sweeper, view_supervisor.factory, memory_trim.factory]
