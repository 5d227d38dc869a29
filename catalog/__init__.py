"""The SQLite catalogue: what the agent manages and the fastest answer about usage.

This package is the only code that writes SQL. It imports neither ``agent`` nor
``backends``; callers get plain dataclasses back. One process (the engine) writes; HTTP workers open it with
:meth:`Catalog.open_remote` and send their writes to the engine's :class:`catalog.remote.WriterHost`.
"""

from catalog.db import CatalogError, WriterUnavailable
from catalog.migrations import SCHEMA_VERSION
from catalog.store import Catalog, QuotaScopeRow, UploadSessionRow, UsageRow, VFolderRow, VolumeRow

__all__ = [
    "SCHEMA_VERSION",
    "Catalog",
    "CatalogError",
    "QuotaScopeRow",
    "UploadSessionRow",
    "UsageRow",
    "VFolderRow",
    "VolumeRow",
    "WriterUnavailable",
]
