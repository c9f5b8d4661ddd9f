"""Read a SpikeWatch log folder back: events, the per-step trace, layer snapshots and the summary.

No torch here: reading logs after the fact, on another machine, must start fast.
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_spikewatch.export import LAYERS_FILE, SPIKES_FILE, STEPS_FILE, SUMMARY_FILE, read_spikes


class LogDirError(Exception):
    """The folder is missing or holds no SpikeWatch files; the message says what to do."""


@dataclass
class RunLog:
    path: Path
    events: list[dict[str, Any]]
    summary: dict[str, Any]
    trace: dict[str, list[float]]
    layers: list[dict[str, Any]]
    warnings: list[str] = field(default_factory=list)

    @property
    def steps_watched(self) -> int:
        if "steps_watched" in self.summary:
            return int(self.summary["steps_watched"])
        steps = self.trace.get("step", [])
        return len(set(steps))


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan


def read_trace(path: Path) -> dict[str, list[float]]:
    """steps.csv as columns; rows repeated by a resumed run keep their last value."""
    if not path.exists():
        return {}
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if not header:
            return {}
        rows: dict[tuple[str, str], list[float]] = {}
        for row in reader:
            if len(row) != len(header):
                continue  # a line cut off by a crash
            rows[(row[0], row[2])] = [_float(v) for v in row]  # (step, batch_idx): last one wins
    columns: dict[str, list[float]] = {name: [] for name in header}
    for values in sorted(rows.values(), key=lambda r: (r[0], r[2])):
        for name, value in zip(header, values):
            columns[name].append(value)
    return columns


def read_layers(path: Path) -> list[dict[str, Any]]:
    snapshots, _ = read_spikes(path)
    return snapshots


def load(path: str | os.PathLike) -> RunLog:
    """Everything SpikeWatch wrote in ``path``; raises LogDirError with advice if there is nothing."""
    folder = Path(path)
    if not folder.is_dir():
        raise LogDirError(f"{folder} is not a folder. Pass the SpikeWatch log_dir (it holds spikes.jsonl).")
    spikes_path = folder / SPIKES_FILE
    if not spikes_path.exists() and not (folder / STEPS_FILE).exists():
        nested = sorted(p.parent for p in folder.glob(f"**/{SPIKES_FILE}"))
        hint = f" Did you mean {nested[0]}?" if nested else ""
        raise LogDirError(f"{folder} holds no {SPIKES_FILE} or {STEPS_FILE}.{hint}")
    events, skipped = read_spikes(spikes_path)
    warnings = []
    if skipped:
        warnings.append(f"skipped {skipped} unreadable line(s) in {spikes_path.name} (cut off by a crash?)")
    summary: dict[str, Any] = {}
    summary_path = folder / SUMMARY_FILE
    if summary_path.exists():
        try:
            summary = json.loads(summary_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            warnings.append(f"{SUMMARY_FILE} is unreadable; counts come from the other files")
    else:
        warnings.append(f"no {SUMMARY_FILE}: the run did not reach its end; counts come from the other files")
    events.sort(key=lambda e: (e.get("step", 0), e.get("rank", 0), e.get("batch_idx", 0)))
    return RunLog(folder, events, summary, read_trace(folder / STEPS_FILE), read_layers(folder / LAYERS_FILE), warnings)
