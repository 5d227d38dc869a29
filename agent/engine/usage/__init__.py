"""The live usage engine: per-directory aggregates kept right by watchers and scans (see engine.py)."""

from agent.engine.usage.engine import Usage, UsageEngine

__all__ = ["Usage", "UsageEngine"]
