"""Tensor readers: fused norms equal per-tensor norms, batch walking, slicing, Adam state reading."""

import math
from collections import namedtuple

import pytest
import torch
from torch import nn

from lightning_spikewatch.signals import (
    GradientReader,
    LayerNormHistory,
    adam_layers,
    batch_size_of,
    class_counts,
    dataset_indices,
    input_max_abs,
    largest_input_position,
    slice_batch,
    tensor_leaves,
    without_targets,
)


def test_fused_layer_norms_equal_per_tensor_norms_and_skip_missing_grads():
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    model(torch.randn(4, 5)).square().sum().backward()
    model[2].bias.grad = None  # a parameter without gradient this step
    reader = GradientReader(model.named_parameters())
    norms = reader.layer_norms()
    expected = [p.grad.norm().item() if p.grad is not None else 0.0 for p in model.parameters()]
    assert norms.tolist() == pytest.approx(expected, rel=1e-6)
    assert reader.names == ["0.weight", "0.bias", "2.weight", "2.bias"]


def test_layer_history_gives_current_previous_and_typical_norms():
    history = LayerNormHistory(window=4, layers=2, device=torch.device("cpu"))
    for step in range(6):
        history.record(torch.tensor([float(step), 10.0]))
    current, previous, typical = history.snapshot()
    assert current == [5.0, 10.0] and previous == [4.0, 10.0]
    assert typical[1] == 10.0 and 2.0 <= typical[0] <= 4.0  # median of the last 4 rows


def test_input_magnitude_ignores_targets_and_carries_non_finite_values():
    batch = {"x": torch.tensor([[1.0, -7.0]]), "y": torch.tensor([[100.0]]), "index": torch.tensor([3])}
    assert float(input_max_abs(tensor_leaves(without_targets(batch, ["y"])))) == 7.0
    assert float(input_max_abs(tensor_leaves(without_targets((batch["x"], batch["y"]), [])))) == 7.0
    assert math.isnan(float(input_max_abs([torch.tensor([1.0, math.nan])])))
    assert input_max_abs([torch.tensor([1, 2])]) is None  # no floating inputs


def test_batches_of_every_shape_are_sized_sliced_and_indexed():
    Pair = namedtuple("Pair", "x y")
    batch = {
        "pair": Pair(torch.arange(8.0).reshape(4, 2), torch.tensor([0, 1, 1, 0])),
        "idx": [10, 11, 12, 13],
        "name": "a",
    }
    leaves = tensor_leaves(batch)
    assert batch_size_of(leaves) == 4
    sub = slice_batch(batch, [1, 3], 4)
    assert isinstance(sub["pair"], Pair) and sub["pair"].y.tolist() == [1, 0] and sub["name"] == "a"
    assert dataset_indices(batch, ["index", "idx"], 4) == [10, 11, 12, 13]
    assert class_counts(leaves, 4) == {0: 2, 1: 2}
    assert largest_input_position([batch["pair"].x], 4) == 3


def test_adam_layers_reconstruct_the_last_update_from_optimizer_state():
    torch.manual_seed(0)
    layer = nn.Linear(3, 2)
    optimizer = torch.optim.Adam(layer.parameters(), lr=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        layer(torch.randn(5, 3)).sum().backward()
        before = layer.weight.detach().clone()
        optimizer.step()
    applied = (layer.weight.detach() - before) / 0.1  # the last update, in units of lr
    stats = adam_layers(optimizer, {layer.weight: "weight", layer.bias: "bias"})
    weight = next(s for s in stats if s.name == "weight")
    assert weight.update_ratio == pytest.approx(applied.square().mean().sqrt().item(), rel=1e-4)
    assert len(optimizer.state) == 2  # reading inserted nothing


def test_adam_layers_skip_other_optimizers():
    layer = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
    layer(torch.randn(5, 3)).sum().backward()
    optimizer.step()
    assert adam_layers(optimizer, {}) is None
