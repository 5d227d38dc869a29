"""Logging: one line per event, as text or JSON (``[logging] format``), to the drivers upstream names.

``[logging] drivers``: ``console`` (standard error) and ``file`` (upstream's ``[logging.file]`` path,
filename, rotation-size, backup-count: JSON lines, rotated by size) are served; ``logstash`` and
``graylog`` are accepted, and one warning says nothing is sent to them. ``pkg-ns`` sets loggers'
levels as upstream does; its ``ai.backend`` names mean the agent's own loggers.

Under ``num-proc = N`` every process names its role (``supervisor``, ``engine``, ``worker-<i>``, ``i`` as in
the ``X-Storage-Agent-Worker`` header) in each record: ``processName`` in the file's JSON, ``process`` in the
console's JSON, ``[role]`` in its text lines. The console lines go to the standard error every process
inherits; the file is written by the supervisor alone (agent/log_relay.py says how and why).
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import urllib.parse
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jwt
from aiohttp.http_exceptions import HttpProcessingError

from agent import log_relay

if TYPE_CHECKING:
    from agent.config import LoggingConfig


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
    """One JSON object per line. ``upstream=True`` (the file driver) uses the upstream proxy's field names and
    timestamp, so log shippers set up for the upstream proxy's files read these too."""

    def __init__(self, *, upstream: bool = False) -> None:
        super().__init__()
        self.upstream = upstream

    def format(self, record: logging.LogRecord) -> str:
        if self.upstream:
            data = {
                "timestamp": datetime.fromtimestamp(record.created, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
                "level": record.levelname,
                "name": record.name,
                "processName": record.processName,
                "message": record.getMessage(),
            }
        else:
            data = {
                "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
                "level": record.levelname,
                "logger": record.name,
                "msg": record.getMessage(),
            }
            role = getattr(record, "role", None)
            if role is not None:
                data["process"] = role
        if record.exc_info:
            data["exc_info" if self.upstream else "exc"] = self.formatException(record.exc_info)
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


_STYLES = {"verbose": "%(asctime)s %(levelname)s %(name)s: %(message)s", "simple": "%(levelname)s %(message)s"}
_ROLE_STYLES = {"verbose": "%(asctime)s %(levelname)s [%(processName)s] %(name)s: %(message)s",
                "simple": "%(levelname)s [%(processName)s] %(message)s"}
OWN_LOGGERS = ("agent", "backends", "catalog", "storage-agent")  # what upstream's "ai.backend" names here
UNSUPPORTED_DRIVERS = ("logstash", "graylog")


class Role(logging.Filter):
    """Names the process's role in every record its handlers see (``processName``)."""

    def __init__(self, role: str) -> None:
        super().__init__()
        self.role = role

    def filter(self, record: logging.LogRecord) -> bool:
        record.processName = record.role = self.role  # role: the JSON console's field
        return True


def _console(fmt: str, style: str = "verbose", role: str | None = None) -> logging.Handler:
    handler = logging.StreamHandler(sys.stderr)
    text = (_ROLE_STYLES if role else _STYLES)[style]
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter(text))
    return handler


def setup(level: str = "INFO", fmt: str = "text") -> None:
    """Standard error only (the sub-commands, and the view process that serve starts)."""
    _install([_console(fmt)], level.upper())


def _install(handlers: list[logging.Handler], level: str) -> None:
    root = logging.getLogger()
    for old in root.handlers:
        if old not in handlers:
            old.close()
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    server_log = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, BadRequestHeads) for f in server_log.filters):
        server_log.addFilter(BadRequestHeads())


class Configured:
    """What :func:`configure` set up: files written (to hand over on a privilege drop), drivers not served."""

    def __init__(self) -> None:
        self.files: list[Path] = []
        self.created_dirs: list[Path] = []
        self.unsupported: list[str] = []
        self.file_handler: logging.Handler | None = None  # the file driver's writer, in the process that owns it


def configure(cfg: LoggingConfig, *, role: str | None = None, relay_fd: int | None = None) -> Configured:
    """``serve``'s logging from the whole ``[logging]`` table. Raises OSError when the log file cannot be
    opened (a start-up error naming the file, as upstream).

    ``role`` (num-proc = N) names this process in its records; ``relay_fd`` (a child of the supervisor): the
    file driver's records go to the supervisor through that socket instead of to the file."""
    out = Configured()
    level = cfg.level.upper()
    handlers: list[logging.Handler] = []
    if "console" in cfg.drivers:
        handlers.append(_console(cfg.format, cfg.console.format, role))
    if "file" in cfg.drivers and cfg.file is not None and relay_fd is not None:
        handler = log_relay.RelayHandler(relay_fd, role or "child")
        handler.setFormatter(JsonFormatter(upstream=True))
        handlers.append(handler)
    elif "file" in cfg.drivers and cfg.file is not None:
        where = cfg.file.path
        missing = [p for p in (where, *where.parents) if not p.exists()]
        where.mkdir(parents=True, exist_ok=True)  # upstream creates the directory too
        out.created_dirs = list(reversed(missing))
        owned = log_relay.OwnedFile(
            where / cfg.file.filename, maxBytes=cfg.file.rotation_size, backupCount=cfg.file.backup_count,
            encoding="utf-8",
        )
        owned.setFormatter(JsonFormatter(upstream=True))
        handlers.append(owned)
        out.files.append(where / cfg.file.filename)
        out.file_handler = owned
    out.unsupported = [d for d in UNSUPPORTED_DRIVERS if d in cfg.drivers]
    if not handlers:  # only drivers this agent cannot feed: standard error rather than nowhere
        handlers.append(_console(cfg.format, cfg.console.format, role))
    for h in handlers:
        h.setLevel(level)
        if role:
            h.addFilter(Role(role))
    _install(handlers, level)
    for name, ns_level in sorted(cfg.pkg_ns.items(), key=lambda kv: len(kv[0])):
        if name == "":
            logging.getLogger().setLevel(ns_level.upper())
        elif name == "ai.backend" or name.startswith("ai.backend."):
            for own in OWN_LOGGERS:
                logging.getLogger(own).setLevel(ns_level.upper())
        else:
            logging.getLogger(name).setLevel(ns_level.upper())
    return out
