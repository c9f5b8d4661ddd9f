"""What SpikeWatch does about a spike when the user asks it to: the policy and the skip list.

Pure: a cause and a few numbers in, a decision out. The torch side (dropping an update, scaling
gradients, fingerprinting a batch) is in `interventions.py`; the callback wires the two.

Every cause is known before the optimizer steps: the batch-level ones (short_batch,
outlier_sample via replay, log_zero, input_scale, non_finite) from the batch and its loss, the
optimizer-level ones (adam_second_moment, layer_gradient, learning_rate) from the gradients,
Adam's state and the learning rate, all of which are read in ``on_before_optimizer_step``. Only a
``per_sample_loss`` returned by ``training_step`` arrives later (in ``on_train_batch_end``); the
decision then rests on replay or on the batch-level rules, and the event keeps the final ranking.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from lightning_spikewatch.events import Cause


class Action(str, Enum):
    """What to do about a spike. Values are the strings users pass and the export carries."""

    SKIP = "skip"  # drop this step's update: the optimizer does not see the batch
    CLIP = "clip"  # scale the gradient down to the detector's bound for the gradient norm
    STOP = "stop"  # drop the update, save a checkpoint and a skip list, end the fit


# When two batches of one step (gradient accumulation) ask for different actions, the stronger wins.
STRENGTH = {Action.CLIP: 1, Action.SKIP: 2, Action.STOP: 3}


@dataclass(frozen=True)
class ActionTaken:
    """One action applied to one optimizer step, as recorded on its event."""

    action: Action
    reason: str  # plain words, e.g. "update dropped" or "gradient norm 812 clipped to 3.1"
    factor: float | None = None  # clip: what the gradients were multiplied by

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"action": self.action.value, "reason": self.reason}
        if self.factor is not None:
            data["factor"] = self.factor if math.isfinite(self.factor) else None
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ActionTaken:
        factor = data.get("factor")
        return cls(Action(data["action"]), str(data.get("reason", "")), None if factor is None else float(factor))


def stronger(a: ActionTaken | None, b: ActionTaken | None) -> ActionTaken | None:
    if a is None or b is None:
        return a or b
    return b if STRENGTH[b.action] > STRENGTH[a.action] else a


@dataclass(frozen=True)
class ActionPolicy:
    """Which action to take, and for which causes.

    Args:
        action: ``"skip"``, ``"clip"`` or ``"stop"``.
        causes: the causes it applies to; every cause when None.

    Raises:
        ValueError: if the action or a cause is not one of the known names.
    """

    action: Action
    causes: frozenset[Cause]

    @classmethod
    def build(cls, action: str, causes: Iterable[str] | None = None) -> ActionPolicy:
        allowed = [a.value for a in Action]
        if action not in allowed:
            raise ValueError(f"SpikeWatch: `action={action!r}` is not valid; expected None or one of {allowed}.")
        if causes is None:
            return cls(Action(action), frozenset(Cause))
        names = [causes] if isinstance(causes, str) else list(causes)
        known = [c.value for c in Cause]
        unknown = [name for name in names if name not in known]
        if unknown or not names:
            raise ValueError(
                f"SpikeWatch: `act_on={causes!r}` is not valid; expected a non-empty list of causes from {known}."
            )
        return cls(Action(action), frozenset(Cause(name) for name in names))

    def decide(self, cause: Cause, grad_norm: float | None, bound: float | None) -> ActionTaken | None:
        """The action for a spike whose most likely cause is ``cause`` (None: leave it alone).

        ``grad_norm`` is the step's gradient norm and ``bound`` the largest norm the detector
        does not call an outlier; ``clip`` scales the first down to the second, and drops the
        update instead when the gradient is not finite (no factor can bound it).
        """
        if cause not in self.causes:
            return None
        if self.action is Action.SKIP:
            return ActionTaken(Action.SKIP, f"update dropped ({cause.value})")
        if self.action is Action.STOP:
            return ActionTaken(Action.STOP, f"update dropped and the fit stopped ({cause.value})")
        if grad_norm is not None and not math.isfinite(grad_norm):
            return ActionTaken(Action.SKIP, "gradient not finite, so the update was dropped instead of clipped")
        if grad_norm is None or bound is None or not math.isfinite(bound) or grad_norm <= bound:
            return None  # the loss spiked but the gradient is within bounds: nothing to clip
        factor = bound / grad_norm
        return ActionTaken(Action.CLIP, f"gradient norm {grad_norm:.4g} clipped to {bound:.4g}", factor)


# ---------------------------------------------------------------------------------------- skip list

FINGERPRINT_RTOL = 1e-6  # the sums travel to the host as float32


@dataclass(frozen=True)
class SkipEntry:
    """A batch that ``stop`` set aside, recognised on resume by its content.

    A resumed fit can deliver batches under new ``batch_idx`` values (Lightning restarts a
    non-resumable DataLoader from its first batch), so the batch is matched by ``fingerprint``:
    its size and, per tensor, the sum and the sum of squares of its values.
    """

    step: int
    epoch: int
    batch_idx: int
    fingerprint: tuple[float, ...]
    rank: int = 0
    indices: list[int] | None = None  # dataset indices of its samples, when the batch carries them
    cause: str | None = None

    @property
    def key(self) -> tuple[int, int]:
        return (self.step, self.rank)

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "epoch": self.epoch,
            "batch_idx": self.batch_idx,
            "rank": self.rank,
            "cause": self.cause,
            "indices": self.indices,
            "fingerprint": list(self.fingerprint),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SkipEntry:
        return cls(
            step=int(data["step"]),
            epoch=int(data["epoch"]),
            batch_idx=int(data["batch_idx"]),
            fingerprint=tuple(math.nan if v is None else float(v) for v in data["fingerprint"]),  # JSON null: NaN
            rank=int(data.get("rank", 0)),
            indices=data.get("indices"),
            cause=data.get("cause"),
        )


def same_fingerprint(a: Sequence[float], b: Sequence[float], rtol: float = FINGERPRINT_RTOL) -> bool:
    """Equal sums, up to rounding; NaN matches NaN (a batch with a NaN in it has NaN sums)."""

    def same(x: float, y: float) -> bool:
        return (math.isnan(x) and math.isnan(y)) or math.isclose(x, y, rel_tol=rtol, abs_tol=1e-12)

    return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))


@dataclass
class SkipList:
    """Batches to skip, each once, in this process's rank; entries seen once are kept as consumed
    so that resuming from a later checkpoint or re-reading the skip file does not bring them back."""

    rank: int = 0
    pending: list[SkipEntry] = field(default_factory=list)
    consumed: set[tuple[int, int]] = field(default_factory=set)

    def __bool__(self) -> bool:
        return bool(self.pending)

    def add(self, entries: Iterable[SkipEntry]) -> None:
        known = self.consumed | {entry.key for entry in self.pending}
        for entry in entries:
            if entry.rank == self.rank and entry.key not in known:
                self.pending.append(entry)
                known.add(entry.key)

    def match(self, fingerprint: Sequence[float]) -> SkipEntry | None:
        """The pending entry with this fingerprint, now consumed; None if there is none."""
        for position, entry in enumerate(self.pending):
            if same_fingerprint(entry.fingerprint, fingerprint):
                del self.pending[position]
                self.consumed.add(entry.key)
                return entry
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"pending": [e.to_dict() for e in self.pending], "consumed": [list(k) for k in sorted(self.consumed)]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.consumed = {(int(step), int(rank)) for step, rank in state.get("consumed", [])}
        self.pending = []
        self.add(SkipEntry.from_dict(d) for d in state.get("pending", []))
