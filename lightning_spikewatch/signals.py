"""Read one step's numbers from tensors: fused gradient norms, batch composition, Adam state.

Per-step readers only launch device ops and return device tensors (no host sync); the readers
used on a spike (Adam state, per-sample inputs, class counts) may transfer, since they run rarely.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from lightning_utilities.core.apply_func import apply_to_collection

from lightning_spikewatch.causes import AdamLayer


def tensor_leaves(batch: Any) -> list[torch.Tensor]:
    """Every tensor in a (nested) batch collection, in iteration order."""
    leaves: list[torch.Tensor] = []
    apply_to_collection(batch, torch.Tensor, leaves.append)
    return leaves


def without_targets(batch: Any, target_keys: Sequence[str]) -> Any:
    """The batch minus its targets, for measuring input magnitude: dict entries named like targets
    are dropped, and so is the last element of a ``(inputs..., target)`` tuple or list."""
    if isinstance(batch, Mapping):
        return {k: v for k, v in batch.items() if k not in target_keys}
    if isinstance(batch, (tuple, list)) and len(batch) >= 2 and not hasattr(batch, "_fields"):
        return batch[:-1]
    return batch


def batch_size_of(leaves: Sequence[torch.Tensor]) -> int | None:
    """Size of dim 0 of the first non-scalar tensor (as Lightning does), or None if there is none."""
    for leaf in leaves:
        if leaf.ndim > 0:
            return int(leaf.shape[0])
    return None


def input_max_abs(leaves: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """Largest absolute value over the floating tensors of a batch, as a 0-d device tensor.

    NaN or inf in any input shows up in the result, so one number also carries the non-finite check.
    """
    floats = [leaf for leaf in leaves if leaf.is_floating_point() and leaf.numel() > 0]
    if not floats:
        return None
    maxima = torch._foreach_norm(floats, float("inf"))
    return maxima[0].float() if len(maxima) == 1 else torch.stack(maxima).float().max()


class GradientReader:
    """Fused per-parameter gradient norms for a fixed list of named parameters."""

    def __init__(self, named_parameters: Iterable[tuple[str, torch.nn.Parameter]]):
        pairs = [(name, p) for name, p in named_parameters if p.requires_grad]
        self.names = [name for name, _ in pairs]
        self.params = [p for _, p in pairs]
        self.name_of = {p: name for name, p in pairs}

    def __len__(self) -> int:
        return len(self.params)

    def layer_norms(self) -> torch.Tensor | None:
        """Vector of the gradient norm of every parameter (0 where it has no gradient)."""
        grads = [p.grad for p in self.params]
        present = [g for g in grads if g is not None]
        if not present:
            return None
        norms = torch.stack(torch._foreach_norm(present)).float()
        if len(present) == len(grads):
            return norms
        index = torch.tensor([i for i, g in enumerate(grads) if g is not None], device=norms.device)
        return torch.zeros(len(grads), device=norms.device).index_copy_(0, index, norms)


class LayerNormHistory:
    """Ring buffer of per-layer gradient norms, kept on the device so recording costs no sync."""

    def __init__(self, window: int, layers: int, device: torch.device):
        self.window = window
        self.buffer = torch.zeros(window, layers, device=device)
        self.count = 0

    def record(self, norms: torch.Tensor) -> None:
        self.buffer[self.count % self.window].copy_(norms)
        self.count += 1

    def snapshot(self) -> tuple[list[float], list[float] | None, list[float]]:
        """(current, previous, typical) norms per layer: one transfer, used on a spike only."""
        filled = min(self.count, self.window)
        rows = self.buffer[:filled] if self.count <= self.window else self.buffer
        latest = (self.count - 1) % self.window
        current = self.buffer[latest].tolist()
        previous = self.buffer[(self.count - 2) % self.window].tolist() if self.count >= 2 else None
        typical = rows.median(dim=0).values.tolist()
        return current, previous, typical


def adam_layers(optimizer: torch.optim.Optimizer, name_of: Mapping[torch.Tensor, str]) -> list[AdamLayer] | None:
    """How oversized the last Adam update of each parameter was, from the optimizer's own state.

    Works for optimizers whose state holds ``exp_avg``/``exp_avg_sq``/``step`` and whose groups hold
    ``betas``/``eps`` (Adam, AdamW and look-alikes); returns None for any other optimizer. Reads
    state with ``state.get`` so nothing is inserted, and only reads.
    """
    rows: list[torch.Tensor] = []
    names: list[str] = []
    for group in optimizer.param_groups:
        if "betas" not in group or "eps" not in group:
            return None
        beta1, beta2 = group["betas"]
        eps = group["eps"]
        for p in group["params"]:
            state = optimizer.state.get(p)
            if not state or "exp_avg" not in state or "exp_avg_sq" not in state or "step" not in state:
                continue
            step = float(state["step"])
            if step < 1:
                continue
            second = state.get("max_exp_avg_sq", state["exp_avg_sq"]).float()
            m_hat = state["exp_avg"].float() / (1 - beta1**step)
            v_hat = second / (1 - beta2**step)
            per_coordinate = m_hat.abs() / (v_hat.sqrt() + eps)
            grad_sq = p.grad.float().square().mean() if p.grad is not None else torch.tensor(math.nan)
            rows.append(
                torch.stack(
                    [
                        per_coordinate.square().mean().sqrt(),
                        grad_sq.to(v_hat.device) / v_hat.mean().clamp_min(1e-30),
                        (per_coordinate > 0.5).float().mean(),
                    ]
                )
            )
            names.append(name_of.get(p, f"param{len(names)}"))
    if not rows:
        return None
    values = torch.stack([row.to(rows[0].device) for row in rows]).tolist()
    return [AdamLayer(name, *row) for name, row in zip(names, values)]


def slice_batch(batch: Any, positions: Sequence[int], batch_size: int) -> Any:
    """The sub-batch at ``positions``: every tensor whose first dim is the batch size is indexed."""
    index_cache: dict[torch.device, torch.Tensor] = {}

    def take(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.ndim == 0 or tensor.shape[0] != batch_size:
            return tensor
        if tensor.device not in index_cache:
            index_cache[tensor.device] = torch.as_tensor(list(positions), device=tensor.device)
        return tensor.index_select(0, index_cache[tensor.device])

    return apply_to_collection(batch, torch.Tensor, take)


def dataset_indices(batch: Any, keys: Sequence[str], batch_size: int) -> list[int] | None:
    """Dataset indices carried by the batch under one of ``keys`` (dict key or attribute), if any."""
    for key in keys:
        value = batch.get(key) if isinstance(batch, Mapping) else getattr(batch, key, None)
        if isinstance(value, torch.Tensor) and value.ndim == 1 and value.shape[0] == batch_size:
            return [int(v) for v in value.tolist()]
        if isinstance(value, (list, tuple)) and len(value) == batch_size and all(isinstance(v, int) for v in value):
            return list(value)
    return None


def largest_input_position(leaves: Sequence[torch.Tensor], batch_size: int) -> int | None:
    """Position in the batch of the sample with the largest absolute floating input."""
    per_sample = [
        leaf.detach().abs().reshape(batch_size, -1).amax(dim=1).float()
        for leaf in leaves
        if leaf.is_floating_point() and leaf.ndim > 0 and leaf.shape[0] == batch_size and leaf.numel() > 0
    ]
    if not per_sample:
        return None
    stacked = torch.stack([t.to(per_sample[0].device) for t in per_sample]).amax(dim=0)
    return int(torch.nan_to_num(stacked, nan=math.inf).argmax())


def class_counts(
    leaves: Sequence[torch.Tensor], batch_size: int, exclude: Sequence[torch.Tensor] = (), max_classes: int = 1000
) -> dict[int, int] | None:
    """Counts of the last 1-D integer tensor of the batch (usually the targets), if it looks like labels.

    ``exclude`` holds tensors that are not labels (e.g. the dataset indices).
    """
    for leaf in reversed(leaves):
        if any(leaf is other for other in exclude):
            continue
        if leaf.dtype in (torch.int64, torch.int32, torch.int16, torch.uint8) and leaf.ndim == 1:
            if leaf.shape[0] != batch_size or leaf.numel() == 0:
                continue
            values, counts = leaf.unique(return_counts=True)
            if len(values) > max_classes or int(values.min()) < 0:
                return None
            return dict(zip(values.tolist(), counts.tolist()))
    return None
