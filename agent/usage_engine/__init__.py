"""The live usage engine: per-directory aggregates kept right by watchers and scans (see engine.py)."""

from agent.usage_engine.engine import Usage, UsageEngine

__all__ = ["Usage", "UsageEngine"]
