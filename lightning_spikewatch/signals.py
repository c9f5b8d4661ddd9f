"""Read one step's numbers from tensors: fused gradient norms, batch composition, Adam state.

Per-step readers only launch device ops and return device tensors (no host sync); the readers
used on a spike (Adam state, per-sample inputs, class counts) may transfer, since they run rarely.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Container, Iterable, Mapping, Sequence
from typing import Any

import torch
from lightning_utilities.core.apply_func import apply_to_collection

from lightning_spikewatch.causes import AdamLayer


def input_tensors(batch: Any, target_keys: Sequence[str]) -> list[torch.Tensor]:
    """The floating, non-empty input tensors of a batch, targets left out (see ``without_targets``)."""
    if type(batch) in (tuple, list) and len(batch) >= 2:  # fast path for the usual (x, y) batch
        inputs = batch[:-1]
        if all(type(t) is torch.Tensor for t in inputs):
            return [t for t in inputs if t.is_floating_point() and t.numel()]
    return floating(tensor_leaves(without_targets(batch, target_keys)))


def tensor_leaves(batch: Any) -> list[torch.Tensor]:
    """Every tensor in a (nested) batch collection, in iteration order."""
    # Fast paths for the common flat batches: this runs on every step.
    if isinstance(batch, torch.Tensor):
        return [batch]
    if type(batch) in (tuple, list) and all(isinstance(item, torch.Tensor) for item in batch):
        return list(batch)
    if type(batch) is dict and all(isinstance(item, torch.Tensor) for item in batch.values()):
        return list(batch.values())
    # A read-only walk: apply_to_collection would rebuild every container on the way, which costs
    # time and fails for types such as PackedSequence that validate what they are built from.
    leaves: list[torch.Tensor] = []
    _collect(batch, leaves, depth=0)
    return leaves


def _collect(item: Any, leaves: list[torch.Tensor], depth: int) -> None:
    if isinstance(item, torch.Tensor):
        leaves.append(item)
    elif depth > 32 or isinstance(item, (str, bytes)):
        return
    elif isinstance(item, Mapping):
        for value in item.values():
            _collect(value, leaves, depth + 1)
    elif isinstance(item, (list, tuple)):
        for value in item:
            _collect(value, leaves, depth + 1)
    elif dataclasses.is_dataclass(item) and not isinstance(item, type):
        for f in dataclasses.fields(item):
            _collect(getattr(item, f.name), leaves, depth + 1)


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


def first_dim_size(batch: Any, target_keys: Container[str], inputs: Sequence[torch.Tensor] | None = None) -> int | None:
    """The batch size: dim 0 of the first floating, non-empty input tensor (``inputs``, when the
    caller has them), else of the first tensor with a dim (as Lightning), None if none has one. A
    flat dict of tensors is read without building lists, since the quiet step sizes every batch."""
    if inputs is not None:
        return batch_size_of(inputs) or batch_size_of(tensor_leaves(batch))
    if type(batch) is dict or isinstance(batch, Mapping):
        first = None
        for key, value in batch.items():
            if type(value) is not torch.Tensor:
                break  # a nested or mixed batch: the general walk, in its leaves' order
            if value.ndim:
                if key not in target_keys and value.is_floating_point() and value.numel():
                    return value.shape[0]
                if first is None:
                    first = value.shape[0]
        else:
            return first
    return batch_size_of(input_tensors(batch, target_keys)) or batch_size_of(tensor_leaves(batch))


def floating(leaves: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The non-empty floating tensors: the ones whose magnitude is worth watching."""
    return [leaf for leaf in leaves if leaf.is_floating_point() and leaf.numel() > 0]


def fused_norms(tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """L2 norm of every tensor in one fused kernel launch per device and dtype."""
    return tuple(torch._foreach_norm(list(tensors))) if tensors else ()


def to_host(scalars: Sequence[torch.Tensor]) -> list[float]:
    """Move 0-d tensors to the host together: one stack and one device-to-host transfer.

    No ``torch.no_grad()`` (its context costs more than the stack on the CPU): a scalar that
    carries a graph only adds a stack node to it, dropped with the result."""
    try:
        stacked = torch.stack(scalars)
    except RuntimeError:  # scalars on several devices (e.g. inputs kept on CPU): gather them first
        device = scalars[0].device
        stacked = torch.stack([s.reshape(()).to(device) for s in scalars])
    return (stacked if stacked.dtype == torch.float32 else stacked.float()).tolist()


SAMPLE_BLOCK = 1024  # contiguous elements per sampled block: whole cache lines, few strides


class GradientReader:
    """The gradients of a fixed list of named parameters, in a fixed order.

    On the CPU a full norm over a large gradient costs a pass over all of its memory on every step,
    so a gradient with more than ``sample`` elements is read through a fixed view of about
    ``sample`` elements (evenly spaced blocks of ``SAMPLE_BLOCK``), and its norm is scaled up.
    The estimate follows the true norm step by step (same elements every step), which is what
    outlier detection needs; on a spike the exact norms are read. On accelerators one fused
    kernel over every element is cheap, so every element is read there.
    """

    def __init__(self, named_parameters: Iterable[tuple[str, torch.nn.Parameter]], sample: int | None = None):
        pairs = [(name, p) for name, p in named_parameters if p.requires_grad]
        self.names = [name for name, _ in pairs]
        self.params = [p for _, p in pairs]
        self.name_of = {p: name for name, p in pairs}
        self.sample = sample
        self.sampled = False  # whether the last read estimated any norm from a sample
        self._has_large = sample is not None and any(p.numel() > sample for p in self.params)

    def __len__(self) -> int:
        return len(self.params)

    def grads(self) -> tuple[list[torch.Tensor], list[int] | None]:
        """The present gradients, and their positions when some parameters have none this step."""
        grads = [p.grad for p in self.params]
        if all(g is not None for g in grads):  # (`None in grads` would compare tensors with None: slow)
            return grads, None
        positions = [i for i, g in enumerate(grads) if g is not None]
        return [grads[i] for i in positions], positions

    def views(self, grads: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[float] | None]:
        """What to take the norm of for each gradient, and the factor that turns it into the norm."""
        limit = self.sample
        if not self._has_large or not grads or grads[0].device.type != "cpu":  # cheapest test first
            self.sampled = False
            return grads, None
        views, factors = [], []
        for grad in grads:
            numel = grad.numel()
            if numel <= limit or not grad.is_contiguous():
                views.append(grad)
                factors.append(1.0)
                continue
            blocks = numel // SAMPLE_BLOCK
            every = max(1, blocks * SAMPLE_BLOCK // limit)
            rows = (blocks - 1) // every + 1
            views.append(grad.as_strided((rows, SAMPLE_BLOCK), (every * SAMPLE_BLOCK, 1)))
            factors.append(math.sqrt(numel / (rows * SAMPLE_BLOCK)))
        self.sampled = any(f != 1.0 for f in factors)
        return views, factors if self.sampled else None

    def spread(self, norms: Sequence[float], positions: list[int] | None) -> list[float]:
        """Norms of the present gradients placed at their parameters' positions (0 elsewhere)."""
        if positions is None:
            return list(norms)
        full = [0.0] * len(self.params)
        for position, norm in zip(positions, norms):
            full[position] = norm
        return full


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


def index_value(batch: Any, keys: Sequence[str]) -> Any:
    """The first value the batch carries under one of ``keys`` (dict key or attribute), or None."""
    for key in keys:
        value = batch.get(key) if isinstance(batch, Mapping) else getattr(batch, key, None)
        if value is not None:
            return value
    return None


def dataset_indices(batch: Any, keys: Sequence[str], batch_size: int) -> list[int] | None:
    """Dataset indices carried by the batch under one of ``keys``, if they fit the batch size."""
    value = index_value(batch, keys)
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
