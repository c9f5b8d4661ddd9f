"""The `SpikeEvent` record and its JSON form.

One event per detected spike; its dict form is the public export schema (one JSONL line).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class Cause(str, Enum):
    """Why a spike happened. The values are the exact strings of the export format."""

    SHORT_BATCH = "short_batch"
    OUTLIER_SAMPLE = "outlier_sample"
    LOG_ZERO = "log_zero"
    INPUT_SCALE = "input_scale"
    ADAM_SECOND_MOMENT = "adam_second_moment"
    LAYER_GRADIENT = "layer_gradient"
    LEARNING_RATE = "learning_rate"
    NON_FINITE = "non_finite"
    MINIBATCH_NOISE = "minibatch_noise"


@dataclass(frozen=True)
class CauseScore:
    """One attribution rule's verdict: how well ``cause`` explains the spike, and why."""

    cause: Cause
    score: float
    evidence: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"cause": self.cause.value, "score": round(self.score, 4), "evidence": json_safe(self.evidence)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CauseScore:
        return cls(Cause(data["cause"]), float(data["score"]), dict(data.get("evidence") or {}))


@dataclass(frozen=True)
class SpikeEvent:
    """A detected loss spike and its ranked explanations.

    ``step`` is ``trainer.global_step`` when the batch was trained; ``batch_idx`` the 0-based
    position of the batch in its epoch. ``loss`` and ``zscore`` are NaN/inf for non-finite losses
    (written as JSON ``null``).
    """

    step: int
    epoch: int
    batch_idx: int
    loss: float
    zscore: float
    signals: list[str]
    causes: list[CauseScore]
    rank: int = 0
    action: dict[str, Any] | None = None  # what an opt-in action did to this step (see actions.py)

    @property
    def top(self) -> CauseScore:
        return self.causes[0]

    @property
    def cause(self) -> str:
        return self.top.cause.value

    @property
    def confidence(self) -> float:
        return self.top.score

    @property
    def evidence(self) -> dict[str, Any]:
        return self.top.evidence

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "epoch": self.epoch,
            "batch_idx": self.batch_idx,
            "loss": json_safe(self.loss),
            "zscore": json_safe(self.zscore),
            "signals": list(self.signals),
            "cause": self.cause,
            "confidence": round(self.confidence, 4),
            "causes": [c.to_dict() for c in self.causes],
            "evidence": json_safe(self.evidence),
            "rank": self.rank,
            "action": self.action,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SpikeEvent:
        """Rebuild an event from its exported dict (``null`` numbers come back as NaN)."""

        def number(value: Any) -> float:
            return math.nan if value is None else float(value)

        return cls(
            step=int(data["step"]),
            epoch=int(data["epoch"]),
            batch_idx=int(data["batch_idx"]),
            loss=number(data["loss"]),
            zscore=number(data["zscore"]),
            signals=list(data.get("signals", [])),
            causes=[CauseScore.from_dict(c) for c in data["causes"]],
            rank=int(data.get("rank", 0)),
            action=data.get("action"),
        )

    @property
    def key(self) -> tuple[int, int, int, int]:
        """Identifies the batch: the same spike found again after a resume has the same key."""
        return (self.step, self.epoch, self.batch_idx, self.rank)


def json_safe(value: Any) -> Any:
    """Make ``value`` strict-JSON friendly: non-finite floats become None, tuples lists, enums strings."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return json_safe(value.item())
    return value
