"""The model-based fuzzer of the usage engine (issue 22) on a fixed seed set, with each watcher.

Any settled answer that disagrees with the disk fails, with the seed to replay (``bench/usage_fuzz.py
--replay N --first-seed 1 --watcher W`` rebuilds the tree of the seeds before it and replays that round).
A longer run: ``bench/usage_fuzz.py --rounds 2000``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support import WATCHERS
from tests.usage_model import run_rounds

SEEDS = list(range(1, 81))  # about half a minute per watcher on an idle 2-core machine


@pytest.mark.parametrize("watcher", WATCHERS)
def test_fuzzed_bursts_settle_to_the_disk_figures(watcher: str, tmp_path: Path) -> None:
    results = run_rounds(watcher, SEEDS, tmp_path / "agent")
    bad = [r for r in results if not r.outcome.ok and not r.outcome.flagged]
    assert not bad, "\n".join(
        f"seed {r.seed} ({r.vfolder}): {r.outcome.detail}; ops: {' '.join(r.ops)}" for r in bad
    )
