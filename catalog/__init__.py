"""The SQLite catalogue: what the agent manages and the fastest answer about usage.

This package is the only code that writes SQL. It imports neither ``agent`` nor
``backends``; callers get plain dataclasses back.
"""

from catalog.migrations import SCHEMA_VERSION
from catalog.store import Catalog, QuotaScopeRow, UploadSessionRow, UsageRow, VFolderRow, VolumeRow

__all__ = [
    "SCHEMA_VERSION",
    "Catalog",
    "QuotaScopeRow",
    "UploadSessionRow",
    "UsageRow",
    "VFolderRow",
    "VolumeRow",
]
