"""How another process tells the usage engine to look at a vfolder again: a mailbox and a doorbell.

The mailbox is the catalogue (``usage_vfolders.rescan_requested``, :meth:`catalog.Catalog.request_usage_rescan`):
durable, written in the same way as any other catalogue write, and what ``storage-agent scan`` has always
used. An HTTP worker posts there when a vfolder is created, cloned or deleted through it, and on
``POST /folder/usage/refresh``; the engine takes the requests and looks at each vfolder against the
catalogue (:meth:`UsageEngine._reconsider`). The doorbell only makes that prompt: one datagram to an
abstract Unix socket named after the catalogue's path, which the engine listens on; without it (the
engine restarting, or another agent of the same catalogue holding the name) the engine still finds the
requests within 2 s.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)


def address(catalog_path: str | Path) -> bytes:
    """The doorbell's abstract socket name for a catalogue (no file, gone with the process)."""
    digest = hashlib.sha256(os.fsencode(os.path.realpath(catalog_path))).hexdigest()[:24]
    return b"\0storage-agent-usage-" + digest.encode()


class Bell:
    """The ringing side (an HTTP worker): fire and forget, never blocks."""

    def __init__(self, catalog_path: str | Path) -> None:
        self._address = address(catalog_path)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._sock.setblocking(False)

    def ring(self) -> None:
        with contextlib.suppress(OSError):  # nobody listening, or its queue full: it polls anyway
            self._sock.sendto(b"!", self._address)

    def close(self) -> None:
        self._sock.close()


class Doorbell:
    """The engine's side: ``on_ring`` is called on the event loop when at least one datagram arrived."""

    def __init__(self, sock: socket.socket, on_ring: Callable[[], None]) -> None:
        import asyncio

        self._sock = sock
        self._on_ring = on_ring
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(sock.fileno(), self._read)

    @classmethod
    def open(cls, catalog_path: str | Path, on_ring: Callable[[], None]) -> Doorbell | None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(address(catalog_path))
        except OSError as e:
            sock.close()
            log.info("usage engine: no doorbell (%s); requests of other processes are taken every 2 s", e.strerror)
            return None
        sock.setblocking(False)
        return cls(sock, on_ring)

    def _read(self) -> None:
        rang = False
        while True:
            try:
                self._sock.recv(64)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                break
            rang = True
        if rang:
            self._on_ring()

    def close(self) -> None:
        self._loop.remove_reader(self._sock.fileno())
        self._sock.close()
