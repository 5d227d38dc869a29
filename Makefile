# storage-agent — developer entry points (run as root on Debian; see README.md)
SHARED ?= ../shared
PY := .venv/bin/python

.PHONY: serve test deps test-deps lint unit conformance bench clean deb

serve: deps
	.venv/bin/storage-agent serve

test: test-deps lint unit conformance

deps:
	@packaging/dev-deps.sh

test-deps:
	@packaging/dev-deps.sh --test

lint:
	.venv/bin/ruff check .
	.venv/bin/mypy

# a fresh base temp dir per run: pytest's own clean-up of old runs recurses and fails on very deep trees
# the NFS test under an emulated guest kernel where this one has no NFS server (README: about 5½ minutes)
unit: export STORAGE_AGENT_GUEST_TCG ?= 1
unit:
	$(PY) -m pytest tests --basetemp "$$(mktemp -d /tmp/storage-agent-tests-XXXXXX)"

conformance:
	$(PY) tests/run_conformance.py --shared $(SHARED)
	$(PY) tests/run_conformance.py --shared $(SHARED) --num-proc 2

# every benchmark prints its own table of ratios; the full set takes about an hour on 2 cores
bench: test-deps
	$(PY) bench/usage_api_bench.py
	$(PY) bench/usage_bench.py --sizes 10k,100k,1m --shapes wide,deep --cold
	$(PY) bench/usage_walk_bench.py
	$(PY) bench/transfer_bench.py
	$(PY) bench/btrfs_bench.py
	$(PY) bench/view_bench.py
	$(PY) bench/migrate_bench.py
	$(PY) bench/writer_paths_bench.py
	$(PY) bench/reuseport_bench.py
	$(PY) bench/load_bench.py

# dist/storage-agent_<version>_<arch>.deb (dpkg-buildpackage from packaging/debian, then lintian)
deb:
	packaging/build-deb.sh

clean:
	rm -rf .venv build *.egg-info backends/*.so agent/engine/usage/*.so
