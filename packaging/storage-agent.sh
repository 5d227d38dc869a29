#!/bin/sh
# storage-agent: the agent's Python lives in a private virtualenv; -I keeps the
# current directory and PYTHON* variables from changing what it imports.
exec /usr/lib/storage-agent/bin/python3 -I -m agent "$@"
