"""The one strict parser of untrusted input: numbers in headers, query flags and strings, JSON bodies, names.

Every number a request carries (``Upload-Offset``, a ``Range``, a JSON integer) and every name (a relpath, a
new name, a query's ``dst_dir``) is read here, so one rule holds everywhere:

* numbers are ASCII digits only (``str.isdigit()`` also takes ``²`` and ``٣``) and of bounded length, so
  no Unicode digit or 5,000-digit value ever reaches ``int()`` (whose 4,300-digit limit is a ValueError);
* a JSON body is bounded in nesting depth and integer length, and ``NaN``/``Infinity`` are not JSON;
* a name is a ``str`` in the form the listing gives it: ``os.fsdecode`` of the disk bytes (UTF-8 with
  ``surrogateescape``), so byte ``0xff`` travels as U+DCFF (``\\udcff`` in JSON, ``%FF`` in a query string)
  and maps back to the same byte with ``os.fsencode``.

A violation is a 400 naming the field and the problem.
"""

from __future__ import annotations

import json
import math
import re
import urllib.parse
from typing import Any

from aiohttp import web
from multidict import MultiDict, MultiDictProxy

from agent.http.errors import malformed

MAX_DIGITS = 19  # 10**19 > 2**63: more than any size or offset the agent can hold
SATURATED = 10**MAX_DIGITS  # what a longer number reads as where "past the end" is meaningful (a Range)
MAX_INT64 = 2**63 - 1  # the largest integer a catalogue column (SQLite INTEGER) holds: every byte count's bound
MAX_JSON_DEPTH = 32  # objects and arrays nested in a manager body (the deepest legitimate one is 3)
MAX_JSON_INT_DIGITS = 40  # a JSON integer's digits (sign excluded); far above 2**64, far below int()'s limit
_DIGITS = re.compile(r"[0-9]+")  # a str pattern's [0-9] is ASCII only, unlike \d or isdigit()
_QUERY = "strict.query"


def digits(text: str, *, saturate: bool = False) -> int | None:
    """The value of a run of ASCII digits, or None when ``text`` is anything else (or longer than
    :data:`MAX_DIGITS` significant digits, unless ``saturate`` reads that as :data:`SATURATED`)."""
    if not _DIGITS.fullmatch(text):
        return None
    if len(text.lstrip("0")) > MAX_DIGITS:
        return SATURATED if saturate else None
    return int(text)


def uint(text: str | None, field: str) -> int:
    """A required non-negative integer header or parameter (surrounding blanks allowed, as HTTP's OWS)."""
    if text is None:
        raise malformed(f"{field} is required (a non-negative integer)")
    value = digits(text.strip(" \t"))
    if value is None:
        raise malformed(f"{field} must be a non-negative integer of at most {MAX_DIGITS} ASCII digits, "
                        f"not {_shown(text)}")
    return value


def flag(text: str | None, field: str) -> bool | None:
    """A query-string boolean: true/false, 1/0, yes/no, on/off (any case); absent → None; empty → false."""
    if text is None:
        return None
    value = text.lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise malformed(f"query parameter {field} must be true or false, not {_shown(text)}")


def query(request: web.Request) -> MultiDictProxy[str]:
    """The query string, percent-decoded by the name rule: ``%FF`` is the byte 0xff, read as U+DCFF.

    (aiohttp's ``request.query`` turns every byte that is not UTF-8 into U+FFFD, so a name that is not
    UTF-8 could never be named in a query string.)
    """
    cached = request.get(_QUERY)
    if cached is None:
        pairs = urllib.parse.parse_qsl(
            request.rel_url.raw_query_string, keep_blank_values=True, encoding="utf-8", errors="surrogateescape"
        )
        cached = request[_QUERY] = MultiDictProxy(MultiDict(pairs))
    return cached


def query_name(request: web.Request, field: str) -> str | None:
    """A name-valued query parameter (``dst_dir``), checked by :func:`check_name_form`; empty → None."""
    value = query(request).get(field)
    if not value:
        return None
    try:
        return check_name_form(value)
    except ValueError as e:
        raise malformed(f"query parameter {field}: {e}") from None


# -- names ---------------------------------------------------------------------------------------


def check_name_form(value: object) -> str:
    """``value`` when it is a name in the wire form (``os.fsdecode`` of some bytes), else ValueError.

    Lone surrogates U+DC80..U+DCFF stand for the bytes 0x80..0xff that are not UTF-8; any other lone
    surrogate, or an escape of bytes that do form UTF-8 (``\\udcc3\\udca9`` for ``é``), is not a form the
    agent ever gives out, so it is refused rather than guessed at.
    """
    if not isinstance(value, str):
        raise ValueError("must be a string")
    try:
        raw = value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"contains the lone surrogate U+{ord(value[e.start]):04X}; only U+DC80..U+DCFF may appear, "
            "each standing for one byte that is not UTF-8"
        ) from None
    if raw.decode("utf-8", "surrogateescape") != value:
        raise ValueError("escapes bytes that form valid UTF-8 as surrogates; send those characters themselves")
    return value


def name_validator(max_length: int, min_length: int = 0) -> Any:
    """A pydantic plain validator: :func:`check_name_form` plus a length bound (in characters)."""

    def validate(value: object) -> str:
        name = check_name_form(value)
        if len(name) > max_length:
            raise ValueError(f"at most {max_length} characters")
        if len(name) < min_length:
            raise ValueError(f"at least {min_length} character(s)")
        return name

    return validate


# -- JSON bodies -----------------------------------------------------------------------------------


def _int(text: str) -> int:
    if len(text.lstrip("-").lstrip("0")) > MAX_JSON_INT_DIGITS:
        raise malformed(f"request body has an integer of {len(text.lstrip('-'))} digits "
                        f"(at most {MAX_JSON_INT_DIGITS})")
    return int(text)


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise malformed(f"request body has a number out of range: {_shown(text)}")
    return value


def _constant(text: str) -> Any:
    raise malformed(f"request body is not valid JSON: {text} is not a JSON value")


def _too_deep(value: Any) -> bool:
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children: Any = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        if depth > MAX_JSON_DEPTH:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def json_body(raw: bytes) -> Any:
    """The parsed JSON document, or a 400 naming what is wrong with it."""
    deep = malformed(f"request body is nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        value = json.loads(raw, parse_int=_int, parse_float=_float, parse_constant=_constant)
    except RecursionError:  # the C scanner gives up past the interpreter's recursion limit
        raise deep from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise malformed(f"request body is not valid JSON: {e}") from None
    if _too_deep(value):
        raise deep
    return value


def _shown(text: str) -> str:
    """The offending input, quoted and cut short (it reaches the answer and the log)."""
    return repr(text[:40] + ("…" if len(text) > 40 else ""))
