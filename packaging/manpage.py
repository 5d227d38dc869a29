"""Print a help2man include file: every sub-command's --help, the exit codes and the packaged files.

help2man reads the top-level ``storage-agent --help``; this adds what it cannot
see, taken from the same argparse parser so the man page never drifts from the CLI.
Every --help ends with the exit codes (:data:`agent.cli.EXIT_CODES`); in the man
page they appear once, in EXIT STATUS, so DESCRIPTION is the top-level help without them.
"""

from __future__ import annotations

import argparse

from agent.cli import EXIT_CODES, build_parser


def roff(text: str) -> str:
    lines = []
    for line in text.replace("\\", "\\e").splitlines():
        lines.append("\\&" + line if line.startswith((".", "'")) else line)
    return "\n".join(lines)


def _help_without_exit_codes(parser: argparse.ArgumentParser) -> str:
    parser.epilog = None  # the exit codes get their own section
    return roff(parser.format_help().rstrip())


def main() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    print(f"[=DESCRIPTION]\n.nf\n{_help_without_exit_codes(parser)}\n.fi")
    print("[COMMANDS]")
    for name, p in sub.choices.items():
        print(f".SS {name}\n.nf\n{_help_without_exit_codes(p)}\n.fi")
    print("[EXIT STATUS]\n.nf\n" + roff(EXIT_CODES.split("\n", 1)[1]) + "\n.fi")
    print(
        "[FILES]\n"
        ".TP\n/etc/storage-agent/storage-agent.toml\nthe configuration (a conffile; holds no secret)\n"
        ".TP\n/etc/storage-agent/secrets.toml\nthe manager and token secrets, generated at install (mode 0600)\n"
        ".TP\n/var/lib/storage-agent/catalog.db\nthe catalogue (SQLite)\n"
        ".TP\n/var/lib/storage-agent/volumes/local\nthe default volume\n"
        ".TP\n/run/storage-agent\nruntime directory (the FUSE view's mount root)\n"
        ".TP\n/usr/share/doc/storage-agent/examples/sys-admin.conf\n"
        "systemd drop-in granting CAP_SYS_ADMIN for FUSE, fanotify and kernel quotas"
    )
    print("[SEE ALSO]\n.BR systemctl (1),\n.BR journalctl (1)")


if __name__ == "__main__":
    main()
