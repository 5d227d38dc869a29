"""Quota scope ids and vfolder ids, parsed strictly (they become directory names)."""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass

QSID_RE = re.compile(r"^[A-Za-z0-9]+(?:[_-][A-Za-z0-9]+)*$")
_HEX32 = re.compile(r"^[0-9a-fA-F]{32}$")
_DASHED = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
MAX_QSID_LEN = 200


def parse_qsid(value: object) -> str:
    if not isinstance(value, str) or not QSID_RE.match(value) or len(value) > MAX_QSID_LEN:
        raise ValueError(
            "quota scope id must be letters and digits, optionally joined by single '-' or '_' "
            f"(at most {MAX_QSID_LEN} characters)"
        )
    return value


def parse_folder_id(value: object) -> uuid.UUID:
    if not isinstance(value, str) or not (_HEX32.match(value) or _DASHED.match(value)):
        raise ValueError("folder id must be a UUID (32 hex digits, with or without dashes)")
    return uuid.UUID(value)


@dataclass(frozen=True)
class VFolderID:
    """``<qsid>/<folder-uuid>``; stored on disk as ``<qsid>/<hex[0:2]>/<hex[2:4]>/<hex[4:]>``."""

    qsid: str
    folder_id: uuid.UUID

    @classmethod
    def parse(cls, value: object) -> VFolderID:
        if not isinstance(value, str):
            raise ValueError("vfid must be a string '<quota-scope-id>/<folder-uuid>'")
        qsid, sep, fid = value.partition("/")
        if not sep:
            raise ValueError("vfid must be '<quota-scope-id>/<folder-uuid>'")
        return cls(parse_qsid(qsid), parse_folder_id(fid))

    @property
    def hex(self) -> str:
        return self.folder_id.hex

    @property
    def relpath(self) -> str:
        """Path below the volume root."""
        h = self.folder_id.hex
        return f"{self.qsid}/{h[0:2]}/{h[2:4]}/{h[4:]}"

    def __str__(self) -> str:
        return f"{self.qsid}/{self.folder_id.hex}"
