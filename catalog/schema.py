"""Table definitions (SQLAlchemy Core) used by the queries in :mod:`catalog.store`.

The DDL that creates them lives in :mod:`catalog.migrations` as a versioned
history; a test checks that the two agree.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

metadata = sa.MetaData()


class FsName(sa.types.TypeDecorator[str]):
    """A name or path as the agent holds it (``os.fsdecode`` of its disk bytes, README "Names that are not
    UTF-8"): a UTF-8 one is stored as TEXT, any other as the BLOB of its bytes (SQLite keeps each value's
    own type in a TEXT column), and both are read back as the same ``str``."""

    impl = sa.Text
    cache_ok = True

    def process_bind_param(self, value: str | None, dialect: Any) -> str | bytes | None:
        if value is None or value.isascii():
            return value
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return value.encode("utf-8", "surrogateescape")
        return value

    def process_result_value(self, value: Any, dialect: Any) -> str | None:
        return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else value

volumes = sa.Table(
    "volumes",
    metadata,
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("backend", sa.Text, nullable=False),
    sa.Column("path", sa.Text, nullable=False),
    sa.Column("state", sa.Text, nullable=False),  # serving | needs-migration | unavailable
    sa.Column("state_info", sa.Text),
    sa.Column("first_seen", sa.Float, nullable=False),
    sa.Column("last_seen", sa.Float, nullable=False),
)

quota_scopes = sa.Table(
    "quota_scopes",
    metadata,
    sa.Column("volume", sa.Text, primary_key=True),
    sa.Column("qsid", sa.Text, primary_key=True),
    sa.Column("limit_bytes", sa.Integer),  # NULL = unlimited
    sa.Column("state", sa.Text, nullable=False),  # active | missing
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("missing_since", sa.Float),
)

vfolders = sa.Table(
    "vfolders",
    metadata,
    sa.Column("volume", sa.Text, primary_key=True),
    sa.Column("qsid", sa.Text, primary_key=True),
    sa.Column("folder_id", sa.Text, primary_key=True),  # 32 lowercase hex digits
    sa.Column("state", sa.Text, nullable=False),  # ready | missing
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("missing_since", sa.Float),
    sa.Column("incarnation", sa.Text),  # random, new each time the id is created (schema 6)
)

vfolder_metadata = sa.Table(
    "vfolder_metadata",
    metadata,
    sa.Column("volume", sa.Text, primary_key=True),
    sa.Column("qsid", sa.Text, primary_key=True),
    sa.Column("folder_id", sa.Text, primary_key=True),
    sa.Column("payload", sa.Text, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
)

vfolder_usage = sa.Table(
    "vfolder_usage",
    metadata,
    sa.Column("volume", sa.Text, primary_key=True),
    sa.Column("qsid", sa.Text, primary_key=True),
    sa.Column("folder_id", sa.Text, primary_key=True),
    sa.Column("used_bytes", sa.Integer, nullable=False),
    sa.Column("file_count", sa.Integer, nullable=False),
    sa.Column("allocated_bytes", sa.Integer, nullable=False),
    sa.Column("measured_at", sa.Float, nullable=False),
    sa.Column("source", sa.Text, nullable=False),  # fast | watch | scan
    sa.Column("stale", sa.Boolean, nullable=False),
    sa.Column("pending", sa.Boolean, nullable=False, server_default=sa.false()),  # events still queued
)

dir_usage = sa.Table(
    "dir_usage",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("volume", sa.Text, nullable=False),
    sa.Column("qsid", sa.Text, nullable=False),
    sa.Column("folder_id", sa.Text, nullable=False),
    sa.Column("relpath", sa.Text, nullable=False),
    sa.Column("entries", sa.Integer, nullable=False),
    sa.Column("size_bytes", sa.Integer, nullable=False),
    sa.Column("allocated_bytes", sa.Integer, nullable=False),
)

upload_sessions = sa.Table(
    "upload_sessions",
    metadata,
    sa.Column("session_id", sa.Text, primary_key=True),
    sa.Column("volume", sa.Text, nullable=False),
    sa.Column("qsid", sa.Text, nullable=False),
    sa.Column("folder_id", sa.Text, nullable=False),
    sa.Column("relpath", FsName, nullable=False),
    sa.Column("size", sa.Integer, nullable=False),
    sa.Column("received", sa.Integer, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False),
    sa.Column("state", sa.Text, nullable=False),  # open | complete
    sa.Column("synced", sa.Integer, nullable=False),  # bytes known durable (fdatasync'ed), <= received
    sa.Column("boot_id", sa.Text),  # the boot in which bytes past ``synced`` were written
    sa.Column("incarnation", sa.Text),  # the vfolder incarnation the session was issued for (schema 6)
)

jobs = sa.Table(
    "jobs",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("kind", sa.Text, nullable=False),  # clone | scan | migrate | delete
    sa.Column("volume", sa.Text, nullable=False),
    sa.Column("params", sa.Text, nullable=False),  # JSON
    sa.Column("state", sa.Text, nullable=False),  # running | done | failed
    sa.Column("done", sa.Integer, nullable=False),
    sa.Column("total", sa.Integer),
    sa.Column("error", sa.Text),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
)

layout_moves = sa.Table(
    "layout_moves",
    metadata,
    sa.Column("volume", sa.Text, primary_key=True),
    sa.Column("folder_id", sa.Text, primary_key=True),  # 32 lowercase hex digits
    sa.Column("qsid", sa.Text, nullable=False),
    sa.Column("state", sa.Text, nullable=False),  # intent | done
    sa.Column("job_id", sa.Text),
    sa.Column("updated_at", sa.Float, nullable=False),
)

usage_vfolders = sa.Table(
    "usage_vfolders",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("volume", sa.Text, nullable=False),
    sa.Column("qsid", sa.Text, nullable=False),
    sa.Column("folder_id", sa.Text, nullable=False),
    sa.Column("scanned_at", sa.Float),  # when the last full scan landed
    sa.Column("rescan_requested", sa.Float),  # set by `storage-agent scan` for a running agent to pick up
    sa.UniqueConstraint("volume", "qsid", "folder_id"),
)

usage_dirs = sa.Table(
    "usage_dirs",
    metadata,
    sa.Column("vf", sa.Integer, primary_key=True),  # usage_vfolders.id
    # os.fsencode(relpath): names need not be UTF-8 (b"" = the vfolder root)
    sa.Column("relpath", sa.LargeBinary, primary_key=True),
    sa.Column("ino", sa.Integer, nullable=False),
    sa.Column("entries", sa.Integer, nullable=False),  # the directory's own entries only
    sa.Column("size_bytes", sa.Integer, nullable=False),
    sa.Column("allocated_bytes", sa.Integer, nullable=False),  # hard-linked non-directories excluded
    sa.Column("own_allocated", sa.Integer, nullable=False),
    sa.Column("links", sa.Text),  # "dev:ino:allocated:size;..." of entries with nlink > 1, NULL if none
    sqlite_with_rowid=False,
)
