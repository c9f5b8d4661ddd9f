"""DDP for real: 2 CPU processes over gloo; a spike caused by one rank's batch is found on that
rank, attributed there, and reported once on rank zero."""

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.e2e.ddp_script import OUTLIER_ROW

ROOT = Path(__file__).resolve().parents[2]


def run_ddp(out: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    run = subprocess.run(
        [sys.executable, "tests/e2e/ddp_script.py", str(out), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return run


def test_outlier_seen_by_rank_one_is_found_there_and_reported_once_on_rank_zero(tmp_path):
    run = run_ddp(tmp_path)
    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    rank1 = json.loads((tmp_path / "rank1.json").read_text())
    # Found and attributed on rank 1, which saw the row ...
    assert [(e["rank"], e["batch_idx"], e["cause"]) for e in rank1["spikes"]] == [(1, 40, "outlier_sample")]
    assert rank1["spikes"][0]["evidence"]["samples"][0]["index"] == OUTLIER_ROW
    # ... handed to rank zero at the end of the epoch, and reported there once.
    assert [(e["rank"], e["evidence"]["samples"][0]["index"]) for e in rank0["spikes"]] == [(1, OUTLIER_ROW)]
    merged = [json.loads(line) for line in (tmp_path / "spikes" / "spikes.jsonl").read_text().splitlines()]
    assert [(e["rank"], e["step"]) for e in merged] == [(1, 40)]
    own = [json.loads(line) for line in (tmp_path / "spikes" / "spikes.rank1.jsonl").read_text().splitlines()]
    assert [(e["rank"], e["step"]) for e in own] == [(1, 40)]  # rank 1's own file: safe if it crashes later
    announced = [line for line in run.stdout.splitlines() if line.startswith("SpikeWatch step")]
    assert len(announced) == 1 and "rank 1" in announced[0]
    assert json.loads((tmp_path / "spikes" / "summary.json").read_text())["spikes"] == 1


def test_skip_asked_for_by_one_rank_is_taken_by_both_so_the_replicas_stay_identical(tmp_path):
    run_ddp(tmp_path / "watch")
    run_ddp(tmp_path / "skip", "skip")
    watched = [json.loads((tmp_path / "watch" / f"rank{r}.json").read_text()) for r in (0, 1)]
    skipped = [json.loads((tmp_path / "skip" / f"rank{r}.json").read_text()) for r in (0, 1)]
    own = skipped[1]["spikes"]
    assert [(e["step"], e["cause"], e["action"]["action"]) for e in own] == [(40, "outlier_sample", "skip")]
    assert skipped[0]["actions"] == skipped[1]["actions"] == {"skip": 1}  # rank 0 had no spike, yet skipped
    assert skipped[0]["weights"] == skipped[1]["weights"]  # DDP replicas still identical
    assert skipped[0]["weights"] != watched[0]["weights"]  # and the update was really dropped
