"""Files a run leaves behind: spikes.jsonl (appended and flushed per spike), steps.csv, summary.json.

Writes only; a crash mid-run loses no spike already found. The trace is buffered and flushed on
spikes, at epoch ends and at the end of fit.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from lightning_spikewatch.events import SpikeEvent, json_safe

SPIKES_FILE = "spikes.jsonl"
STEPS_FILE = "steps.csv"
SUMMARY_FILE = "summary.json"
TRACE_COLUMNS = (
    "step",
    "epoch",
    "batch_idx",
    "loss",
    "loss_z",
    "grad_norm",
    "grad_norm_z",
    "input_max",
    "batch_size",
    "lr",
    "spike",
)


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


class SpikeLog:
    """The export files of one run in ``log_dir``.

    Args:
        log_dir: folder for the files (created if missing).
        append: keep existing files and append (a resumed run) instead of starting them anew.
        trace: write steps.csv.
    """

    def __init__(self, log_dir: str | os.PathLike, append: bool = False, trace: bool = True):
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        mode = "a" if append else "w"
        self._spikes: TextIO | None = open(self.log_dir / SPIKES_FILE, mode, encoding="utf-8")
        self._steps: TextIO | None = None
        self._writer = None
        if trace:
            path = self.log_dir / STEPS_FILE
            fresh = not append or not path.exists() or path.stat().st_size == 0
            self._steps = open(path, mode, encoding="utf-8", newline="")
            self._writer = csv.writer(self._steps)
            if fresh:
                self._writer.writerow(TRACE_COLUMNS)

    def write_spike(self, event: SpikeEvent) -> None:
        """Append one JSON line and flush it to disk at once."""
        if self._spikes is None:
            return
        self._spikes.write(json.dumps(event.to_dict(), allow_nan=False) + "\n")
        self._spikes.flush()
        self.flush_trace()

    def write_step(self, row: Sequence[Any]) -> None:
        if self._writer is not None:
            self._writer.writerow([_fmt(v) for v in row])

    def flush_trace(self) -> None:
        if self._steps is not None:
            self._steps.flush()

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        """Write summary.json atomically (a reader never sees half a file)."""
        path = self.log_dir / SUMMARY_FILE
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(json_safe(dict(summary)), indent=2, allow_nan=False), encoding="utf-8")
        os.replace(tmp, path)

    def close(self) -> None:
        for handle in (self._spikes, self._steps):
            if handle is not None:
                handle.close()
        self._spikes = self._steps = None
        self._writer = None
