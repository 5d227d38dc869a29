"""Run ../shared/conformance against a freshly started agent (free ports, temporary vfs volume).

``--num-proc 2`` runs it against an agent of two HTTP workers and an engine (``make test`` runs both).
With ``--volume-backend btrfs --volume-path <dir on a btrfs mount>`` the volume under test is of that
backend instead (tests/test_backend_btrfs.py runs it so on a loop-mounted image).

The whole suite runs (nothing is deselected). Exits with pytest's status; fails too if the agent
logged a server error.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support import ROOT, assert_clean_log, make_agent  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shared", default=str(ROOT.parent / "shared"))
    parser.add_argument("--volume-backend", default="vfs", help="backend of the volume under test (default vfs)")
    parser.add_argument("--volume-path", help="root of the volume under test (default: a fresh temporary directory)")
    parser.add_argument("--num-proc", type=int, default=1,
                        help="[storage-proxy] num-proc of the agent under test (default 1: one process)")
    parser.add_argument("pytest_args", nargs="*")
    args = parser.parse_args()
    suite = Path(args.shared).resolve() / "conformance"
    if not suite.is_dir():
        print(f"run_conformance: no conformance suite at {suite}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="sa-conformance-") as tmp, \
            tempfile.TemporaryDirectory(prefix="sa-outside-") as outside:
        volumes = None
        if args.volume_path or args.volume_backend != "vfs":
            root = Path(args.volume_path or Path(tmp) / "volume")
            root.mkdir(parents=True, exist_ok=True)
            if not (root / "version.txt").exists():
                (root / "version.txt").write_text("3\n")
            volumes = {"local": {"backend": args.volume_backend, "path": str(root)}}
        agent = make_agent(Path(tmp), volumes=volumes, storage_proxy={"num-proc": args.num_proc}).start(timeout=120)
        env = dict(
            os.environ,
            ACC_MANAGER_URL=agent.manager_url,
            ACC_CLIENT_URL=agent.client_url,
            ACC_SECRET=agent.secret,
            ACC_VOLUME="local",
            ACC_VOLUME_ROOT=str(agent.volume_root()),
            ACC_JWT_SECRET=agent.jwt_secret,
            ACC_OUTSIDE_BASE=outside,
        )
        env.pop("ACC_PEER", None)
        cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", str(suite)]
        try:
            rc = subprocess.call(cmd + args.pytest_args, env=env, cwd=suite)
        finally:
            agent.stop()
        try:
            assert_clean_log(agent)
        except AssertionError as e:
            print(e, file=sys.stderr)
            rc = rc or 1
        return rc


if __name__ == "__main__":
    raise SystemExit(main())
