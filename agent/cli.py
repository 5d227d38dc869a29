"""The ``storage-agent`` command: serve, check-config and the operator sub-commands."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import textwrap
from pathlib import Path

from agent import __version__, logs
from agent.config import Config, ConfigError, embedded, load, masked
from backends import cpu_placement
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
        default=os.environ.get("STORAGE_AGENT_CONFIG") or None,  # the Debian package's wrapper sets it
        help="storage-proxy TOML config (default: $STORAGE_AGENT_CONFIG, which the Debian package sets to "
        "/etc/storage-agent/storage-agent.toml); without either, the embedded default under --var-dir",
    )
    p.add_argument("--var-dir", default="./var", help="state directory of the embedded default (default: ./var)")


EXIT_CODES = """exit status:
  0    success (status: every volume healthy and the agent answering)
  1    an operating-system error (permission, missing file, ...)
  2    unusable config or arguments (unknown volume, vfolder not found, bad
       mapping, a backend migrate cannot handle); nothing was changed
  3    the catalogue cannot be used
  4    migrate: some folders were not moved (unmapped, conflicting or
       failed); version.txt not written
  5    status: a volume is not healthy or the agent does not answer
  130  interrupted by Ctrl-C (SIGINT); serve and view stop cleanly on
       SIGINT or SIGTERM and exit with 0"""


def _positive_rate(text: str) -> float:
    """``--max-rate``: a rate of 0 or less would never move anything (or divide by zero)."""
    try:
        rate = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not rate > 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, not {text}")
    return rate


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter  # keeps the exit-status table as written
    parser = argparse.ArgumentParser(
        prog="storage-agent",
        description="Per-node storage agent speaking the Backend.AI storage-proxy protocol.",
        epilog=EXIT_CODES,
        formatter_class=fmt,
    )
    parser.add_argument("--version", action="version", version=f"storage-agent {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{serve,check-config,migrate,status,scan,view}")
    p = sub.add_parser("serve", help="run the manager and client APIs", epilog=EXIT_CODES, formatter_class=fmt,
                       description="Run the manager and client APIs until SIGTERM or SIGINT.")
    _add_config(p)
    p = sub.add_parser("check-config", help="validate a config and print it with secrets masked",
                       epilog=EXIT_CODES, formatter_class=fmt,
                       description="Validate a config (and each volume's backend options) and print the "
                       "effective config as JSON with secrets masked.")
    _add_config(p)
    _add_operator_commands(sub)
    from agent.runtime import spawn

    spawn.add_parsers(sub)
    return parser


def _para(text: str) -> str:
    return textwrap.fill(text, 79)


def _add_operator_commands(sub: argparse._SubParsersAction) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser(
        "migrate",
        help="move a layout-2 volume to layout 3 (per quota scope)",
        description=_para("Move every <root>/aa/bb/rest folder of a layout-2 volume to <root>/<qsid>/aa/bb/rest by "
        "renames (no copies), recording each step in the catalogue so that an interrupted run resumes "
        "where it stopped. Folders missing from the mapping are listed and left in place; version.txt "
        "(= 3) is written last, only when no old-layout folder is left. Stop the agent or let it refuse "
        "the volume meanwhile: it serves the volume once version.txt is written. Only volumes whose quota "
        "scopes are plain directories can be migrated so: btrfs, xfs, gpfs and netapp volumes are refused "
        "(status 2), as renames cannot enter their subvolumes, projects, filesets or qtrees."),
        epilog=EXIT_CODES,
        formatter_class=fmt,
    )
    _add_config(p)
    p.add_argument("--volume", required=True, help="name of the volume in the config ([volume.NAME])")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--mapping", type=Path, metavar="FILE.csv", help="CSV of folder_id,qsid rows")
    source.add_argument(
        "--dsn", metavar="postgresql://...", help="the manager's database (table vfolders: id, quota_scope_id)"
    )
    p.add_argument("--dry-run", action="store_true", help="show what would move; change nothing")
    p.add_argument("--max-rate", type=_positive_rate, metavar="N",
                   help="move at most N folders per second, evenly spaced (e.g. 0.5, 1, 200)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p = sub.add_parser(
        "status",
        help="volumes, health, quota scopes with usage and limits, running jobs",
        description=_para("Show the configured volumes (health, layout, capacity, how their usage is kept: "
        "watched, polled or rescanned, and why), the catalogue's quota scopes (usage, limit, stale or missing "
        "figures) and running jobs (the start-up usage rescan among them). Reads the catalogue read-only."),
        epilog=EXIT_CODES,
        formatter_class=fmt,
    )
    _add_config(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = sub.add_parser(
        "scan",
        help="force a full usage scan of vfolders (progress shown on a terminal)",
        description=_para("Walk vfolders now and record their usage and per-directory aggregates in the "
        "catalogue; a running agent picks the request up and rescans too. Without --vfid, every vfolder "
        "of the selected volume(s)."),
        epilog=EXIT_CODES,
        formatter_class=fmt,
    )
    _add_config(p)
    p.add_argument("--volume", help="only this volume ([volume.NAME])")
    p.add_argument("--vfid", help="only this vfolder (<qsid>/<folder-uuid>)")
    p = sub.add_parser(
        "view",
        help="mount the read-only FUSE view of the quota scopes ([view] section)",
        description=_para("Mount one read-only FUSE filesystem at [view] mount-root showing "
        "<volume>/<qsid>/<folder-uuid>/ for each quota scope selected by [view] scopes, with a .usage file "
        "per scope and user.storage_agent.* xattrs per vfolder; runs until SIGTERM/SIGINT, then unmounts. "
        "`serve` runs it itself when [view] enabled = true. --config - reads the config as JSON on stdin."),
        epilog=EXIT_CODES,
        formatter_class=fmt,
    )
    _add_config(p)


def cmd_serve(args: argparse.Namespace) -> int:
    """As upstream: logging, the pid file, bind the ports, then (as root with user/group set) drop privileges;
    unlike upstream the drop comes before the catalogue, volumes and threads start (capabilities are per
    thread, agent/runtime/privileges.py), so everything the agent creates belongs to the configured user."""
    config = _config(args)
    workers = config.storage_proxy.num_proc
    logged = logs.configure(config.logging, role="supervisor" if workers > 1 else None)
    if logged.unsupported:
        log.warning("[logging] drivers %s are not supported by storage-agent: nothing is sent to them (logs go "
                    "to %s)", ", ".join(logged.unsupported),
                    ", ".join(d for d in ("console", "file") if d in config.logging.drivers) or "standard error")
    if config.storage_proxy.num_proc == 1:
        _pin_cpu(config.storage_proxy.cpu_pin)  # under num-proc = N each child places itself (runtime/spawn.py)
    from agent.runtime import privileges
    from agent.runtime.server import Sockets, bind, bind_shared, remove_pid_file, serve, write_pid_file
    from agent.runtime.supervisor import Supervisor

    pid_file = config.storage_proxy.pid_file
    sockets = bind(config) if workers == 1 else bind_shared(config, workers)
    write_pid_file(pid_file)
    banner = args.config is None or sys.stdout.isatty()
    try:
        db = Path(config.catalog.path)  # a catalogue a root-run agent made: its files go to the new owner too
        catalogue = [p for p in (db, Path(f"{db}-wal"), Path(f"{db}-shm")) if p.exists()]
        privileges.apply(config, handover=[*logged.created_dirs, *logged.files, *catalogue])
        if isinstance(sockets, Sockets):
            asyncio.run(serve(config, sockets, banner=banner))
        else:  # num-proc = N: one engine and N HTTP workers, started and watched by this process
            return Supervisor(config, sockets, banner=banner, log_file=logged.file_handler).run()
    finally:
        sockets.close()
        remove_pid_file(pid_file)
    return 0


def _pin_cpu(setting: str | int) -> None:
    """Before the event loop and its thread pools exist, so that every thread starts on the pinned CPU."""
    try:
        cpu = cpu_placement.choose(setting)
    except ValueError as e:
        raise ConfigError(f"storage-proxy.{e}") from None
    if cpu is not None:
        cpu_placement.pin(cpu)


def cmd_check_config(args: argparse.Namespace) -> int:
    from backends import build_volume

    config = _config(args)
    for name, vc in config.volume.items():
        try:
            build_volume(name, vc.backend, vc.path, vc.options)  # checks the backend's options; no I/O
        except ValueError as e:
            raise ConfigError(f"[volume.{name}]: {e}") from None
    print(json.dumps(masked(config), indent=2, default=str))
    no_effect = config.no_effect_keys()
    if no_effect:
        print("# accepted with no effect here (ignored by storage-agent):", file=sys.stderr)
        for key in no_effect:
            print(f"#   {key}", file=sys.stderr)
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from agent.migrate_cli import run_migrate

    return run_migrate(_config(args), args)


def cmd_status(args: argparse.Namespace) -> int:
    from agent.status import collect, render

    data = collect(_config(args))
    render(data, as_json=args.json)
    return 0 if data["healthy"] else 5


def cmd_view(args: argparse.Namespace) -> int:
    try:
        from agent.view import process
    except ImportError as e:
        print(f"storage-agent: view needs pyfuse3 (the 'fuse' extra): {e}", file=sys.stderr)
        return 1
    if str(args.config) == "-":  # spawned by serve: the config arrives on stdin, secrets masked
        from agent.config import validate
        from agent.runtime.parent import die_with_parent

        die_with_parent()
        config = validate(json.load(sys.stdin), "config from serve")
    else:
        config = _config(args)
    logs.setup(config.logging.level, config.logging.format)
    try:
        process.run(config)
    except RuntimeError as e:  # pyfuse3 reports a failed mount so (no /dev/fuse, not permitted, ...)
        print(f"storage-agent: view: {e}", file=sys.stderr)
        return 1
    return 0


def cmd_scan(args: argparse.Namespace) -> int:
    from agent.engine.usage.cli_scan import run as run_scan

    config = _config(args)
    logs.setup("WARNING", config.logging.format)
    return asyncio.run(run_scan(config, args.volume, args.vfid))


def cmd_child(args: argparse.Namespace) -> int:
    from agent.runtime import spawn

    return spawn.run(args)


COMMANDS = {
    "serve": cmd_serve,
    "_engine": cmd_child,
    "_worker": cmd_child,
    "check-config": cmd_check_config,
    "migrate": cmd_migrate,
    "status": cmd_status,
    "scan": cmd_scan,
    "view": cmd_view,
}


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
