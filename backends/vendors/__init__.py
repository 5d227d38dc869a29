"""Vendor appliance backends: file operations on the mount, quotas and figures over the vendor's REST API."""

from __future__ import annotations

from backends.base import Volume
from backends.vendors.gpfs import GpfsVolume
from backends.vendors.netapp import NetappVolume
from backends.vendors.onefs import OnefsVolume
from backends.vendors.purestorage import PureVolume
from backends.vendors.weka import WekaVolume

VENDOR_BACKENDS: dict[str, type[Volume]] = {
    "gpfs": GpfsVolume,
    "spectrumscale": GpfsVolume,  # the name 23.03.4 configs use
    "netapp": NetappVolume,
    "purestorage": PureVolume,
    "dellemc-onefs": OnefsVolume,
    "weka": WekaVolume,
}

__all__ = ["VENDOR_BACKENDS"]
