"""Decide from one batch's signals whether its loss spiked: a one-sided robust z-score test.

Pure: plain floats in, a `Verdict` out. The windows hold only the last ``window`` finite values,
so memory is fixed for runs of any length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lightning_spikewatch.stats import MAD_TO_SIGMA, RobustWindow

WATCHED = ("loss", "grad_norm", "input_max")


@dataclass(frozen=True)
class StepSignals:
    """The host-side numbers of one batch. ``None`` means the signal was not read for it."""

    loss: float
    grad_norm: float | None = None
    input_max: float | None = None


@dataclass(frozen=True)
class Verdict:
    """The detector's decision for one batch, with the robust z of every watched signal."""

    is_spike: bool
    zscores: dict[str, float]
    medians: dict[str, float]
    loss_spread: float
    outliers: tuple[str, ...]
    non_finite: tuple[str, ...]

    @property
    def loss_z(self) -> float:
        return self.zscores.get("loss", math.nan)


class SpikeDetector:
    """Flags a batch whose loss is a robust upward outlier against the recent window.

    Args:
        window: how many recent batches form the reference distribution.
        warmup: no spike is flagged before this many finite losses were seen (non-finite values
            are always flagged).
        z_threshold: robust z above which the loss is a spike (only upward counts).
        min_rel_spread: floor on the MAD, as a fraction of the median, so a flat history does not
            turn every wiggle into a spike.
    """

    def __init__(self, window: int = 128, warmup: int = 20, z_threshold: float = 6.0, min_rel_spread: float = 0.02):
        if warmup < 3:
            raise ValueError(f"warmup must be at least 3, got {warmup}")
        self.window = window
        self.warmup = warmup
        self.z_threshold = z_threshold
        self.windows = {name: RobustWindow(window, min_rel_spread) for name in WATCHED}
        self.batches_seen = 0

    @property
    def warmed_up(self) -> bool:
        return len(self.windows["loss"]) >= self.warmup

    def observe(self, signals: StepSignals) -> Verdict:
        """Score ``signals`` against the windows (which exclude them), then add them."""
        values = {"loss": signals.loss, "grad_norm": signals.grad_norm, "input_max": signals.input_max}
        read = {name: value for name, value in values.items() if value is not None}
        non_finite = tuple(name for name, value in read.items() if not math.isfinite(value))
        zscores = {name: self.windows[name].zscore(value) for name, value in read.items()}
        medians = {name: self.windows[name].median() for name in read}
        ready = self.warmed_up
        outliers = tuple(
            name
            for name, z in zscores.items()
            if ready and len(self.windows[name]) >= self.warmup and z >= self.z_threshold
        )
        is_spike = bool(non_finite) or "loss" in outliers
        loss_window = self.windows["loss"]
        loss_spread = MAD_TO_SIGMA * max(
            loss_window.mad() if len(loss_window) else 0.0,
            loss_window.min_rel_spread * abs(medians.get("loss", 0.0) or 0.0),
            loss_window.min_abs_spread,
        )
        for name, value in read.items():
            self.windows[name].push(value)
        self.batches_seen += 1
        return Verdict(is_spike, zscores, medians, loss_spread, outliers, non_finite)

    def state_dict(self) -> dict:
        return {"batches_seen": self.batches_seen, "windows": {k: w.state_dict() for k, w in self.windows.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.batches_seen = state["batches_seen"]
        for name, window_state in state["windows"].items():
            if name in self.windows:
                self.windows[name].load_state_dict(window_state)
