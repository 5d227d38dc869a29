"""The usage engine's model-based fuzzer (issue 22), for longer runs than ``make test`` affords.

    .venv/bin/python bench/usage_fuzz.py --rounds 2000 [--watcher inotify|fanotify|both] [--first-seed S]
                                         [--ops 25] [--minutes M]

Each round (one seed) is a burst of operations on a vfolder's tree and a sibling vfolder, then a wait for
the answers to settle and a comparison with the disk (see ``tests/usage_model.py``). Prints one row per
watcher: rounds run, mismatches, mismatches not flagged stale (failures) and their seeds. Rounds of one
watcher share one agent and one tree, so a failing seed is replayed with the same ``--first-seed`` and
enough rounds to reach it. ``--minutes`` bounds each watcher's run; the table says how many rounds fit.

    .venv/bin/python bench/usage_fuzz.py --replay S [--live K] [--repeat N] [--first-seed F] --watcher W

replays seed S of a long run alone: the tree before a round depends only on the seeds before it (the engine
never writes it), so seeds F..S-K-1 are applied to the disk with the agent stopped (seconds), then the
agent starts (its start-up scan reads that tree) and watches the last K seeds and S itself (``--live``,
default 0), each compared after it settles as in a run. ``--repeat`` replays it N times (timing decides
many failures); the table counts replays, and the seeds column lists the seeds that failed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.engine.usage.watchers import fanotify_unavailable  # noqa: E402
from tests.usage_model import RoundResult, run_rounds  # noqa: E402


class Budget(Exception):
    """The time budget of one watcher ran out."""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--watcher", choices=["inotify", "fanotify", "both"], default="both")
    ap.add_argument("--first-seed", type=int, default=1000)
    ap.add_argument("--ops", type=int, default=25, help="operations per burst")
    ap.add_argument("--minutes", type=float, default=0.0, help="time budget per watcher (0: none)")
    ap.add_argument("--verbose", action="store_true", help="print the operations of each failing round")
    ap.add_argument("--replay", type=int, default=None, help="replay this seed of a run from --first-seed")
    ap.add_argument("--live", type=int, default=0, help="with --replay: seeds before it run with the agent")
    ap.add_argument("--repeat", type=int, default=1, help="with --replay: how many times")
    ap.add_argument("--workdir", default=None, help="keep the agent's directory (log, catalogue) here")
    ap.add_argument("--engine-debug", action="store_true", help="the agent logs at DEBUG")
    args = ap.parse_args()
    watchers = ["inotify", "fanotify"] if args.watcher == "both" else [args.watcher]
    rows = []
    for watcher in watchers:
        if watcher == "fanotify" and (why := fanotify_unavailable(["/tmp"])) is not None:
            rows.append((watcher, 0, 0, 0, f"skipped: {why}"))
            continue
        seen: list[RoundResult] = []
        end = time.monotonic() + args.minutes * 60 if args.minutes else None

        def on_round(
            r: RoundResult, seen: list[RoundResult] = seen, end: float | None = end, watcher: str = watcher
        ) -> None:
            seen.append(r)
            if args.replay is not None and r.seed == args.replay:
                state = "ok" if r.outcome.ok else "FLAGGED" if r.outcome.flagged else "FAILED"
                print(f"{watcher}: replay of seed {r.seed} ({r.vfolder}): {state}", flush=True)
            if not r.outcome.ok and not r.outcome.flagged:
                print(f"{watcher}: seed {r.seed} ({r.vfolder}) {r.outcome.detail}", flush=True)
                if args.verbose:
                    print("  ops:", " ".join(r.ops), flush=True)
            if end is not None and time.monotonic() > end and r.vfolder == "sibling":
                raise Budget

        seeds = list(range(args.first_seed, args.first_seed + args.rounds))
        offline: list[int] = []
        if args.replay is not None:
            live_from = max(args.first_seed, args.replay - args.live)
            offline, seeds = list(range(args.first_seed, live_from)), list(range(live_from, args.replay + 1))
        started = time.monotonic()
        config = {"logging": {"level": "DEBUG"}} if args.engine_debug else None
        for n in range(args.repeat if args.replay is not None else 1):
            with tempfile.TemporaryDirectory(prefix="usage-fuzz-") as tmp:
                work = Path(args.workdir) / f"{watcher}-{n}" if args.workdir else Path(tmp) / "agent"
                try:
                    run_rounds(watcher, seeds, work, ops=args.ops, on_round=on_round, offline=offline, config=config)
                except Budget:
                    break
        rounds = len({r.seed for r in seen}) if args.replay is None else len(seen) // (2 * len(seeds))
        mism = [r for r in seen if not r.outcome.ok]
        bad = sorted({r.seed for r in mism if not r.outcome.flagged})
        note = f"{time.monotonic() - started:.0f} s"
        rows.append((watcher, rounds, len(mism), len(bad), (", ".join(map(str, bad)) or "-") + f" ({note})"))
    print()
    print(f"{'watcher':<10} {'rounds':>7} {'mismatches':>11} {'unflagged':>10}  seeds of failures")
    for watcher, rounds, mism, bad, seeds_s in rows:
        print(f"{watcher:<10} {rounds:>7} {mism:>11} {bad:>10}  {seeds_s}")
    sys.exit(1 if any(r[3] for r in rows) else 0)


if __name__ == "__main__":
    main()
