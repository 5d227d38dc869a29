"""What every vendor appliance volume shares: option checking, the REST session's life, scope directories.

File operations go through the mounted filesystem (:class:`MountedVolume`);
only quotas, usage figures, health and metrics come from the appliance.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from backends.base import HwInfo, QuotaModel
from backends.mounted import MountedVolume
from backends.vendors.rest import ApplianceError, Auth, BasicAuth, RestClient

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


@dataclass(frozen=True)
class RestTarget:
    """Which of a vendor's options say where its REST API is; the base builds the client from them.

    Names, not values: the options are only validated per volume, and each vendor spells its keys its own way.
    """

    endpoint: str  # option holding the appliance's URL
    path: str  # the API's root under it; ``{option}`` placeholders are filled from the options
    verify_ssl: str  # option turning certificate checks on
    basic_auth: tuple[str, str] | None = None  # (user option, password option); else the volume overrides ``auth``


class ApplianceQuotaModel(QuotaModel):
    """A quota model that asks its volume's appliance."""

    def __init__(self, volume: Any) -> None:
        self.v = volume


class QuotaModelClass(Protocol):
    """A quota model's class: called with the volume it serves."""

    def __call__(self, volume: Any, /) -> QuotaModel: ...


class ApplianceVolume(MountedVolume):
    """A mounted volume whose quotas and figures live on a vendor appliance reached over REST."""

    appliance: ClassVar[str]
    Options: ClassVar[type[VendorOptions]]
    target: ClassVar[RestTarget]
    quota_model: ClassVar[QuotaModelClass]  # built once per volume, with the volume

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """A :class:`RestTarget` naming an option its ``Options`` lacks fails on import, not on a node."""
        super().__init_subclass__(**kwargs)
        t = cls.target
        named = [t.endpoint, t.verify_ssl, *(t.basic_auth or ()), *re.findall(r"{(\w+)}", t.path)]
        missing = [key for key in named if key not in cls.Options.model_fields]
        if missing:
            raise TypeError(f"{cls.__name__}.target names options {cls.Options.__name__} lacks: {missing}")

    def __init__(self, name: str, root: Path, options: Mapping[str, Any]) -> None:
        super().__init__(name, root, options)
        try:
            self.opts = self.Options.model_validate(self.options)
        except ValidationError as e:
            raise ValueError(f"volume {name!r} ({self.backend}): invalid options: {_explain(e)}") from None
        self.client = self.make_client()
        self._quota = self.quota_model(self)
        self._ready = False
        self._ready_lock = asyncio.Lock()

    @property
    def quota(self) -> QuotaModel:
        return self._quota

    def option(self, key: str) -> Any:
        value = getattr(self.opts, key)
        return value.get_secret_value() if isinstance(value, SecretStr) else value

    def auth(self) -> Auth:
        """Basic auth from the options :attr:`target` names; vendors with sessions or tokens override it."""
        if self.target.basic_auth is None:
            raise NotImplementedError(f"{type(self).__name__} names no basic_auth options and has no auth()")
        user, password = self.target.basic_auth
        return BasicAuth(self.option(user), self.option(password))

    def make_client(self) -> RestClient:
        t, o = self.target, self.opts
        path = t.path.format_map({k: getattr(o, k) for k in type(o).model_fields})
        return RestClient(
            self.appliance,
            self.option(t.endpoint).rstrip("/") + path,
            auth=self.auth(),
            verify_ssl=self.option(t.verify_ssl),
            ca_file=o.ca_file,
            timeout=o.request_timeout,
            retries=o.request_retries,
            backoff=o.retry_backoff,
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
