"""What every vendor appliance volume shares: option checking, the REST session's life, scope directories.

File operations go through the mounted filesystem (:class:`MountedVolume`);
only quotas, usage figures, health and metrics come from the appliance.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from backends.base import HwInfo
from backends.mounted import MountedVolume
from backends.vendors.rest import ApplianceError, Auth, RestClient

log = logging.getLogger(__name__)


class VendorOptions(BaseModel):
    """Options every appliance volume understands besides its vendor's own keys."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    request_timeout: float = Field(default=30.0, gt=0)
    request_retries: int = Field(default=3, ge=0, le=10)
    retry_backoff: float = Field(default=0.5, ge=0)
    ca_file: str | None = None


def _explain(e: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in e.errors())


class ApplianceVolume(MountedVolume):
    """A mounted volume whose quotas and figures live on a vendor appliance reached over REST."""

    appliance: ClassVar[str]
    Options: ClassVar[type[VendorOptions]]

    def __init__(self, name: str, root: Path, options: Mapping[str, Any]) -> None:
        super().__init__(name, root, options)
        try:
            self.opts = self.Options.model_validate(self.options)
        except ValidationError as e:
            raise ValueError(f"volume {name!r} ({self.backend}): invalid options: {_explain(e)}") from None
        self.client = self.make_client()
        self._ready = False
        self._ready_lock = asyncio.Lock()

    def make_client(self) -> RestClient:
        raise NotImplementedError

    def rest(self, base_url: str, auth: Auth | None, verify_ssl: bool, **kw: Any) -> RestClient:
        return RestClient(
            self.appliance,
            base_url,
            auth=auth,
            verify_ssl=verify_ssl,
            ca_file=self.opts.ca_file,
            timeout=self.opts.request_timeout,
            retries=self.opts.request_retries,
            backoff=self.opts.retry_backoff,
            **kw,
        )

    async def init(self) -> None:
        await self.client.open()
        try:
            await self.ready()
        except ApplianceError as e:
            log.warning("volume %s: %s (will try again on the next call)", self.name, e)

    async def shutdown(self) -> None:
        await self.client.close()

    async def ready(self) -> None:
        """Look up what later calls need (ids of the filesystem, volume, ...) once, on first success."""
        if self._ready:
            return
        async with self._ready_lock:
            if not self._ready:
                await self.discover()
                self._ready = True

    async def discover(self) -> None:
        return None

    # -- scope directories on the mount ------------------------------------------

    async def appliance_hwinfo(self) -> tuple[str, str | None, dict[str, str]]:
        """(status, status_info, metadata) from the appliance; override where the vendor reports health."""
        return "healthy", None, {}

    async def hwinfo(self) -> HwInfo:
        local = await super().hwinfo()
        meta = dict(local.metadata)
        meta["appliance"] = self.client.label
        if local.status != "healthy":
            return HwInfo(local.status, local.status_info, meta)
        try:
            await self.ready()
            status, info, extra = await self.appliance_hwinfo()
        except ApplianceError as e:
            return HwInfo("degraded", str(e), meta)
        meta.update(extra)
        return HwInfo(status, info, meta)


def rmdir_scope(path: Path) -> None:
    """Remove an (empty) scope directory the appliance left behind; gone already is fine."""
    try:
        os.rmdir(path)
    except FileNotFoundError:
        pass
