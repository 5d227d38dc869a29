"""The catalogue's schema history: one list of forward upgrades.

Each step takes the schema from version ``n - 1`` to ``n`` and is written as
plain DDL so that history never changes when :mod:`catalog.schema` evolves.
The version lives in ``PRAGMA user_version``; every step runs in the same
transaction as the version bump, so a crash mid-upgrade leaves the old schema.
"""

from __future__ import annotations

from collections.abc import Sequence

STEPS: Sequence[Sequence[str]] = (
    # 1: what the agent manages
    (
        """CREATE TABLE volumes (
            name TEXT PRIMARY KEY, backend TEXT NOT NULL, path TEXT NOT NULL,
            state TEXT NOT NULL, state_info TEXT,
            first_seen REAL NOT NULL, last_seen REAL NOT NULL)""",
        """CREATE TABLE quota_scopes (
            volume TEXT NOT NULL, qsid TEXT NOT NULL, limit_bytes INTEGER,
            state TEXT NOT NULL, created_at REAL NOT NULL, missing_since REAL,
            PRIMARY KEY (volume, qsid))""",
        """CREATE TABLE vfolders (
            volume TEXT NOT NULL, qsid TEXT NOT NULL, folder_id TEXT NOT NULL,
            state TEXT NOT NULL, created_at REAL NOT NULL, missing_since REAL,
            PRIMARY KEY (volume, qsid, folder_id))""",
        """CREATE TABLE vfolder_metadata (
            volume TEXT NOT NULL, qsid TEXT NOT NULL, folder_id TEXT NOT NULL,
            payload TEXT NOT NULL, updated_at REAL NOT NULL,
            PRIMARY KEY (volume, qsid, folder_id))""",
    ),
    # 2: cached usage, per-directory aggregates, upload sessions and jobs
    (
        """CREATE TABLE vfolder_usage (
            volume TEXT NOT NULL, qsid TEXT NOT NULL, folder_id TEXT NOT NULL,
            used_bytes INTEGER NOT NULL, file_count INTEGER NOT NULL, allocated_bytes INTEGER NOT NULL,
            measured_at REAL NOT NULL, source TEXT NOT NULL, stale BOOLEAN NOT NULL,
            PRIMARY KEY (volume, qsid, folder_id))""",
        """CREATE TABLE scope_usage (
            volume TEXT NOT NULL, qsid TEXT NOT NULL, used_bytes INTEGER NOT NULL,
            measured_at REAL NOT NULL, source TEXT NOT NULL,
            PRIMARY KEY (volume, qsid))""",
        """CREATE TABLE dir_usage (
            id INTEGER PRIMARY KEY, volume TEXT NOT NULL, qsid TEXT NOT NULL, folder_id TEXT NOT NULL,
            relpath TEXT NOT NULL, entries INTEGER NOT NULL, size_bytes INTEGER NOT NULL,
            allocated_bytes INTEGER NOT NULL)""",
        "CREATE UNIQUE INDEX dir_usage_path ON dir_usage (volume, qsid, folder_id, relpath)",
        """CREATE TABLE upload_sessions (
            session_id TEXT PRIMARY KEY, volume TEXT NOT NULL, qsid TEXT NOT NULL, folder_id TEXT NOT NULL,
            relpath TEXT NOT NULL, size INTEGER NOT NULL, received INTEGER NOT NULL,
            created_at REAL NOT NULL, expires_at REAL NOT NULL, state TEXT NOT NULL)""",
        "CREATE INDEX upload_sessions_expiry ON upload_sessions (expires_at)",
        """CREATE TABLE jobs (
            id TEXT PRIMARY KEY, kind TEXT NOT NULL, volume TEXT NOT NULL, params TEXT NOT NULL,
            state TEXT NOT NULL, done INTEGER NOT NULL, total INTEGER, error TEXT,
            created_at REAL NOT NULL, updated_at REAL NOT NULL)""",
    ),
    # 3: layout-2 -> 3 migration, one row per folder: intent recorded before the rename, done after
    (
        """CREATE TABLE layout_moves (
            volume TEXT NOT NULL, folder_id TEXT NOT NULL, qsid TEXT NOT NULL,
            state TEXT NOT NULL, job_id TEXT, updated_at REAL NOT NULL,
            PRIMARY KEY (volume, folder_id))""",
    ),
    # 4: the usage engine's compact per-directory aggregates (integer vfolder ids keep rows small)
    (
        """CREATE TABLE usage_vfolders (
            id INTEGER PRIMARY KEY, volume TEXT NOT NULL, qsid TEXT NOT NULL, folder_id TEXT NOT NULL,
            scanned_at REAL, rescan_requested REAL,
            UNIQUE (volume, qsid, folder_id))""",
        """CREATE TABLE usage_dirs (
            vf INTEGER NOT NULL, relpath TEXT NOT NULL, ino INTEGER NOT NULL,
            entries INTEGER NOT NULL, size_bytes INTEGER NOT NULL, allocated_bytes INTEGER NOT NULL,
            own_allocated INTEGER NOT NULL, links TEXT,
            PRIMARY KEY (vf, relpath)) WITHOUT ROWID""",
    ),
    # 5: upload sessions tell acknowledged bytes (``received``) from bytes known durable (``synced``), and
    # which boot wrote the rest: after a kill the page cache still holds them, after a power cut it may not
    (
        "ALTER TABLE upload_sessions ADD COLUMN synced INTEGER NOT NULL DEFAULT 0",
        "UPDATE upload_sessions SET synced = received",
        "ALTER TABLE upload_sessions ADD COLUMN boot_id TEXT",
    ),
    # 6: a vfolder row names its incarnation (a new one each time the id is created), and an upload session
    # the incarnation it was issued for: a token of a deleted vfolder never publishes into a recreated one
    (
        "ALTER TABLE vfolders ADD COLUMN incarnation TEXT",
        "UPDATE vfolders SET incarnation = lower(hex(randomblob(16)))",
        "ALTER TABLE upload_sessions ADD COLUMN incarnation TEXT",
    ),
    # 7: usage_dirs.relpath holds the name's bytes (os.fsencode), so names that are not UTF-8 fit; the
    # text rows written so far are their UTF-8 bytes
    ("UPDATE usage_dirs SET relpath = CAST(relpath AS BLOB)",),
    # 8: a figure says whether events for the vfolder were still queued when it was written (``pending``):
    # HTTP workers in other processes answer from these rows as the engine would from memory
    ("ALTER TABLE vfolder_usage ADD COLUMN pending BOOLEAN NOT NULL DEFAULT 0",),
    # 9: no per-scope figure of a backend's own: a scope's used bytes are always its vfolders' (the rule of
    # catalog/scope_used.py); the table (written by nothing but a test) goes, with any row left in it
    ("DROP TABLE IF EXISTS scope_usage",),
)

SCHEMA_VERSION = len(STEPS)
