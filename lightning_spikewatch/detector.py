"""Decide from one batch's signals whether its loss spiked: a one-sided robust z-score test.

Pure: plain floats in, a `Verdict` out. The windows hold only the last ``window`` finite values,
so memory is fixed for runs of any length.
"""

from __future__ import annotations

import math
from collections.abc import Container
from dataclasses import dataclass

from lightning_spikewatch.stats import RobustWindow

WATCHED = ("loss", "grad_norm", "input_rms")
# Gradient norms are right-skewed: twice the median is ordinary noise early in training. With this
# floor on its spread, a norm is an outlier only when it is also above ~3x the median
# (median + 6 x 1.4826 x 0.25 x median), which every blow-up worth acting on clears by far.
MIN_REL_SPREAD = {"grad_norm": 0.25}


@dataclass(frozen=True, slots=True)
class StepSignals:
    """The host-side numbers of one batch. ``None`` means the signal was not read for it."""

    loss: float
    grad_norm: float | None = None
    input_rms: float | None = None


@dataclass(frozen=True, slots=True)
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
        watch_grad_norm: also flag a batch whose gradient norm is an outlier, even if its loss is
            not (used by the actions: a blown-up gradient is dropped before it damages the loss).
        baseline_window: how many values the windows of the signals scored only on spikes keep
            (``window`` when None). A caller that reads those signals every n-th step passes about
            ``window / n``, so that their baselines span as many steps as the loss window does.
    """

    def __init__(
        self,
        window: int = 128,
        warmup: int = 20,
        z_threshold: float = 6.0,
        min_rel_spread: float = 0.02,
        watch_grad_norm: bool = False,
        baseline_window: int | None = None,
    ):
        if warmup < 3:
            raise ValueError(f"warmup must be at least 3, got {warmup}")
        self.window = window
        self.warmup = warmup
        self.z_threshold = z_threshold
        self.watch_grad_norm = watch_grad_norm
        # Only the loss (and, when watched, the gradient norm) is scored every step; the other
        # windows are scored on spikes only.
        scored = ("loss", "grad_norm") if watch_grad_norm else ("loss",)
        self.windows = {
            name: RobustWindow(
                window if name in scored or baseline_window is None else baseline_window,
                max(min_rel_spread, MIN_REL_SPREAD.get(name, 0.0)),
                keep_sorted=name in scored,
            )
            for name in WATCHED
        }
        self.batches_seen = 0

    def observe(self, signals: StepSignals) -> Verdict:
        """Score ``signals`` against the windows (which exclude them), then add them.

        Only the loss is scored on every batch; the other signals are scored when the batch is a
        spike, to say which of them were outliers too. That keeps the per-step cost to one exact
        median and MAD.
        """
        windows = self.windows
        loss, grad_norm, input_rms = signals.loss, signals.grad_norm, signals.input_rms
        loss_z, loss_median, loss_spread = windows["loss"].score(loss, self.z_threshold)
        ready = len(windows["loss"]) >= self.warmup
        all_finite = math.isfinite(loss) and (grad_norm is None or math.isfinite(grad_norm))
        all_finite = all_finite and (input_rms is None or math.isfinite(input_rms))
        grad_spike = self._grad_norm_spike(grad_norm)
        if all_finite and not (ready and loss_z >= self.z_threshold) and not grad_spike:  # the common case
            windows["loss"].push(loss)
            if grad_norm is not None:
                windows["grad_norm"].push(grad_norm)
            if input_rms is not None:
                windows["input_rms"].push(input_rms)
            self.batches_seen += 1
            return Verdict(False, {"loss": loss_z}, {"loss": loss_median}, loss_spread, (), ())
        values = {"loss": loss, "grad_norm": grad_norm, "input_rms": input_rms}
        read = {name: value for name, value in values.items() if value is not None}
        non_finite = tuple(name for name, value in read.items() if not math.isfinite(value))
        is_spike = bool(non_finite) or (ready and loss_z >= self.z_threshold) or grad_spike
        zscores, medians = {"loss": loss_z}, {"loss": loss_median}
        if is_spike:
            for name, value in read.items():
                if name != "loss":
                    zscores[name], medians[name], _ = self.windows[name].score(value)
        outliers = tuple(
            name
            for name, z in zscores.items()
            if ready and len(self.windows[name]) >= self.warmup and z >= self.z_threshold
        )
        for name, value in read.items():
            self.windows[name].push(value)
        self.batches_seen += 1
        return Verdict(is_spike, zscores, medians, loss_spread, outliers, non_finite)

    def observe_quietly(self, loss: float, grad_norm: float | None, input_rms: float | None) -> float | None:
        """The per-step fast path: if the batch is clearly not a spike, add it and return its loss z.

        Returns None, having changed nothing, when the batch needs the full ``observe`` (a spike
        or a non-finite value), so the common case allocates no record at all.
        """
        windows = self.windows
        loss_window = windows["loss"]
        loss_z = loss_window.score(loss, self.z_threshold)[0]
        if loss_z >= self.z_threshold and len(loss_window) >= self.warmup:
            return None
        if self.watch_grad_norm and self._grad_norm_spike(grad_norm):
            return None
        if not math.isfinite(loss) or (grad_norm is not None and not math.isfinite(grad_norm)):
            return None
        if input_rms is not None and not math.isfinite(input_rms):
            return None
        loss_window.push(loss)
        if grad_norm is not None:
            windows["grad_norm"].push(grad_norm)
        if input_rms is not None:
            windows["input_rms"].push(input_rms)
        self.batches_seen += 1
        return loss_z

    def observe_settled(self, losses: list[float], scored: Container[int] | None = None) -> list[float]:
        """Observe, in order, losses already known to be quiet (each under ``quiet_bound`` when it
        was settled); their robust z, exactly as ``observe_quietly`` would have given one by one.
        With ``scored`` (a thinned trace keeps few rows), only those positions are scored, NaN
        elsewhere; their z may then use a MAD refreshed at other pushes (at most 16 old either way)."""
        self.batches_seen += len(losses)
        return self.windows["loss"].score_and_push(losses, self.z_threshold, scored)

    def quiet_bound(self, pushes: int) -> float:
        """A loss below which ``observe_quietly`` would not flag, now or after up to ``pushes`` more
        batches: such a loss may be settled with one comparison and observed later, in order, with
        the same decisions (the loss alone; -inf when nothing is certain, e.g. during warm-up)."""
        window = self.windows["loss"]
        if self.watch_grad_norm or len(window) < self.warmup:
            return -math.inf  # the gradient norm can flag a batch whatever its loss; warm-up ends on its own
        return window.quiet_bound(pushes, self.z_threshold)

    def _grad_norm_spike(self, grad_norm: float | None) -> bool:
        if not self.watch_grad_norm or grad_norm is None or not math.isfinite(grad_norm):
            return False
        window = self.windows["grad_norm"]
        return len(window) >= self.warmup and window.score(grad_norm, self.z_threshold)[0] >= self.z_threshold

    def grad_norm_bound(self) -> float | None:
        """The largest gradient norm the detector does not call an outlier (None before warm-up)."""
        window = self.windows["grad_norm"]
        if len(window) < self.warmup:
            return None
        _, median, spread = window.score(window.median())
        return median + self.z_threshold * spread

    def state_dict(self) -> dict:
        return {"batches_seen": self.batches_seen, "windows": {k: w.state_dict() for k, w in self.windows.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.batches_seen = state["batches_seen"]
        for name, window_state in state["windows"].items():
            if name in self.windows:
                self.windows[name].load_state_dict(window_state)
