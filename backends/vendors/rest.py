"""The one REST client every vendor backend uses: one aiohttp session per volume.

Why one place: timeouts, retries (5xx and transport errors only, with
exponential back-off, and never where a repeat could apply a change twice),
credential renewal on 401, the checked reading of answers and the wording of
errors are the same concern for every appliance. Vendor modules only say which
calls to make, what they read from the answers and how their appliance words
an error.
"""

from __future__ import annotations

import asyncio
import base64
import json as jsonlib
import logging
import math
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
# The TCP connection was never made, so the appliance saw nothing: safe to repeat even a POST.
NOT_SENT_EXCEPTIONS = (aiohttp.ClientConnectorError,)
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})


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

    def fields(self, op: str) -> Fields:
        """The checked accessors bound to this appliance and ``op``, for reading one operation's answers."""
        return Fields(self.label, op)

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
        idempotent: bool | None = None,
    ) -> Reply:
        """One logical call, re-authenticated once on 401 and retried only where a repeat cannot do harm.

        Why the care: an appliance may apply a POST and still answer 5xx or too late; a repeat would then
        act twice (OneFS answers the second quota create with 409). So 5xx and timeouts are retried only
        for idempotent calls (GET, HEAD, PUT, DELETE, or ``idempotent=True``); any call is repeated when
        the connection could not be made at all.
        """
        if self._session is None:
            raise ApplianceError(f"{self.label}: {op} failed: the volume's REST session is not open")
        accepted = set(accept)
        safe = method.upper() in IDEMPOTENT_METHODS if idempotent is None else idempotent
        request = {"params": params, "json": json, "data": data}
        attempt = 0
        renewed = False
        while True:
            try:
                reply = await self._send(method, path, op, request, headers, auth)
            except RETRY_EXCEPTIONS as e:
                repeatable = safe or isinstance(e, NOT_SENT_EXCEPTIONS)
                if not repeatable or attempt >= self.retries:
                    raise self._transport_failure(op, e, attempt, repeatable) from None
                attempt = await self._pause(op, _describe(e), attempt)
                continue
            if reply.status >= 500 and reply.status not in accepted and safe and attempt < self.retries:
                attempt = await self._pause(op, f"HTTP {reply.status}", attempt)
                continue
            if reply.status == 401 and auth and self.auth.renewable and not renewed:
                renewed = True
                log.info("%s: %s: credentials refused (401); renewing them", self.label, op)
                await self.auth.renew(self, op)
                continue
            if reply.ok or reply.status in accepted:
                return reply
            raise self.fail(op, reply)

    async def _send(
        self, method: str, path: str, op: str, request: dict[str, Any], headers: Mapping[str, str] | None, auth: bool
    ) -> Reply:
        """One HTTP exchange; transport errors worth a retry propagate, the others become ApplianceError."""
        assert self._session is not None
        hdrs = dict(headers or {})
        if auth:
            hdrs.update(await self.auth.headers(self, op))
        try:
            async with self._session.request(method, self.base_url + path, headers=hdrs, **request) as resp:
                return Reply(resp.status, resp.headers, await _body(resp))
        except aiohttp.ClientSSLError as e:
            raise ApplianceError(f"{self.label}: {op} failed: TLS error: {e}") from None
        except RETRY_EXCEPTIONS:
            raise
        except aiohttp.ClientError as e:
            raise ApplianceError(f"{self.label}: {op} failed: {_describe(e)}") from None

    def _transport_failure(self, op: str, e: BaseException, attempt: int, repeatable: bool) -> ApplianceError:
        if repeatable:
            return ApplianceError(f"{self.label}: {op} failed: {_describe(e)} (after {attempt + 1} tries)")
        return ApplianceError(
            f"{self.label}: {op} failed: {_describe(e)} (not retried: the appliance may have applied it)"
        )

    async def _pause(self, op: str, why: str, attempt: int) -> int:
        """Log, back off exponentially, and return the next attempt number."""
        attempt += 1
        log.warning("%s: %s: %s; retry %d/%d", self.label, op, why, attempt, self.retries)
        await asyncio.sleep(self.backoff * 2 ** (attempt - 1))
        return attempt

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


_REQUIRED: Any = object()
_KIND_NAMES: dict[type, str] = {dict: "an object", list: "a list", str: "text"}


def _shown(path: tuple[str | int, ...]) -> str:
    return ".".join(str(k) for k in path) if path else "the answer"


def _kind(value: Any) -> str:
    """How a value looks, for a message: ``text 'Bad Gateway'``, ``a list``, ``null``, ..."""
    if isinstance(value, str):
        return f"text {value[:60]!r}" if value else "empty"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    return "null" if value is None else repr(value)[:60]


def _unexpected(label: str, op: str, problem: str, body: JSON) -> ApplianceError:
    return ApplianceError(f"{label}: {op}: unexpected answer ({problem})", None, body)


def field(body: JSON, *path: str | int, op: str, label: str, kind: type | None = None, default: Any = _REQUIRED) -> Any:
    """``body[path...]`` checked: a missing member or one of the wrong shape is an ApplianceError (a clean 502).

    Why: appliances (and proxies before them) answer in shapes nobody promised - ``{}``, an HTML error
    page, a list where an object was due; indexing such an answer directly gives a KeyError or TypeError
    that reaches the manager as a bare 500. ``default`` stands in for a member that is absent or null
    (never for one of the wrong kind); ``kind`` (dict, list or str) checks what was found.
    """
    cur = body
    for depth, key in enumerate(path):
        want = list if isinstance(key, int) else dict
        if not isinstance(cur, want):
            if cur is None and depth and default is not _REQUIRED:
                return default
            problem = f"{_shown(path[:depth])} is {_kind(cur)}, not {_KIND_NAMES[want]}"
            raise _unexpected(label, op, problem, body)
        try:
            cur = cur[key]  # type: ignore[index]
        except (KeyError, IndexError):
            if default is not _REQUIRED:
                return default
            raise _unexpected(label, op, f"no {_shown(path[: depth + 1])}", body) from None
    if cur is None and default is not _REQUIRED:
        return default
    if kind is not None and not isinstance(cur, kind):
        problem = f"{_shown(path)} is {_kind(cur)}, not {_KIND_NAMES.get(kind, kind.__name__)}"
        raise _unexpected(label, op, problem, body)
    return cur


def objects(body: JSON, *path: str | int, op: str, label: str) -> list[dict[str, Any]]:
    """:func:`field` that must be a list of JSON objects (records, items, nodes, ...), each checked."""
    items = field(body, *path, op=op, label=label, kind=list)
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise _unexpected(label, op, f"{_shown((*path, i))} is {_kind(item)}, not an object", body)
    return items


def number(
    body: JSON, *path: str | int, op: str, label: str, cast: Callable[[Any], Any] = int, default: Any = _REQUIRED
) -> Any:
    """:func:`field` read as ``cast`` (int or float) - a JSON number or a decimal string, as OneFS sends some.

    NaN and infinities (Python's JSON reader accepts them) are refused too: they cannot be passed on.
    """
    value = field(body, *path, op=op, label=label, default=default)
    if value is default:
        return value
    if isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            result = cast(value)
        except (ValueError, OverflowError):
            result = None
        if result is not None and (not isinstance(result, float) or math.isfinite(result)):
            return result
    raise _unexpected(label, op, f"{_shown(path)} is {_kind(value)}, not a number", body)


@dataclass(frozen=True)
class Fields:
    """:func:`field`, :func:`objects` and :func:`number` bound to one appliance and operation."""

    label: str
    op: str

    def field(self, body: JSON, *path: str | int, kind: type | None = None, default: Any = _REQUIRED) -> Any:
        return field(body, *path, op=self.op, label=self.label, kind=kind, default=default)

    def objects(self, body: JSON, *path: str | int) -> list[dict[str, Any]]:
        return objects(body, *path, op=self.op, label=self.label)

    def number(self, body: JSON, *path: str | int, cast: Callable[[Any], Any] = int, default: Any = _REQUIRED) -> Any:
        return number(body, *path, op=self.op, label=self.label, cast=cast, default=default)
