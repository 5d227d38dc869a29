"""storage-agent: the daemon (config, CLI, HTTP APIs, usage, view)."""

__version__ = "0.1.0"
