"""Which catalogue methods may be run by another process, and the typed check of their arguments.

``@writes`` marks a write method of :class:`catalog.store.Catalog` or :class:`catalog.usage_store.UsageStore`
as a *remote write*: in an HTTP worker (a catalogue from :meth:`Catalog.open_remote`) the call is sent over
the engine's socket instead of run locally; in the engine (:class:`catalog.remote.WriterHost`) only methods in
:data:`REMOTE_WRITES` are ever run for a peer, with arguments checked against the method's own type hints.
Nothing else is reachable by name: the registry is filled by the decorator alone, at import.

The JSON form of a value follows its type hint: ``str``/``int``/``float``/``bool``/``None`` as themselves,
``tuple``/``list``/``Iterable`` as arrays, ``dict[str, X]`` as objects, a dataclass as an object of its
fields. :func:`conform` turns a JSON value back into the hinted type, or raises :class:`ArgumentError`.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import functools
import inspect
import math
import types
import typing
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


class ArgumentError(TypeError):
    """A value does not fit the parameter's type hint (the peer's fault: refused, never run)."""


@dataclass
class RemoteWrite:
    """One method open to other processes: its qualified name (``Catalog.add_vfolder``) and function."""

    name: str
    fn: Callable[..., Awaitable[Any]]

    @functools.cached_property
    def signature(self) -> inspect.Signature:
        return inspect.signature(self.fn)

    @functools.cached_property
    def hints(self) -> dict[str, Any]:
        """Resolved lazily: the hints may name classes defined after the method's own class."""
        return typing.get_type_hints(self.fn)

    @functools.cached_property
    def _params(self) -> dict[str, inspect.Parameter]:
        return dict(list(self.signature.parameters.items())[1:])

    def parameters(self) -> list[inspect.Parameter]:
        """The caller's parameters (``self`` left out)."""
        return list(self._params.values())

    @functools.cached_property
    def _positional(self) -> list[str]:
        kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        return [name for name, p in self._params.items() if p.kind in kinds]

    def arguments(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        """A call's arguments by name, as JSON values (the request a worker sends); a call that does not fit
        the signature is a TypeError here, as it would be locally."""
        if len(args) > len(self._positional) or not kwargs.keys() <= self._params.keys():
            self.signature.bind(None, *args, **kwargs)  # raises the usual TypeError
        out = dict(zip(self._positional, args, strict=False))
        if out.keys() & kwargs.keys():
            self.signature.bind(None, *args, **kwargs)
        out.update(kwargs)
        return {name: v if v is None or type(v) in _SCALARS else to_json(v) for name, v in out.items()}

    def check(self, raw: object) -> dict[str, Any]:
        """The peer's JSON arguments as the method's typed keyword arguments, or :class:`ArgumentError`."""
        if not isinstance(raw, dict):
            raise ArgumentError(f"{self.name}: the arguments must be an object, not {_kind(raw)}")
        params = self._params
        if not raw.keys() <= params.keys():
            unknown = sorted(set(raw) - set(params))
            raise ArgumentError(f"{self.name}: no parameter {', '.join(map(repr, unknown))}")
        out: dict[str, Any] = {}
        for name, p in params.items():
            if name not in raw:
                if p.default is inspect.Parameter.empty:
                    raise ArgumentError(f"{self.name}: missing argument {name!r}")
                continue
            out[name] = conform(raw[name], self.hints[name], f"{self.name}({name})")
        return out

    def result(self, raw: object) -> Any:
        """The host's JSON answer as the method's return type."""
        return conform(raw, self.hints["return"], f"{self.name} -> result")


REMOTE_WRITES: dict[str, RemoteWrite] = {}
_SCALARS = (str, int, float, bool)


def writes(fn: F) -> F:
    """Mark ``fn`` (an ``async`` method of a class with a ``db`` attribute) as a remote write.

    Locally nothing changes. When ``self.db.remote`` is set (a worker's catalogue), the call goes to the
    engine's writer host instead and returns what the host's own call returned, or raises the same kind
    of catalogue error (:mod:`catalog.wire`).
    """
    name = fn.__qualname__
    if name in REMOTE_WRITES:
        raise RuntimeError(f"remote write {name} defined twice")
    spec = REMOTE_WRITES[name] = RemoteWrite(name, fn)

    @functools.wraps(fn)
    async def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        remote = self.db.remote
        if remote is None:
            return await fn(self, *args, **kwargs)
        return await remote.call(spec, args, kwargs)

    wrapper.__remote_write__ = spec  # type: ignore[attr-defined]
    return typing.cast(F, wrapper)


def to_json(value: Any) -> Any:
    """A value as plain JSON data (tuples and iterables as lists, dataclasses as objects)."""
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, collections.abc.Iterable) and not isinstance(value, bytes | bytearray):
        return [to_json(v) for v in value]
    raise ArgumentError(f"{type(value).__name__} cannot be sent to the catalogue writer")


def _kind(value: object) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number" if isinstance(value, int | float) else type(value).__name__
    )


_SEQUENCES = (list, tuple, collections.abc.Iterable, collections.abc.Sequence, collections.abc.Collection)


def conform(value: object, hint: Any, where: str) -> Any:
    """``value`` (decoded JSON) as an instance of ``hint``; :class:`ArgumentError` naming ``where`` if not."""
    if type(value) is hint and hint is not float:  # the common case: a str, int or bool as such
        return value
    origin, args = _shape(hint)
    if hint is Any:
        return value
    if hint is None or hint is type(None):
        if value is None:
            return None
    elif origin in (typing.Union, types.UnionType):
        for option in args:  # None first when allowed: the cheap, common case
            if value is None and option is type(None):
                return None
        for option in args:
            if option is type(None):
                continue
            try:
                return conform(value, option, where)
            except ArgumentError:
                pass
    elif hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    elif origin is tuple:
        if isinstance(value, list):
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(conform(v, args[0], where) for v in value)
            if len(value) == len(args):
                return tuple(conform(v, a, where) for v, a in zip(value, args, strict=True))
    elif origin in _SEQUENCES:
        if isinstance(value, list):
            return [conform(v, args[0] if args else Any, where) for v in value]
    elif origin is dict:
        if isinstance(value, dict):
            key, item = args or (str, Any)
            if key is not str:
                raise ArgumentError(f"{where}: keys of {hint} cannot travel as JSON")
            return {k: conform(v, item, where) for k, v in value.items()}
    elif isinstance(hint, type) and dataclasses.is_dataclass(hint):
        if isinstance(value, dict):
            hints = _field_hints(hint)
            if not value.keys() <= hints.keys():
                raise ArgumentError(f"{where}: {hint.__name__} has no field {sorted(set(value) - set(hints))}")
            try:
                return hint(**{k: conform(v, hints[k], f"{where}.{k}") for k, v in value.items()})
            except TypeError as e:  # a field without a default left out
                raise ArgumentError(f"{where}: {e}") from None
    else:
        raise ArgumentError(f"{where}: the type {hint} cannot travel as JSON")
    raise ArgumentError(f"{where}: expected {_name(hint)}, got {_kind(value)}")


@functools.cache
def _shape(hint: Any) -> tuple[Any, tuple[Any, ...]]:
    return typing.get_origin(hint), typing.get_args(hint)


@functools.cache
def _field_hints(cls: type) -> dict[str, Any]:
    return {f.name: typing.get_type_hints(cls)[f.name] for f in dataclasses.fields(cls)}


def _name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint)


__all__ = ["REMOTE_WRITES", "ArgumentError", "RemoteWrite", "conform", "to_json", "writes"]
