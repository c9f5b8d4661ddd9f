"""Find the samples that dominate a spiking batch, without disturbing any training state.

``find_dominant_samples`` is a pure best-first bisection over batch positions; ``ReplayGuard``
makes calling ``training_step`` on a sub-batch invisible to the run: RNG streams forked, buffers,
train/eval flags and torchmetrics state restored, ``self.log`` muted, no autograd graph.
"""

from __future__ import annotations

import copy
import heapq
import inspect
import random
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass(frozen=True)
class SampleGroup:
    """Batch positions whose summed loss was measured together; a single sample when split fully."""

    positions: tuple[int, ...]
    loss_sum: float


@dataclass(frozen=True)
class DominantSamples:
    groups: list[SampleGroup]  # largest loss first
    replays: int
    note: str | None = None


def find_dominant_samples(
    loss_sum_of: Callable[[Sequence[int]], float | None],
    batch_size: int,
    batch_loss_sum: float,
    top_k: int = 3,
    max_replays: int = 24,
) -> DominantSamples:
    """Best-first bisection: always split the group carrying the most loss, until ``top_k`` single
    samples are isolated, nothing left stands out, or the replay budget is spent.

    ``loss_sum_of(positions)`` returns the summed loss of those samples (None if that sub-batch
    cannot be evaluated, e.g. BatchNorm in training mode with one sample). One sample among ``n``
    costs about ``2 * log2(n)`` replays. When a half cannot be evaluated alone, it is evaluated
    together with a sample from the quietest group seen so far, whose typical loss is subtracted.
    """
    heap: list[tuple[float, tuple[int, ...]]] = [(-batch_loss_sum, tuple(range(batch_size)))]
    found: list[SampleGroup] = []
    quietest: tuple[float, tuple[int, ...]] | None = None  # (mean loss per sample, positions)
    replays, note = 0, None
    while heap and len(found) < top_k:
        negative_sum, positions = heapq.heappop(heap)
        if found:
            rest = batch_size - sum(len(g.positions) for g in found)
            fair_share = (batch_loss_sum - sum(g.loss_sum for g in found)) / max(rest, 1)
            if -negative_sum - fair_share * len(positions) < 3.0 * fair_share:
                break  # nothing left stands out: no group carries 3 samples' worth of loss beyond its share
        if len(positions) == 1:
            found.append(SampleGroup(positions, -negative_sum))
            continue
        if replays + 2 > max_replays:
            note = note or f"replay budget of {max_replays} spent before a single sample was isolated"
            found.append(SampleGroup(positions, -negative_sum))
            continue
        middle = len(positions) // 2
        halves = (positions[:middle], positions[middle:])
        sums = [loss_sum_of(half) for half in halves]
        replays += 2
        if any(s is None for s in sums) and quietest is not None and replays + 2 <= max_replays:
            reference_mean, reference = quietest
            helper = next((p for p in reference if p not in positions), None)
            if helper is not None:
                padded = [loss_sum_of((*half, helper)) for half in halves]
                replays += 2
                sums = [None if s is None else s - reference_mean for s in padded]
        if any(s is None for s in sums):
            note = note or f"the batch could not be split below {len(positions)} samples"
            found.append(SampleGroup(positions, -negative_sum))
            continue
        for half, loss_sum in zip(halves, sums):
            heapq.heappush(heap, (-loss_sum, half))
            if quietest is None or loss_sum / len(half) < quietest[0]:
                quietest = (loss_sum / len(half), half)
    found.sort(key=lambda group: -group.loss_sum)
    return DominantSamples(found, replays, note)


def _metric_modules(module: torch.nn.Module) -> list[Any]:
    try:
        from torchmetrics import Metric
    except ImportError:  # torchmetrics is optional for the user's module
        return []
    return [m for m in module.modules() if isinstance(m, Metric)]


def _snapshot_metric(metric: Any) -> dict[str, Any]:
    state = {}
    for name in metric._defaults:
        value = getattr(metric, name)
        state[name] = value.clone() if isinstance(value, torch.Tensor) else copy.copy(value)
    extras = {
        k: copy.copy(getattr(metric, k)) for k in ("_update_count", "_computed", "_forward_cache") if hasattr(metric, k)
    }
    return {"state": state, "extras": extras}


def _restore_metric(metric: Any, snapshot: Mapping[str, Any]) -> None:
    for name, value in snapshot["state"].items():
        setattr(metric, name, value)
    for name, value in snapshot["extras"].items():
        setattr(metric, name, value)


@contextmanager
def _muted_logging(module: torch.nn.Module):
    """Shadow ``log``/``log_dict`` with no-ops on the instance, so a replay cannot overwrite logged values."""
    muted = [name for name in ("log", "log_dict") if name not in vars(module)]
    for name in muted:
        object.__setattr__(module, name, lambda *args, **kwargs: None)
    try:
        yield
    finally:
        for name in muted:
            object.__delattr__(module, name)


@contextmanager
def preserved_training_state(module: torch.nn.Module):
    """Everything a forward pass in training mode can change is put back on exit."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    python_state, numpy_state = random.getstate(), np.random.get_state()
    buffers = {name: buf.detach().clone() for name, buf in module.named_buffers()}
    modes = [(m, m.training) for m in module.modules()]
    metrics = [(m, _snapshot_metric(m)) for m in _metric_modules(module)]
    with ExitStack() as stack:
        stack.enter_context(torch.random.fork_rng(devices=devices))
        stack.enter_context(torch.no_grad())
        stack.enter_context(_muted_logging(module))
        try:
            yield
        finally:
            with torch.no_grad():
                for name, buf in module.named_buffers():
                    if name in buffers:
                        buf.copy_(buffers[name])
            for m, training in modes:
                m.training = training
            for m, snapshot in metrics:
                _restore_metric(m, snapshot)
            random.setstate(python_state)
            np.random.set_state(numpy_state)


def loss_from_output(output: Any) -> torch.Tensor | None:
    """The loss tensor out of whatever ``training_step`` returned (tensor, dict with 'loss', or None)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping) and isinstance(output.get("loss"), torch.Tensor):
        return output["loss"]
    return None


def training_step_takes_batch_idx(module: torch.nn.Module) -> bool:
    """Whether ``training_step`` accepts ``batch_idx``, mirroring how Lightning calls it."""
    try:
        parameters = inspect.signature(module.training_step).parameters
    except (TypeError, ValueError):
        return True
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in parameters.values()):
        return True
    return "batch_idx" in parameters or len(parameters) >= 2
