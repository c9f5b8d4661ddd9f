"""Files a run leaves behind: spikes.jsonl (appended and flushed per spike), steps.csv, summary.json.

Writes only; a crash mid-run loses no spike already found. The trace is buffered (at most
``TRACE_BUFFER_ROWS`` rows) and flushed on spikes, at epoch ends and at the end of fit.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple, TextIO

from lightning_spikewatch.events import SpikeEvent, json_safe

SPIKES_FILE = "spikes.jsonl"
STEPS_FILE = "steps.csv"
SUMMARY_FILE = "summary.json"
LAYERS_FILE = "layers.jsonl"  # per-layer gradient norms of the steps before each spike
PLOT_FILE = "spikes.png"
SKIP_FILE = "skip_batches.jsonl"  # batches set aside by action="stop", skipped when the fit resumes
TRACE_COLUMNS = ("step", "epoch", "batch_idx", "loss", "loss_z", "grad_norm", "input_rms", "batch_size", "lr", "spike")
TRACE_FORMAT = "%d,%d,%d,%.6g,%.6g,%.6g,%.6g,%d,%.6g,%d\n"
TRACE_BUFFER_ROWS = 512  # rows held in memory before they are written (bounded)


class SpikeLog:
    """The export files of one run in ``log_dir``.

    Args:
        log_dir: folder for the files (created if missing).
        append: keep existing files and append (a resumed run) instead of starting them anew.
        trace: write steps.csv.
    """

    def __init__(self, log_dir: str | os.PathLike, append: bool = False, trace: bool = True, suffix: str = ""):
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        mode = "a" if append else "w"
        spikes_path = self.log_dir / _with_suffix(SPIKES_FILE, suffix)
        self.written = existing_keys(spikes_path) if append else set()  # resumed runs skip re-found spikes
        self._spikes: TextIO | None = open(spikes_path, mode, encoding="utf-8")
        self._steps: TextIO | None = None
        self._layers: TextIO | None = None
        self._skips: TextIO | None = None
        self._mode, self._suffix = mode, suffix
        if not append:  # a fresh fit starts with no batches set aside
            (self.log_dir / _with_suffix(SKIP_FILE, suffix)).unlink(missing_ok=True)
        self._lines: list[str | _SettledRows] = []  # formatted rows, and runs of settled rows to format
        self._buffered = 0  # rows in _lines
        if trace:
            path = self.log_dir / _with_suffix(STEPS_FILE, suffix)
            fresh = not append or not path.exists() or path.stat().st_size == 0
            self._steps = open(path, mode, encoding="utf-8", newline="")
            if fresh:
                self._steps.write(",".join(TRACE_COLUMNS) + "\n")

    def write_spike(self, event: SpikeEvent) -> None:
        """Append one JSON line and flush it to disk at once."""
        if self._spikes is None or event.key in self.written:
            return
        self.written.add(event.key)
        self._spikes.write(json.dumps(event.to_dict(), allow_nan=False) + "\n")
        self._spikes.flush()
        self.flush_trace()

    def write_layers(self, snapshot: Mapping[str, Any]) -> None:
        """Append the per-layer gradient norms leading up to a spike (for the heat map)."""
        if self._layers is None:
            self._layers = open(self.log_dir / _with_suffix(LAYERS_FILE, self._suffix), self._mode, encoding="utf-8")
        self._layers.write(json.dumps(json_safe(dict(snapshot)), allow_nan=False) + "\n")
        self._layers.flush()

    def write_skip(self, entry: Mapping[str, Any]) -> Path:
        """Append one batch to the skip list file and flush it; returns the file's path."""
        path = self.log_dir / _with_suffix(SKIP_FILE, self._suffix)
        if self._skips is None:
            self._skips = open(path, "a", encoding="utf-8")  # kept across fits: a resume reads it
        self._skips.write(json.dumps(json_safe(dict(entry)), allow_nan=False) + "\n")
        self._skips.flush()
        return path

    def write_step(
        self,
        step: int,
        epoch: int,
        batch_idx: int,
        loss: float,
        loss_z: float,
        grad_norm: float | None,
        input_rms: float | None,
        batch_size: int | None,
        lr: float | None,
        spike: bool,
    ) -> None:
        """Buffer one trace row (flushed on spikes, at epoch ends and at the end).

        Runs every step, so it is one C-level format and one buffered write; a value that was not
        read is written as ``nan`` (a missing batch size as ``-1``).
        """
        nan = math.nan
        self._buffer(
            TRACE_FORMAT,
            [
                (
                    step,
                    epoch,
                    batch_idx,
                    loss,
                    loss_z,
                    nan if grad_norm is None else grad_norm,
                    nan if input_rms is None else input_rms,
                    -1 if batch_size is None else batch_size,
                    nan if lr is None else lr,
                    spike,
                )
            ],
        )

    def write_settled(
        self,
        epoch: int,
        rows: list[tuple[int, int, int | None, float, float]],
        loss_z: list[float],
        first: int = 0,
        every: int = 1,
    ) -> None:
        """Buffer the rows of quiet steps settled between reads, as ``write_step`` writes such a row
        (NaN norms, no spike): ``rows`` hold ``(step, batch_idx, batch_size, loss, lr)``, ``loss_z``
        their robust z. Row i is the ``first + i``-th batch of the run; with ``every`` > 1 only the
        batches whose number is a multiple of it are kept. They are formatted when written, many at
        once, not now: this runs for nearly every step."""
        if self._steps is None or not rows:
            return
        self._lines.append(_SettledRows(epoch, rows, loss_z, first, every))
        self._buffered += len(kept_rows(first, len(rows), every))
        if self._buffered >= TRACE_BUFFER_ROWS:
            self._write_rows()

    def _buffer(self, line_format: str, rows: list[tuple]) -> None:
        if self._steps is None:
            return
        self._lines += [line_format % row for row in rows]
        self._buffered += len(rows)
        if self._buffered >= TRACE_BUFFER_ROWS:
            self._write_rows()

    def _write_rows(self) -> None:
        # One write per block of rows: several times cheaper than a write per step.
        if self._steps is not None and self._lines:
            self._steps.write("".join(_lines_of(item) if type(item) is _SettledRows else item for item in self._lines))
        self._lines.clear()
        self._buffered = 0

    def flush_trace(self) -> None:
        if self._steps is not None:
            self._write_rows()
            self._steps.flush()

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        """Write summary.json atomically (a reader never sees half a file)."""
        path = self.log_dir / SUMMARY_FILE
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(json_safe(dict(summary)), indent=2, allow_nan=False), encoding="utf-8")
        os.replace(tmp, path)

    def close(self) -> None:
        self.flush_trace()
        for handle in (self._spikes, self._steps, self._layers, self._skips):
            if handle is not None:
                handle.close()
        self._spikes = self._steps = self._layers = self._skips = None


_UNSET = object()  # equals no batch size or learning rate, None included


class _SettledRows(NamedTuple):
    """A run of settled steps waiting in the trace buffer, formatted when it is written."""

    epoch: int
    rows: list[tuple[int, int, int | None, float, float]]
    loss_z: list[float]
    first: int  # the batch number of the first row, for the trace's every-n-th rule
    every: int


def kept_rows(first: int, count: int, every: int) -> range:
    """Which of ``count`` consecutive batches, the first being the run's ``first``-th, a trace that
    keeps every ``every``-th batch writes (by position)."""
    return range(-first % every, count, every)


def _lines_of(run: _SettledRows) -> str:
    """The trace lines of a run of settled steps. Epoch, batch size and learning rate go into the
    line's format once for as long as they stay the same, leaving four numbers to format per line."""
    lines, rows, zscores = [], run.rows, run.loss_z
    size_key = lr_key = _UNSET
    line = ""  # a quiet step settled between reads: no norms read, no spike
    for position in kept_rows(run.first, len(rows), run.every):
        (step, batch_idx, size, loss, lr), loss_z = rows[position], zscores[position]
        if size != size_key or lr != lr_key:  # NaN never equals itself: a NaN rate is formatted each time
            size_key, lr_key = size, lr
            size_text = "-1" if size is None else str(size)
            line = f"%d,{run.epoch},%d,%.6g,%.6g,nan,nan,{size_text},{lr:.6g},0\n"  # as TRACE_FORMAT writes them
        lines.append(line % (step, batch_idx, loss, loss_z))
    return "".join(lines)


def _with_suffix(name: str, suffix: str) -> str:
    """``spikes.jsonl`` -> ``spikes.rank1.jsonl`` for a per-rank file."""
    if not suffix:
        return name
    stem, extension = name.rsplit(".", 1)
    return f"{stem}.{suffix}.{extension}"


def read_spikes(path: str | os.PathLike) -> tuple[list[dict[str, Any]], int]:
    """The events of a spikes.jsonl file, and how many lines were unreadable (e.g. a line cut off
    by a crash) and skipped."""
    events, skipped = [], 0
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return [], 0
    for line in lines:
        if not line.strip():
            continue
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            skipped += 1
    return events, skipped


def read_skip_entries(log_dir: str | os.PathLike, suffix: str = "") -> list[dict[str, Any]]:
    """The batches listed in a run's skip file (none if it has none)."""
    entries, _ = read_spikes(Path(log_dir) / _with_suffix(SKIP_FILE, suffix))
    return entries


def existing_keys(path: str | os.PathLike) -> set[tuple[int, int, int, int]]:
    events, _ = read_spikes(path)
    return {(e["step"], e["epoch"], e["batch_idx"], e.get("rank", 0)) for e in events}
