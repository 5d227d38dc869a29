"""Catalogue figures for Prometheus (the agent's ``/metrics`` serves the default registry)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

WRITE_SECONDS = Histogram(
    "storage_agent_catalog_write_seconds",
    "Time a catalogue write transaction took, waiting for the single writer included",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0),
)

COMMITS = Counter(
    "storage_agent_catalog_commits",
    "Catalogue write transactions committed (one per batch of writes: concurrent writers share one)",
)
