"""The torch side of the opt-in actions: drop an update, bound a gradient, fingerprint a batch.

Called from ``on_before_optimizer_step``, where the gradients are complete, unscaled and about to
be used. None of these reads a value back to the host.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def optimizer_gradients(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]


def drops_missing_gradients(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` leaves a parameter without a gradient untouched: moments, step count
    and all. Every optimizer in ``torch.optim`` does; an unknown one may assume a gradient exists."""
    return type(optimizer).__module__.startswith("torch.optim") and not isinstance(optimizer, torch.optim.LBFGS)


def drop_update(optimizer: torch.optim.Optimizer, remove_gradients: bool) -> None:
    """Make the coming ``optimizer.step()`` leave the weights as they are.

    With ``remove_gradients`` the gradients are set to None, which torch's optimizers treat as
    "this parameter took no part": its weight, moments and step count stay exactly as they were.
    Otherwise they are zeroed in place (for optimizers that may not accept a missing gradient:
    plain SGD then makes no move; momentum or Adam moments still decay by one step).
    """
    if remove_gradients:
        for group in optimizer.param_groups:
            for parameter in group["params"]:
                parameter.grad = None
        return
    grads = optimizer_gradients(optimizer)
    if grads:
        torch._foreach_zero_(grads)


def clip_gradients(optimizer: torch.optim.Optimizer, bound: float) -> None:
    """Scale all gradients so that their global L2 norm is at most ``bound``, on the device.

    The norm is recomputed exactly here and the factor stays a tensor, so this needs no sync.
    """
    grads = optimizer_gradients(optimizer)
    if not grads:
        return
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for grad in grads:
        by_device.setdefault(grad.device, []).append(grad)
    device = grads[0].device
    squares = [torch.stack(torch._foreach_norm(group)).float().pow(2).sum().to(device) for group in by_device.values()]
    total = torch.stack(squares).sum().sqrt()
    factor = torch.clamp(bound / (total + 1e-6), max=1.0)
    for group_device, group in by_device.items():
        torch._foreach_mul_(group, factor.to(group_device))


def fingerprint_tensors(leaves: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Per tensor of a batch, the sum and the sum of squares of its values (0-dim tensors).

    Computed in float64 where the device has it, so that the same batch gives the same numbers
    in a resumed run; moved to the host with the step's other numbers.
    """
    scalars = []
    for leaf in leaves:
        if leaf.numel() == 0 or leaf.is_complex():
            continue
        dtype = torch.float32 if leaf.device.type == "mps" else torch.float64
        values = leaf.detach().to(dtype)
        scalars += [values.sum(), values.square().sum()]
    return scalars
