"""Logging: one line per event, as text or JSON (``[logging] format``)."""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import urllib.parse
from typing import Any

import jwt
from aiohttp.http_exceptions import HttpProcessingError

# a client-API token is a bearer credential valid for a day: it must never reach the journal
_TOKEN_VALUE = re.compile(r"(token=)(?!<)[^&\s'\"]+", re.IGNORECASE)
_SHOWN_CLAIMS = ("op", "vfid", "exp")


def redact(text: str) -> str:
    """``text`` with the value of every ``token=...`` replaced (URLs quoted in messages and tracebacks)."""
    return _TOKEN_VALUE.sub(r"\1<redacted>", text)


def describe_token(token: str) -> str:
    """What a log line may say of a token: its op, vfid and exp, read WITHOUT checking the signature."""
    try:
        claims: Any = jwt.decode(token, options={"verify_signature": False})
    except Exception:  # any garbage a client sends: it only has to be described, never trusted
        return "<token: unreadable>"
    if not isinstance(claims, dict):
        return "<token: unreadable>"
    shown = " ".join(f"{k}={claims.get(k)!r:.80}" for k in _SHOWN_CLAIMS)
    return f"<token, unverified claims: {shown}>"


def request_target(path: str, raw_query: str) -> str:
    """A request's path and query for the log, each ``token`` replaced by :func:`describe_token`."""
    if not raw_query:
        return path
    parts = []
    for item in raw_query.split("&"):
        key, eq, value = item.partition("=")
        if eq and urllib.parse.unquote_plus(key).lower() == "token":
            item = f"{key}={describe_token(urllib.parse.unquote_plus(value))}"
        parts.append(item)
    return f"{path}?{'&'.join(parts)}"


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return redact(json.dumps(data))


class BadRequestHeads(logging.Filter):
    """aiohttp logs a malformed request head (a line too long, bad bytes) with a traceback although it is
    the client's fault and answered with a 400: one line naming the problem is enough."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError) and (exc.code or 400) < 500:
            record.args = (record.getMessage(), exc.code, exc.message)
            record.msg = "%s: malformed request (%d): %.200s"
            record.exc_info = None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


def setup(level: str = "INFO", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    server_log = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, BadRequestHeads) for f in server_log.filters):
        server_log.addFilter(BadRequestHeads())
