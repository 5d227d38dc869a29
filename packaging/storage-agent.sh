#!/bin/sh
# storage-agent: the agent's Python lives in a private virtualenv; -I keeps the
# current directory and PYTHON* variables from changing what it imports.
# Commands read the packaged config unless -f/--config names another.
STORAGE_AGENT_CONFIG=${STORAGE_AGENT_CONFIG:-/etc/storage-agent/storage-agent.toml}
export STORAGE_AGENT_CONFIG
exec /usr/lib/storage-agent/bin/python3 -I -m agent "$@"
