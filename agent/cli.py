"""The ``storage-agent`` command: serve, check-config and the operator sub-commands."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from pathlib import Path

from agent import __version__, logs
from agent.config import Config, ConfigError, embedded, load, masked
from catalog.db import CatalogError

log = logging.getLogger("storage-agent")


def _config(args: argparse.Namespace) -> Config:
    if args.config is not None:
        return load(args.config)
    return embedded(Path(args.var_dir))


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-f",
        "--config",
        type=Path,
        default=None,
        help="storage-proxy TOML config; without it, the embedded default under --var-dir",
    )
    p.add_argument("--var-dir", default="./var", help="state directory of the embedded default (default: ./var)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="storage-agent",
        description="Per-node storage agent speaking the Backend.AI storage-proxy protocol.",
    )
    parser.add_argument("--version", action="version", version=f"storage-agent {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="run the manager and client APIs")
    _add_config(p)
    p = sub.add_parser("check-config", help="validate a config and print it with secrets masked")
    _add_config(p)
    return parser


def cmd_serve(args: argparse.Namespace) -> int:
    config = _config(args)
    logs.setup(config.logging.level, config.logging.format)
    from agent.server import serve

    asyncio.run(serve(config, banner=args.config is None or sys.stdout.isatty()))
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    config = _config(args)
    print(json.dumps(masked(config), indent=2, default=str))
    ignored = config.ignored_keys()
    if ignored:
        print(f"# ignored (not used by storage-agent): {', '.join(ignored)}", file=sys.stderr)
    return 0


COMMANDS = {"serve": cmd_serve, "check-config": cmd_check_config}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except ConfigError as e:
        print(f"storage-agent: config error: {e}", file=sys.stderr)
        return 2
    except CatalogError as e:
        print(f"storage-agent: catalogue error: {e}", file=sys.stderr)
        return 3
    except OSError as e:
        print(f"storage-agent: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
