"""The one REST client every vendor backend uses: one aiohttp session per volume.

Why one place: timeouts, retries (5xx and transport errors only, with
exponential back-off), credential renewal on 401 and the wording of errors
are the same concern for every appliance. Vendor modules only say which
calls to make and how their appliance words an error.
"""

from __future__ import annotations

import asyncio
import base64
import json as jsonlib
import logging
import ssl
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from backends.errors import ExternalError

log = logging.getLogger(__name__)

JSON = Any


class ApplianceError(ExternalError):
    """An appliance refused or failed a call; ``str()`` names the appliance and the operation."""

    def __init__(self, msg: str, status: int | None = None, body: JSON = None) -> None:
        super().__init__(msg)
        self.status = status
        self.body = body


@dataclass(frozen=True)
class Reply:
    status: int
    headers: Mapping[str, str]
    body: JSON  # parsed JSON, else the text (or "" when empty)

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


class Auth:
    """How a request is authenticated. ``renewable`` auths get one :meth:`renew` and a retry on 401."""

    renewable = False

    async def headers(self, client: RestClient, op: str) -> dict[str, str]:
        return {}

    async def renew(self, client: RestClient, op: str) -> None:
        return None


class BasicAuth(Auth):
    def __init__(self, user: str, password: str) -> None:
        self._header = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()

    async def headers(self, client: RestClient, op: str) -> dict[str, str]:
        return {"Authorization": self._header}


def ssl_setting(verify: bool, ca_file: str | None) -> ssl.SSLContext | bool:
    """``False`` turns verification off (appliances often ship self-signed certificates)."""
    if not verify:
        return False
    return ssl.create_default_context(cafile=ca_file) if ca_file else True


def default_error_text(body: JSON) -> str:
    """The message out of the usual error shapes (``message``, ``error.message``, ``errors[].message``)."""
    if isinstance(body, dict):
        for key in ("message", "msg", "detail"):
            if isinstance(body.get(key), str) and body[key]:
                return body[key]
        for key in ("error", "status"):
            inner = body.get(key)
            if isinstance(inner, dict) and isinstance(inner.get("message"), str):
                return inner["message"]
            if isinstance(inner, str) and inner:
                return inner
        errors = body.get("errors")
        if isinstance(errors, list) and errors and isinstance(errors[0], dict):
            return str(errors[0].get("message", errors[0]))
    text = str(body or "").strip()
    return text[:300] if text else "no details given"


RETRY_EXCEPTIONS = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, asyncio.TimeoutError)


class RestClient:
    """Calls ``base_url + path``; ``call`` raises :class:`ApplianceError` for answers it was not told to accept."""

    def __init__(
        self,
        appliance: str,
        base_url: str,
        *,
        auth: Auth | None = None,
        verify_ssl: bool = True,
        ca_file: str | None = None,
        timeout: float = 30.0,
        retries: int = 3,
        backoff: float = 0.5,
        error_text: Callable[[JSON], str] = default_error_text,
    ) -> None:
        self.appliance = appliance
        self.base_url = base_url.rstrip("/")
        self.auth = auth or Auth()
        self.ssl = ssl_setting(verify_ssl, ca_file)
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.error_text = error_text
        self._session: aiohttp.ClientSession | None = None

    @property
    def label(self) -> str:
        return f"{self.appliance} ({self.base_url})"

    async def open(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                connector=aiohttp.TCPConnector(ssl=self.ssl, limit=16),
            )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def fail(self, op: str, reply: Reply) -> ApplianceError:
        return ApplianceError(
            f"{self.label}: {op} failed: HTTP {reply.status}: {self.error_text(reply.body)}", reply.status, reply.body
        )

    async def call(
        self,
        method: str,
        path: str,
        *,
        op: str,
        params: Mapping[str, Any] | Iterable[tuple[str, Any]] | None = None,
        json: JSON = None,
        data: Any = None,
        headers: Mapping[str, str] | None = None,
        accept: Iterable[int] = (),
        auth: bool = True,
    ) -> Reply:
        """One logical call: retried on 5xx / transport errors, re-authenticated once on 401."""
        if self._session is None:
            raise ApplianceError(f"{self.label}: {op} failed: the volume's REST session is not open")
        accepted = set(accept)
        attempt = 0
        renewed = False
        while True:
            hdrs = dict(headers or {})
            if auth:
                hdrs.update(await self.auth.headers(self, op))
            try:
                async with self._session.request(
                    method, self.base_url + path, params=params, json=json, data=data, headers=hdrs
                ) as resp:
                    reply = Reply(resp.status, resp.headers, await _body(resp))
            except aiohttp.ClientSSLError as e:
                raise ApplianceError(f"{self.label}: {op} failed: TLS error: {e}") from None
            except RETRY_EXCEPTIONS as e:
                if attempt < self.retries:
                    attempt += 1
                    log.warning("%s: %s: %s; retry %d/%d", self.label, op, _describe(e), attempt, self.retries)
                    await asyncio.sleep(self.backoff * 2 ** (attempt - 1))
                    continue
                raise ApplianceError(f"{self.label}: {op} failed: {_describe(e)} (after {attempt + 1} tries)") from None
            except aiohttp.ClientError as e:
                raise ApplianceError(f"{self.label}: {op} failed: {_describe(e)}") from None
            if reply.status >= 500 and reply.status not in accepted and attempt < self.retries:
                attempt += 1
                log.warning("%s: %s: HTTP %d; retry %d/%d", self.label, op, reply.status, attempt, self.retries)
                await asyncio.sleep(self.backoff * 2 ** (attempt - 1))
                continue
            if reply.status == 401 and auth and self.auth.renewable and not renewed:
                renewed = True
                log.info("%s: %s: credentials refused (401); renewing them", self.label, op)
                await self.auth.renew(self, op)
                continue
            if reply.ok or reply.status in accepted:
                return reply
            raise self.fail(op, reply)

    async def get(self, path: str, *, op: str, **kw: Any) -> Reply:
        return await self.call("GET", path, op=op, **kw)


async def _body(resp: aiohttp.ClientResponse) -> JSON:
    raw = await resp.read()
    if not raw:
        return ""
    text = raw.decode(resp.charset or "utf-8", errors="replace")
    if "json" in (resp.content_type or ""):
        try:
            return jsonlib.loads(text)
        except ValueError:
            return text
    return text


def _describe(e: BaseException) -> str:
    if isinstance(e, asyncio.TimeoutError):
        return "no answer within the request timeout"
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def field(body: JSON, *path: str | int, op: str, label: str) -> Any:
    """``body[path...]``, or an ApplianceError naming what the appliance's answer lacked."""
    cur = body
    for key in path:
        try:
            cur = cur[key]  # type: ignore[index]
        except (KeyError, IndexError, TypeError):
            shown = ".".join(str(k) for k in path)
            raise ApplianceError(f"{label}: {op}: unexpected answer (no {shown})", None, body) from None
    return cur
