"""Attribution rules: one small pure function per cause, ``(SpikeContext) -> CauseScore | None``.

Each rule scores in [0, 1] how well its cause explains the spike and returns the evidence in a
few plain numbers. ``rank_causes`` runs them all; ``minibatch_noise`` is the honest fallback.
Scores are calibrated so that a cause living in the batch itself and fully explaining the spike
outranks a cause that only coincides with it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from lightning_spikewatch.events import Cause, CauseScore

LOG_ZERO_MIN_NATS = 13.8  # -log(1e-6): the predicted probability of the target is below one in a million
LOG_ZERO_MAX_NATS = 104.0  # -log of the smallest float32 denormal: a probability cannot go lower
NOISE_SCORE = 0.3


@dataclass(frozen=True)
class SampleLoss:
    """One sample of the spiking batch: its position in the batch, its loss, its dataset index."""

    position: int
    loss: float
    index: int | None = None
    size: int = 1  # >1 when the batch could not be split further (the loss is then a group mean)


@dataclass(frozen=True)
class SampleLosses:
    """What per-sample evidence says about the spiking batch."""

    batch_size: int
    batch_loss_sum: float
    top: Sequence[SampleLoss]  # largest first
    source: str  # "per_sample_loss" (returned by training_step) or "replay"
    note: str | None = None


@dataclass(frozen=True)
class LayerGradients:
    """Per-layer gradient norms at the spiking step, the step before, and typically."""

    names: Sequence[str]
    current: Sequence[float]
    typical: Sequence[float]
    previous: Sequence[float] | None = None


@dataclass(frozen=True)
class AdamLayer:
    """How oversized Adam's last update was for one parameter tensor.

    ``update_ratio`` is the RMS of m_hat / (sqrt(v_hat) + eps): about 1 for sign-like steps, well
    below 1 in a healthy noisy regime, above 1 when ``exp_avg_sq`` had collapsed.
    ``grad_to_moment`` is mean(g^2) / mean(v_hat) for the current gradient.
    """

    name: str
    update_ratio: float
    grad_to_moment: float
    sign_like_fraction: float


@dataclass
class SpikeContext:
    """Everything the rules may look at for one spiking batch (host-side numbers only)."""

    loss: float
    loss_median: float
    loss_z: float
    loss_spread: float  # 1.4826 * floored MAD: the loss's typical scale
    z_threshold: float
    batch_size: int | None = None
    nominal_batch_size: int | None = None
    previous_batch_size: int | None = None
    is_last_batch: bool = False
    dataset_size: int | None = None
    input_rms: float | None = None
    input_rms_median: float | None = None
    input_rms_z: float | None = None
    input_rms_sample: int | None = None  # dataset index (or batch position) holding the largest input
    non_finite: Sequence[str] = ()
    lr_history: Sequence[Sequence[float]] = ()  # per param group, the last few steps, oldest first, ending now
    layers: LayerGradients | None = None
    adam: Sequence[AdamLayer] | None = None
    samples: SampleLosses | None = None
    class_counts: dict[int, int] | None = None
    has_integer_targets: bool | None = None  # False: only floating tensors, so not a log-likelihood over labels
    notes: list[str] = field(default_factory=list)

    @property
    def excess(self) -> float:
        """How far the loss is above its typical value."""
        return self.loss - self.loss_median


def non_finite(ctx: SpikeContext) -> CauseScore | None:
    if not ctx.non_finite:
        return None
    return CauseScore(Cause.NON_FINITE, 1.0, {"non_finite": list(ctx.non_finite)})


def short_batch(ctx: SpikeContext) -> CauseScore | None:
    nominal = ctx.nominal_batch_size
    if not nominal:
        return None
    for size, when, weight in ((ctx.batch_size, "this batch", 0.8), (ctx.previous_batch_size, "previous batch", 0.6)):
        if size is None or size >= nominal:
            continue
        shortness = 1.0 - size / nominal  # the noise of a batch mean grows like sqrt(nominal / size)
        score = weight * min(1.0, shortness / 0.5)
        evidence = {"batch_size": size, "nominal_batch_size": nominal, "which": when, "last_batch": ctx.is_last_batch}
        if ctx.dataset_size:
            evidence["dataset_size"] = ctx.dataset_size
            evidence["dataset_remainder"] = ctx.dataset_size % nominal
        return CauseScore(Cause.SHORT_BATCH, score, evidence)
    return None


def _sample_evidence(ctx: SpikeContext, count: int) -> dict:
    samples = ctx.samples
    top = samples.top[:count]
    return {
        "samples": [
            {"position": s.position, "index": s.index, "loss": s.loss, **({"group_size": s.size} if s.size > 1 else {})}
            for s in top
        ],
        "batch_size": samples.batch_size,
        "share_of_batch_loss": sum(s.loss * s.size for s in top) / samples.batch_loss_sum,
        "source": samples.source,
        **({"note": samples.note} if samples.note else {}),
    }


def _explained_by_top(ctx: SpikeContext, max_count: int = 3) -> tuple[int, float]:
    """Smallest number of top samples whose removal takes most of the excess away, and the fraction it takes."""
    samples = ctx.samples
    best = (0, 0.0)
    if samples is None or samples.batch_size < 2 or ctx.excess <= 0 or not math.isfinite(samples.batch_loss_sum):
        return best
    removed_loss, removed_count = 0.0, 0
    for count, sample in enumerate(samples.top[:max_count], start=1):
        removed_loss += sample.loss * sample.size
        removed_count += sample.size
        if removed_count >= samples.batch_size:
            break
        mean_without = (samples.batch_loss_sum - removed_loss) / (samples.batch_size - removed_count)
        explained = max(0.0, min(1.0, (ctx.loss - mean_without) / ctx.excess))
        if explained > best[1] + 1e-9:
            best = (count, explained)
        if explained >= 0.7:
            break
    return best


def outlier_sample(ctx: SpikeContext) -> CauseScore | None:
    samples = ctx.samples
    if samples is None or not samples.top:
        return None
    count, explained = _explained_by_top(ctx)
    if count == 0:
        return None
    fair_share = samples.batch_loss_sum / samples.batch_size
    dominance = samples.top[0].loss / fair_share if fair_share > 0 else math.inf
    # A sample must carry several times its fair share: in a batch of two, one always carries more.
    dominance_weight = max(0.0, min(1.0, (dominance - 2.0) / 3.0))
    score = 0.88 * explained * dominance_weight
    if score <= 0:
        return None
    evidence = _sample_evidence(ctx, count)
    evidence.update(explained_fraction=explained, times_fair_share=dominance)
    return CauseScore(Cause.OUTLIER_SAMPLE, score, evidence)


def log_zero(ctx: SpikeContext) -> CauseScore | None:
    def in_log_zero_range(loss: float) -> bool:
        return LOG_ZERO_MIN_NATS <= loss <= LOG_ZERO_MAX_NATS

    if ctx.has_integer_targets is False:
        return None  # a regression loss can land in the same range without any probability near 0
    samples = ctx.samples
    if samples is not None and samples.top and samples.top[0].size == 1:
        top = samples.top[0]
        count, explained = _explained_by_top(ctx)
        if not in_log_zero_range(top.loss) or explained < 0.5:
            return None
        evidence = _sample_evidence(ctx, max(count, 1))
        evidence.update(probability=math.exp(-top.loss), explained_fraction=explained)
        return CauseScore(Cause.LOG_ZERO, 0.95 * explained, evidence)
    if in_log_zero_range(ctx.loss):
        evidence = {"batch_loss": ctx.loss, "probability": math.exp(-ctx.loss), "note": "per-sample losses unavailable"}
        return CauseScore(Cause.LOG_ZERO, 0.6, evidence)
    return None


def input_scale(ctx: SpikeContext) -> CauseScore | None:
    if ctx.input_rms is None or ctx.input_rms_z is None or not ctx.input_rms_median:
        return None
    if not math.isfinite(ctx.input_rms) or ctx.input_rms_z < ctx.z_threshold:
        return None
    ratio = ctx.input_rms / ctx.input_rms_median
    if ratio < 2.0:
        return None
    score = 0.92 if ratio >= 10.0 else 0.6
    evidence = {"input_rms": ctx.input_rms, "typical_input_rms": ctx.input_rms_median, "ratio": ratio}
    if ctx.input_rms_sample is not None:
        evidence["sample"] = ctx.input_rms_sample
    return CauseScore(Cause.INPUT_SCALE, score, evidence)


def adam_second_moment(ctx: SpikeContext) -> CauseScore | None:
    if not ctx.adam:
        return None
    worst = max(ctx.adam, key=lambda layer: layer.update_ratio)
    if not math.isfinite(worst.update_ratio) or worst.update_ratio < 1.0:
        return None
    # A sign-like step has ratio 1; above 1.5 the update was bigger than Adam's own bound, which
    # only happens when exp_avg_sq fell far below the squared gradient.
    score = 0.85 if worst.update_ratio >= 1.5 else 0.5
    ratios = sorted(layer.update_ratio for layer in ctx.adam)
    evidence = {
        "layer": worst.name,
        "update_ratio": worst.update_ratio,
        "typical_update_ratio": ratios[len(ratios) // 2],
        "grad_to_second_moment": worst.grad_to_moment,
        "sign_like_fraction": worst.sign_like_fraction,
    }
    return CauseScore(Cause.ADAM_SECOND_MOMENT, score, evidence)


def layer_gradient(ctx: SpikeContext) -> CauseScore | None:
    layers = ctx.layers
    if layers is None or len(layers.names) < 2:
        return None
    best: CauseScore | None = None
    for norms, when, weight in ((layers.previous, "previous step", 0.8), (layers.current, "this step", 0.75)):
        if norms is None:
            continue
        ratios = [n / max(t, 1e-12) if (t > 0 or n > 0) else 0.0 for n, t in zip(norms, layers.typical)]
        if not all(math.isfinite(r) for r in ratios):
            continue
        order = sorted(range(len(ratios)), key=ratios.__getitem__, reverse=True)
        top, second = ratios[order[0]], max(ratios[order[1]], 1.0)
        dominance = top / second
        if top < 10.0 or dominance < 3.0:
            continue
        score = weight * min(1.0, dominance / 10.0 + 0.5)
        if best is None or score > best.score:
            evidence = {
                "layer": layers.names[order[0]],
                "grad_norm": norms[order[0]],
                "typical_grad_norm": layers.typical[order[0]],
                "ratio": top,
                "next_layer": layers.names[order[1]],
                "next_ratio": ratios[order[1]],
                "which": when,
            }
            best = CauseScore(Cause.LAYER_GRADIENT, score, evidence)
    return best


def learning_rate(ctx: SpikeContext) -> CauseScore | None:
    best: CauseScore | None = None
    for group, history in enumerate(ctx.lr_history):
        # Only a jump from one step to the next counts (warm-up ramps grow smoothly); a recent jump
        # weighs more than one several steps back, where instability had time to build up.
        for back in range(1, len(history)):
            before, after = history[-back - 1], history[-back]
            if before <= 0 or after / before < 1.3:
                continue
            jump = after / before
            score = (0.85 if jump >= 2.0 else 0.5) * (1.0 if back <= 2 else 0.8)
            if best is None or score > best.score:
                evidence = {
                    "param_group": group,
                    "lr_before": before,
                    "lr_after": after,
                    "jump": jump,
                    "steps_before": back - 1,
                }
                best = CauseScore(Cause.LEARNING_RATE, score, evidence)
    return best


def minibatch_noise(ctx: SpikeContext) -> CauseScore:
    evidence: dict = {"loss_z": ctx.loss_z, "typical_loss": ctx.loss_median}
    if ctx.samples is not None and ctx.samples.note:
        evidence["replay_note"] = ctx.samples.note
    if ctx.class_counts:
        evidence["class_counts"] = dict(sorted(ctx.class_counts.items()))
    return CauseScore(Cause.MINIBATCH_NOISE, NOISE_SCORE, evidence)


Rule = Callable[[SpikeContext], "CauseScore | None"]

RULES: tuple[Rule, ...] = (
    non_finite,
    log_zero,
    input_scale,
    outlier_sample,
    short_batch,
    adam_second_moment,
    learning_rate,
    layer_gradient,
    minibatch_noise,
)


def rank_causes(ctx: SpikeContext, rules: Sequence[Rule] = RULES) -> list[CauseScore]:
    """Run every rule and return the causes that apply, best first (ties keep rule order)."""
    scores = [score for rule in rules if (score := rule(ctx)) is not None and score.score > 0]
    return sorted(scores, key=lambda s: -s.score)
