"""Draw a run's spikes: the loss curve with each spike marked by cause, the gradient norm under it,
and per-layer gradient norms around the worst spikes. matplotlib is an optional extra.
"""

from __future__ import annotations

import math
import os
from typing import Any

from lightning_spikewatch.logdir import RunLog

CAUSE_COLOURS = {
    "short_batch": "#d4a017",
    "outlier_sample": "#b03fb0",
    "log_zero": "#d62728",
    "input_scale": "#ff7f0e",
    "adam_second_moment": "#17becf",
    "layer_gradient": "#1f77b4",
    "learning_rate": "#2ca02c",
    "non_finite": "#000000",
    "minibatch_noise": "#9a9a9a",
}
MISSING_MATPLOTLIB = "plotting needs matplotlib: pip install 'lightning-spikewatch[plot]' (or pip install matplotlib)"


def matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _finite(xs: list[float], ys: list[float]) -> tuple[list[float], list[float]]:
    pairs = [(x, y) for x, y in zip(xs, ys) if math.isfinite(y)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def draw(run: RunLog, path: str | os.PathLike, worst: int = 3, size: tuple[float, float] = (10.0, 7.5), dpi: int = 100):
    """Write the figure to ``path`` (PNG) and return the matplotlib Figure."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    worst_events = sorted(run.events, key=_severity, reverse=True)[:worst]
    snapshots = {(s.get("step"), s.get("rank", 0)): s for s in run.layers}
    heat = [
        snapshots[(e["step"], e.get("rank", 0))] for e in worst_events if (e["step"], e.get("rank", 0)) in snapshots
    ]
    rows = 3 if heat else 2
    fig, axes = plt.subplots(rows, 1, figsize=size, dpi=dpi, height_ratios=[3, 1.4, 2][:rows], constrained_layout=True)
    loss_ax, grad_ax = axes[0], axes[1]
    trace = run.trace
    steps, losses = _finite(trace.get("step", []), trace.get("loss", []))
    positive = all(v > 0 for v in losses) and losses
    loss_ax.plot(steps, losses, color="#4c72b0", linewidth=0.8, label="batch loss")
    if positive:
        loss_ax.set_yscale("log")
    seen = set()
    for event in run.events:
        loss = event.get("loss")
        if loss is None or (positive and loss <= 0):
            continue
        cause = event["cause"]
        loss_ax.scatter(
            [event["step"]],
            [loss],
            color=CAUSE_COLOURS.get(cause, "red"),
            s=36,
            zorder=3,
            edgecolor="white",
            linewidth=0.5,
            label=cause if cause not in seen else None,
        )
        seen.add(cause)
    loss_ax.set_ylabel("loss" + (" (log)" if positive else ""))
    loss_ax.set_title(f"SpikeWatch: {len(run.events)} spike(s) in {run.steps_watched} steps — {run.path.name}")
    loss_ax.legend(loc="best", fontsize=8, ncol=2, framealpha=0.8)
    grad_steps, grads = _finite(trace.get("step", []), trace.get("grad_norm", []))
    grad_ax.plot(grad_steps, grads, color="#55a868", linewidth=0.8)
    if grads and all(v > 0 for v in grads):
        grad_ax.set_yscale("log")
    grad_ax.set_ylabel("grad norm")
    grad_ax.set_xlabel("step")
    grad_ax.sharex(loss_ax)
    if heat:
        _heat_map(axes[2], heat)
    fig.savefig(path, dpi=dpi)
    return fig


def _heat_map(ax: Any, snapshots: list[dict[str, Any]]) -> None:
    """Per-layer gradient norms (log10, each layer relative to its median) in the steps up to each spike."""
    import numpy as np

    names = snapshots[0]["names"]
    blocks, labels = [], []
    for snap in snapshots:
        norms = np.asarray(snap["norms"], dtype=float)  # steps x layers
        typical = np.median(norms, axis=0)
        blocks.append(np.log10(np.maximum(norms, 1e-30) / np.maximum(typical, 1e-30)).T)
        labels.append(snap["step"])
        blocks.append(np.full((len(names), 1), np.nan))  # a gap between spikes
    image = np.concatenate(blocks[:-1], axis=1)
    limit = max(1.0, float(np.nanmax(np.abs(image))) if np.isfinite(image).any() else 1.0)
    shown = ax.imshow(image, aspect="auto", cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest")
    ax.set_yticks(range(len(names)), labels=[n if len(n) < 28 else "…" + n[-27:] for n in names], fontsize=7)
    ax.set_xticks([])
    ax.set_xlabel("steps before each of the worst spikes: " + ", ".join(f"step {s}" for s in labels))
    ax.figure.colorbar(shown, ax=ax, label="log10(norm / layer median)")


def _severity(event: dict[str, Any]) -> float:
    z = event.get("zscore")
    return math.inf if z is None else z
