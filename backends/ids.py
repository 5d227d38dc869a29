"""Quota scope ids and vfolder ids, parsed strictly (they become directory names).

A quota scope reaches the agent in one of two spellings:

- the bare form of 23.03.5 / 23.03.6 managers (``user-1``, or a UUID's hex): letters and digits joined by
  single ``-``/``_``, which is also its directory name under the volume root;
- the typed form of 23.03.7 and later managers, ``user:<uuid>`` / ``project:<uuid>`` (any UUID spelling:
  dashed or not, either case; the type in any case as 24.09 takes it), whose directory is the UUID's
  32 lowercase hex digits, as upstream's ``QuotaScopeID.pathname``.

Both spellings of one UUID therefore name **one** scope: the directory name is the scope's identity on
disk and in the catalogue; the spelling is kept only to answer the caller in its own words.

Every pattern here is matched against the whole string (``fullmatch``): ``"abc\\n"`` is not ``"abc"``.
This module is the one place ids are parsed.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field

QSID_RE = re.compile(r"[A-Za-z0-9]+(?:[_-][A-Za-z0-9]+)*")
SCOPE_TYPES = ("user", "project")
_HEX32 = re.compile(r"[0-9a-fA-F]{32}")
_DASHED = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
# upstream's typed scope: hex digit groups joined by single dashes, 32 hex digits in all (what uuid.UUID takes)
_TYPED_UUID = re.compile(r"[0-9a-fA-F]+(?:-[0-9a-fA-F]+)*")
_LOWER_HEX = re.compile(r"[0-9a-f]+")
MAX_QSID_LEN = 200

QSID_RULE = (
    "quota scope id must be 'user:<uuid>', 'project:<uuid>', or letters and digits optionally joined by "
    f"single '-' or '_' (at most {MAX_QSID_LEN} characters)"
)


def parse_qsid(value: object) -> str:
    """A bare (23.03.5) quota scope id, which is its own directory name."""
    if not isinstance(value, str) or len(value) > MAX_QSID_LEN or not QSID_RE.fullmatch(value):
        raise ValueError(QSID_RULE)
    return value


def parse_folder_id(value: object) -> uuid.UUID:
    if not isinstance(value, str) or not (_HEX32.fullmatch(value) or _DASHED.fullmatch(value)):
        raise ValueError("folder id must be a UUID (32 hex digits, with or without dashes)")
    return uuid.UUID(value)


def is_hex_part(name: str, length: int) -> bool:
    """A directory of a folder id's ``aa/bb/rest`` split on disk: exactly ``length`` lowercase hex digits."""
    return len(name) == length and _LOWER_HEX.fullmatch(name) is not None


def _typed_uuid(rest: str) -> uuid.UUID:
    if not _TYPED_UUID.fullmatch(rest) or len(rest.replace("-", "")) != 32:
        raise ValueError(f"the UUID of a typed quota scope id must be 32 hex digits (dashes allowed), got {rest!r}")
    return uuid.UUID(rest.replace("-", ""))


@dataclass(frozen=True)
class QuotaScopeID:
    """A quota scope: ``name`` is its directory (and catalogue key); ``spelling`` is how the caller wrote it."""

    name: str
    spelling: str = field(default="", compare=False)
    kind: str | None = field(default=None, compare=False)  # "user" / "project" for the typed form

    @classmethod
    def parse(cls, value: object) -> QuotaScopeID:
        if isinstance(value, QuotaScopeID):
            return value
        if not isinstance(value, str) or len(value) > MAX_QSID_LEN:
            raise ValueError(QSID_RULE)
        kind, colon, rest = value.partition(":")
        if not colon:
            return cls(parse_qsid(value), value)
        if kind.lower() not in SCOPE_TYPES:
            raise ValueError(f"quota scope type must be 'user' or 'project', got {kind!r}; {QSID_RULE}")
        return cls(_typed_uuid(rest).hex, value, kind.lower())

    @property
    def typed(self) -> bool:
        """Spelled ``user:<uuid>`` / ``project:<uuid>``: the request comes from a 23.03.7-or-later manager."""
        return self.kind is not None

    def __str__(self) -> str:
        return self.spelling or self.name


def scope_dir(value: str) -> str:
    """The directory name of a quota scope given in either spelling (e.g. a migration mapping's value)."""
    return QuotaScopeID.parse(value).name


@dataclass(frozen=True)
class VFolderID:
    """``<qsid>/<folder-uuid>``; stored on disk as ``<qsid dir>/<hex[0:2]>/<hex[2:4]>/<hex[4:]>``.

    ``qsid`` is the scope's directory name (what paths and the catalogue use); ``spelling`` is the scope
    as the request wrote it, which ``str()`` gives back (answers and tokens).
    """

    qsid: str
    folder_id: uuid.UUID
    spelling: str | None = field(default=None, compare=False)

    @classmethod
    def parse(cls, value: object) -> VFolderID:
        if isinstance(value, VFolderID):
            return value
        if not isinstance(value, str):
            raise ValueError("vfid must be a string '<quota-scope-id>/<folder-uuid>'")
        qsid, sep, fid = value.partition("/")
        if not sep:
            raise ValueError("vfid must be '<quota-scope-id>/<folder-uuid>' (a folder id without its scope is refused)")
        scope = QuotaScopeID.parse(qsid)
        return cls(scope.name, parse_folder_id(fid), scope.spelling if scope.typed else None)

    @property
    def scope(self) -> QuotaScopeID:
        if self.spelling is None:
            return QuotaScopeID(self.qsid, self.qsid)
        return QuotaScopeID.parse(self.spelling)

    @property
    def typed(self) -> bool:
        return self.spelling is not None

    @property
    def hex(self) -> str:
        return self.folder_id.hex

    @property
    def relpath(self) -> str:
        """Path below the volume root."""
        h = self.folder_id.hex
        return f"{self.qsid}/{h[0:2]}/{h[2:4]}/{h[4:]}"

    def __str__(self) -> str:
        return f"{self.spelling or self.qsid}/{self.folder_id.hex}"
