"""Configuration: the upstream storage-proxy TOML, validated, plus the agent's own sections.

A config written for the upstream proxy loads unchanged and means the same; keys the agent accepts
but does not act on (``etcd``, ``event-loop``, ``logging.logstash``, …) are listed by ``check-config``
and logged once at start (:meth:`Config.no_effect_keys`). Relative paths of upstream keys (TLS files,
``pid-file``, the file log's ``path``) are relative to the config file's directory, as upstream
(which changes into that directory) reads them.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import re
import secrets
import socket
import ssl
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
)

from backends import BACKENDS

DEFAULT_CATALOG = Path("/var/lib/storage-agent/catalog.db")


class ConfigError(Exception):
    """A config that cannot be used; the message names the key and the problem."""


_SIZE_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40, "p": 2**50, "e": 2**60}
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_size(value: object) -> int:
    """'100g', '512m', '1T' (binary units, like the upstream proxy) or a plain integer."""
    if isinstance(value, bool):
        raise ValueError("must be a size such as 100g")
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgtpeb]?)(?:i?b)?\s*", str(value).lower())
    if not m:
        raise ValueError(f"{value!r} is not a size (use e.g. 100g, 512m or a number of bytes)")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2)])


def parse_duration(value: object) -> float:
    """'1d', '12h', '30m', '45s' or a number of seconds."""
    if isinstance(value, bool):
        raise ValueError("must be a duration such as 1d")
    if isinstance(value, int | float):
        return float(value)
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", str(value).lower())
    if not m:
        raise ValueError(f"{value!r} is not a duration (use e.g. 1d, 12h, 30m or seconds)")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2)]


Size = Annotated[int, BeforeValidator(parse_size), Field(ge=0)]
Duration = Annotated[float, BeforeValidator(parse_duration), Field(gt=0)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True, frozen=True)


def _user_id(value: object) -> int | None:
    """A user name or numeric id (an int or a digit string), as upstream; empty or -1 = not set."""
    if value is None or value == "" or value == -1 or value == "-1":
        return None
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError("must be a user name or a numeric uid")
    if isinstance(value, int) or value.isdigit():
        if int(value) < 0:
            raise ValueError("a uid is 0 or more")
        return int(value)
    try:
        return pwd.getpwnam(value).pw_uid
    except KeyError:
        raise ValueError(f"no such user {value!r} on this system") from None


def _group_id(value: object) -> int | None:
    """A group name or numeric id; a name that is not a group but a user means that user's primary
    group (the lookup upstream makes), so every value upstream accepts means the same here."""
    if value is None or value == "" or value == -1 or value == "-1":
        return None
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError("must be a group name or a numeric gid")
    if isinstance(value, int) or value.isdigit():
        if int(value) < 0:
            raise ValueError("a gid is 0 or more")
        return int(value)
    try:
        return grp.getgrnam(value).gr_gid
    except KeyError:
        pass
    try:
        return pwd.getpwnam(value).pw_gid
    except KeyError:
        raise ValueError(f"no such group {value!r} on this system") from None


class HostPort(_Section):
    host: str
    port: int = Field(ge=0, le=65535)


class StorageProxy(_Section):
    node_id: str = Field(default_factory=socket.gethostname, alias="node-id")
    secret: SecretStr = Field(min_length=1)
    session_expire: Duration = Field(default=86400.0, alias="session-expire")
    scandir_limit: int = Field(default=1000, ge=0, alias="scandir-limit")  # 0 = no limit, as upstream
    max_upload_size: Size = Field(default=100 * 2**30, alias="max-upload-size")
    # started as root, the agent switches to these after binding its ports (agent/runtime/privileges.py)
    user: Annotated[int | None, BeforeValidator(lambda v: _user_id(v))] = None
    group: Annotated[int | None, BeforeValidator(lambda v: _group_id(v))] = None
    pid_file: Path | None = Field(default=None, alias="pid-file")
    # the CPU that the agent's Python threads share (backends/cpu_placement.py): "auto", "off" or a number
    cpu_pin: Literal["auto", "off"] | Annotated[int, Field(ge=0)] = Field(default="auto", alias="cpu-pin")
    # HTTP worker processes sharing the API ports, beside one engine process (agent/runtime/supervisor.py);
    # 1: everything in one process, as before
    num_proc: int = Field(default=1, ge=1, le=256, alias="num-proc")
    # on SIGTERM/SIGINT, requests in flight get this long to end before they are cancelled (a cancelled
    # clone stops and rolls back, or is recorded if it was already published: agent/http/vfolders.py)
    stop_timeout: Duration = Field(default=60.0, alias="stop-timeout")


class Listener(_Section):
    service_addr: HostPort = Field(alias="service-addr")
    ssl_enabled: bool = Field(default=False, alias="ssl-enabled")
    ssl_cert: Path | None = Field(default=None, alias="ssl-cert")
    ssl_privkey: Path | None = Field(default=None, alias="ssl-privkey")
    # a connection that has not sent a whole request head this long after connecting or after its last
    # answer is closed: idle keep-alives and slow-loris clients cannot pile up (bodies being sent are not cut)
    idle_timeout: Duration = Field(default=75.0, alias="idle-timeout")


class ManagerListener(Listener):
    secret: SecretStr = Field(min_length=1)


class Api(_Section):
    client: Listener
    manager: ManagerListener


class VolumeConfig(_Section):
    backend: str
    path: Path
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("options")
    @classmethod
    def _usage_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        """The usage engine's per-volume options are checked here, not when the engine first reads them."""
        if options.get("usage-rescan-interval") is not None:
            parse_duration(options["usage-rescan-interval"])
        for flag in ("usage-watch", "usage-remote-writers"):
            if flag in options and not isinstance(options[flag], bool):
                raise ValueError(f"{flag} must be true or false")
        return options


class CatalogConfig(_Section):
    path: Path = DEFAULT_CATALOG


Level = Literal["NOTSET", "DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL", "debug", "info", "warning", "error",
                "critical"]
LogStyle = Literal["simple", "verbose"]


class ConsoleLog(_Section):
    """``[logging.console]`` (upstream): ``format`` simple or verbose; ``colored`` has no effect here."""

    colored: bool | None = None
    format: LogStyle = "verbose"


class FileLog(_Section):
    """``[logging.file]`` (upstream): ``path``/``filename``, rotated at ``rotation-size``, ``backup-count`` kept.

    Written as one JSON object per line whatever ``format`` says (upstream's file log is JSON too)."""

    path: Path
    filename: str = Field(min_length=1, pattern=r"^[^/]+$")
    backup_count: int = Field(default=5, ge=1, le=100, alias="backup-count")
    rotation_size: Size = Field(default=10 * 2**20, alias="rotation-size")
    format: LogStyle = "verbose"


class LoggingConfig(_Section):
    level: Level = "INFO"
    format: Literal["text", "json"] = "text"  # ours: the console's lines as text or JSON
    drivers: list[Literal["console", "file", "logstash", "graylog"]] = ["console"]
    pkg_ns: dict[str, Level] = Field(default_factory=dict, alias="pkg-ns")
    console: ConsoleLog = ConsoleLog()
    file: FileLog | None = None
    logstash: dict[str, Any] | None = None
    graylog: dict[str, Any] | None = None


class MetricsConfig(_Section):
    """``[metrics]`` (ours): ``GET /metrics`` also on its own listener, without the manager secret."""

    service_addr: HostPort | None = Field(default=None, alias="service-addr")


class UsageConfig(_Section):
    """``[usage]``: the live usage engine (per-volume ``usage-rescan-interval`` / ``usage-watch`` options too)."""

    enabled: bool = True
    watcher: Literal["auto", "fanotify", "inotify", "none"] = "auto"
    coalesce: float = Field(default=0.05, ge=0, le=10)  # seconds a burst of events is gathered before a re-read
    first_answer_wait: float = Field(default=3.0, ge=0, le=60, alias="first-answer-wait")
    scan_concurrency: int = Field(default=2, ge=1, le=64, alias="scan-concurrency")  # vfolders scanned at once
    scan_threads: int = Field(default=0, ge=0, le=64, alias="scan-threads")  # 0 = picked from the CPU count
    fast_poll_interval: Duration = Field(default=10.0, alias="fast-poll-interval")
    fallback_rescan_interval: Duration = Field(default=300.0, alias="fallback-rescan-interval")
    # volumes on a filesystem other nodes write to (NFS, GPFS, FUSE, ...): rescanned this often, with this
    # many directory reads in flight per scan (latency-bound: a network round trip each)
    remote_rescan_interval: Duration = Field(default=60.0, alias="remote-rescan-interval")
    remote_scan_threads: int = Field(default=16, ge=1, le=128, alias="remote-scan-threads")
    # after a (re)start the last figures are served flagged stale; their rescans may wait this long for the
    # node to settle first (a vfolder never measured is scanned at once)
    startup_rescan_delay: float = Field(default=0.0, ge=0, le=3600, alias="startup-rescan-delay")


class ViewConfig(_Section):
    """``[view]``: the read-only FUSE view, mounted by ``storage-agent view`` (spawned by ``serve`` when enabled)."""

    enabled: bool = False
    mount_root: Path = Field(default=Path("/mnt/storage-agent"), alias="mount-root")
    scopes: Literal["*"] | list[Annotated[str, Field(pattern=r"^[A-Za-z0-9]+(?:[_-][A-Za-z0-9]+)*$")]] = "*"

    def shows(self, qsid: str) -> bool:
        return self.scopes == "*" or qsid in self.scopes


# Backends of later upstream lines that this agent does not implement: such a volume is accepted and not
# served (an ERROR at start names it), so that upstream's sample configs of those lines load too.
UPSTREAM_ONLY_BACKENDS = ("kmanila", "vast", "exascaler")


class Config(_Section):
    storage_proxy: StorageProxy = Field(alias="storage-proxy")
    api: Api
    volume: dict[str, VolumeConfig] = Field(min_length=1)
    _unsupported: dict[str, str] = PrivateAttr(default_factory=dict)  # volume name -> its upstream-only backend
    catalog: CatalogConfig = CatalogConfig()
    logging: LoggingConfig = LoggingConfig()
    usage: UsageConfig = UsageConfig()
    view: ViewConfig = ViewConfig()
    metrics: MetricsConfig = MetricsConfig()
    debug: dict[str, Any] = Field(default_factory=dict)

    def ignored_keys(self) -> list[str]:
        """Dotted names of keys present in the file that the agent does not know at all."""
        return sorted(_extras(self, ""))

    def no_effect_keys(self) -> list[str]:
        """Every key present in the file that is accepted but changes nothing here: unknown keys, and the
        upstream keys the agent knows but does not act on (drivers it lacks, the console's colours, ...)."""
        found = set(_extras(self, ""))
        log = self.logging
        fields_set = log.model_fields_set
        for driver in ("logstash", "graylog"):
            if driver in log.drivers:
                found.add(f"logging.drivers[{driver}] (not supported: nothing is sent)")
            if driver in fields_set:
                found.add(f"logging.{driver}")
        if "colored" in log.console.model_fields_set:
            found.add("logging.console.colored")
        if log.file is not None and "file" not in log.drivers:
            found.add("logging.file (the file driver is not in logging.drivers)")
        elif log.file is not None and "format" in log.file.model_fields_set:
            found.add("logging.file.format")
        found |= {f"debug.{k}" for k in self.debug}
        found |= {f"volume.{n} (backend {b!r} is not supported by storage-agent: not served)"
                  for n, b in self._unsupported.items()}
        return sorted(found | set(self._unused_options()))

    @property
    def unsupported_volumes(self) -> dict[str, str]:
        """Volumes of an upstream-only backend (name -> backend), left out of :attr:`volume`."""
        return dict(self._unsupported)

    def _unused_options(self) -> list[str]:
        """``volume.NAME.options.KEY`` for options an appliance backend does not read (e.g. upstream's
        ``netapp_xcp_cmd``). Other backends' options are free-form and not listed."""
        out = []
        for name, vc in self.volume.items():
            model = getattr(BACKENDS.get(vc.backend), "Options", None)
            if model is None:
                continue
            known = set(model.model_fields) | {"usage-watch", "usage-rescan-interval"}  # read by the usage engine
            for f in model.model_fields.values():
                alias = f.validation_alias
                known |= {a for a in getattr(alias, "choices", [alias]) if isinstance(a, str)}
            out += [f"volume.{name}.options.{k}" for k in vc.options if k not in known]
        return out


def _extras(model: BaseModel, prefix: str) -> set[str]:
    found = {f"{prefix}{k}" for k in (model.model_extra or {})}
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        key = f"{prefix}{field.alias or name}."
        if isinstance(value, BaseModel):
            found |= _extras(value, key)
        elif isinstance(value, dict):
            for k, v in value.items():
                if isinstance(v, BaseModel):
                    found |= _extras(v, f"{key}{k}.")
    return found


def _describe(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "missing":
            msg = "is required but missing"
        lines.append(f"{loc}: {msg}")
    return "; ".join(lines)


def validate(data: dict[str, Any], source: str) -> Config:
    volumes = data.get("volume")
    unsupported: dict[str, str] = {}
    if isinstance(volumes, dict):
        unsupported = {n: v["backend"] for n, v in volumes.items()
                       if isinstance(v, dict) and v.get("backend") in UPSTREAM_ONLY_BACKENDS}
        if unsupported and len(unsupported) == len(volumes):
            raise ConfigError(f"{source}: volume: no volume this agent can serve (backend(s) "
                              f"{', '.join(sorted(set(unsupported.values())))} are not supported by storage-agent)")
        data = {**data, "volume": {n: v for n, v in volumes.items() if n not in unsupported}}
    try:
        config = Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{source}: {_describe(e)}") from None
    config._unsupported.update(unsupported)
    for name, listener in (("api.client", config.api.client), ("api.manager", config.api.manager)):
        if listener.ssl_enabled and not (listener.ssl_cert and listener.ssl_privkey):
            raise ConfigError(f"{source}: {name}.ssl-enabled is true but ssl-cert and ssl-privkey are not both set")
        if listener.ssl_enabled:
            try:  # a missing or broken key pair is a config error naming the keys, not a crash at bind time
                ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
                    str(listener.ssl_cert), str(listener.ssl_privkey)
                )
            except (OSError, ssl.SSLError) as e:
                raise ConfigError(
                    f"{source}: {name}.ssl-cert / {name}.ssl-privkey: cannot be loaded: {e.strerror or e}"
                ) from None
    for name, vol in config.volume.items():
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
            raise ConfigError(f"{source}: volume.{name}: volume names are letters, digits, '.', '_' and '-'")
        if vol.backend not in BACKENDS:
            known = ", ".join(sorted(BACKENDS))
            raise ConfigError(f"{source}: volume.{name}.backend: unknown or unavailable backend {vol.backend!r} "
                              f"(available: {known})")
        if not vol.path.is_absolute():
            raise ConfigError(f"{source}: volume.{name}.path: must be an absolute path, got {str(vol.path)!r}")
    if "file" in config.logging.drivers and config.logging.file is None:
        raise ConfigError(f"{source}: logging.file: the file driver is in logging.drivers but [logging.file] "
                          "(path, filename) is missing")
    if not config.view.mount_root.is_absolute():
        raise ConfigError(f"{source}: view.mount-root: must be an absolute path, got {str(config.view.mount_root)!r}")
    for name, vol in config.volume.items() if config.view.enabled else ():
        # walks of a volume must never enter the view's mount (a stopped view would hang them), nor the reverse
        if config.view.mount_root.is_relative_to(vol.path) or vol.path.is_relative_to(config.view.mount_root):
            raise ConfigError(f"{source}: view.mount-root: {str(config.view.mount_root)!r} overlaps volume.{name}.path")
    return config


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


# upstream keys holding a path that upstream reads relative to the config file's directory
_RELATIVE_PATHS = (
    ("api", "client", "ssl-cert"), ("api", "client", "ssl-privkey"),
    ("api", "manager", "ssl-cert"), ("api", "manager", "ssl-privkey"),
    ("storage-proxy", "pid-file"), ("logging", "file", "path"),
)


def _anchor(data: dict[str, Any], base: Path) -> None:
    """Relative paths of upstream keys made absolute against ``base`` (the config file's directory)."""
    for keys in _RELATIVE_PATHS:
        table: Any = data
        for key in keys[:-1]:
            table = table.get(key) if isinstance(table, dict) else None
        value = table.get(keys[-1]) if isinstance(table, dict) else None
        if isinstance(value, str) and value and not os.path.isabs(value):
            table[keys[-1]] = str(base / value)


def load(path: Path) -> Config:
    """Read a TOML config; a top-level ``include = [files]`` (e.g. the packaged secrets.toml, mode 0600)
    is merged in, so that the main file can stay world-readable and free of secrets."""
    data = _read_toml(path)
    includes = data.pop("include", [])
    for inc in [includes] if isinstance(includes, str) else includes:
        data = _merge(data, _read_toml(Path(path).parent / inc))
    _anchor(data, Path(path).resolve().parent)
    return validate(data, str(path))


def embedded(var_dir: Path) -> Config:
    """The zero-config default of ``make serve``: a vfs volume ``local`` under ``var_dir``.

    Secrets are generated on first use and kept in ``var_dir/secrets.json`` (mode 0600).
    """
    var_dir = var_dir.resolve()
    volume = var_dir / "volumes" / "local"
    volume.mkdir(parents=True, exist_ok=True)
    version = volume / "version.txt"
    if not version.exists():
        version.write_text("3\n")
    secrets_file = var_dir / "secrets.json"
    if secrets_file.exists():
        stored = json.loads(secrets_file.read_text())
    else:
        stored = {"manager-secret": secrets.token_urlsafe(32), "jwt-secret": secrets.token_urlsafe(32)}
        fd = os.open(secrets_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(stored, f, indent=2)
    data = {
        "storage-proxy": {"node-id": socket.gethostname(), "secret": stored["jwt-secret"]},
        "api": {
            "client": {"service-addr": {"host": "127.0.0.1", "port": 6021}},
            "manager": {"service-addr": {"host": "127.0.0.1", "port": 6022}, "secret": stored["manager-secret"]},
        },
        "volume": {"local": {"backend": "vfs", "path": str(volume)}},
        "catalog": {"path": str(var_dir / "catalog.db")},
    }
    return validate(data, "embedded default")


def masked(config: Config) -> dict[str, Any]:
    """The effective config as TOML-ready data, secrets replaced by '***'."""
    data = config.model_dump(mode="json", by_alias=True, exclude_none=True)
    data["storage-proxy"]["secret"] = "***"
    data["api"]["manager"]["secret"] = "***"
    for vol in data.get("volume", {}).values():  # appliance passwords and API tokens in volume options
        opts = vol.get("options") or {}
        for key in opts:
            if any(word in key.lower() for word in ("password", "token", "secret")):
                opts[key] = "***"
    return data
