"""Storage backends behind one volume interface (:mod:`backends.base`).

``backends`` never imports ``agent``; the agent builds volumes through
:func:`build_volume` from the names in its configuration.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from backends.base import Capability, Volume
from backends.btrfs import BtrfsVolume
from backends.cephfs import CephFSVolume
from backends.vendors import VENDOR_BACKENDS
from backends.vfs import VfsVolume
from backends.xfs import XfsVolume

BACKENDS: dict[str, type[Volume]] = {
    "vfs": VfsVolume,
    "btrfs": BtrfsVolume,
    "xfs": XfsVolume,
    "cephfs": CephFSVolume,
}
BACKENDS.update(VENDOR_BACKENDS)  # gpfs (alias spectrumscale), weka, netapp, purestorage, dellemc-onefs

# Names the storage-proxy configuration accepts; those not in BACKENDS yet are refused with a clear message.
KNOWN_NAMES = (
    "vfs",
    "xfs",
    "btrfs",
    "cephfs",
    "gpfs",
    "spectrumscale",
    "netapp",
    "purestorage",
    "dellemc-onefs",
    "weka",
)


class UnknownBackend(ValueError):
    pass


def build_volume(name: str, backend: str, path: Path, options: Mapping[str, Any]) -> Volume:
    try:
        cls = BACKENDS[backend]
    except KeyError:
        if backend in KNOWN_NAMES:
            raise UnknownBackend(f"backend {backend!r} is not available in this build of storage-agent") from None
        raise UnknownBackend(f"unknown backend {backend!r} (known: {', '.join(KNOWN_NAMES)})") from None
    return cls(name, path, options)


__all__ = ["BACKENDS", "KNOWN_NAMES", "Capability", "UnknownBackend", "Volume", "build_volume"]
