"""Tensor readers: fused norms equal per-tensor norms, batch walking, slicing, Adam state reading."""

import math
from collections import namedtuple

import pytest
import torch
from torch import nn

from lightning_spikewatch.signals import (
    GradientReader,
    adam_layers,
    batch_size_of,
    class_counts,
    dataset_indices,
    first_dim_size,
    floating,
    fused_norms,
    input_tensors,
    largest_input_position,
    slice_batch,
    tensor_leaves,
    to_host,
    without_targets,
)
from lightning_spikewatch.stats import VectorHistory


def test_fused_layer_norms_equal_per_tensor_norms_and_skip_missing_grads():
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    model(torch.randn(4, 5)).square().sum().backward()
    model[2].bias.grad = None  # a parameter without gradient this step
    reader = GradientReader(model.named_parameters())
    grads, positions = reader.grads()
    norms = reader.spread(to_host(fused_norms(grads)), positions)
    expected = [p.grad.norm().item() if p.grad is not None else 0.0 for p in model.parameters()]
    assert norms == pytest.approx(expected, rel=1e-6)
    assert positions == [0, 1, 2] and reader.names == ["0.weight", "0.bias", "2.weight", "2.bias"]
    global_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    assert math.hypot(*norms) == pytest.approx(global_norm.item(), rel=1e-6)


def test_sampled_norms_of_large_gradients_track_the_exact_ones():
    torch.manual_seed(0)
    big = nn.Parameter(torch.zeros(512, 1024))
    small = nn.Parameter(torch.zeros(10))
    reader = GradientReader([("big", big), ("small", small)], sample=16384)
    for scale in (1.0, 30.0):  # a blow-up shows in the estimate as it does in the exact norm
        big.grad, small.grad = torch.randn(512, 1024) * scale, torch.randn(10)
        views, factors = reader.views([big.grad, small.grad])
        estimate = [n * f for n, f in zip(to_host(fused_norms(views)), factors)]
        assert views[0].numel() <= 16384 and views[1] is small.grad
        assert estimate[0] == pytest.approx(big.grad.norm().item(), rel=0.05)
        assert estimate[1] == pytest.approx(small.grad.norm().item(), rel=1e-6)
    assert reader.sampled
    exact = GradientReader([("big", big)], sample=None)
    assert exact.views([big.grad]) == ([big.grad], None) and not exact.sampled


def test_one_transfer_carries_mixed_dtypes():
    values = to_host(
        [torch.tensor(1.5), torch.tensor(2.0, dtype=torch.bfloat16), torch.tensor(-3.0, dtype=torch.float64)]
    )
    assert values == [1.5, 2.0, -3.0]


def test_vector_history_gives_latest_previous_and_typical():
    history = VectorHistory(size=4)
    for step in range(6):
        history.record([float(step), 10.0])
    assert history.latest(0) == [5.0, 10.0] and history.latest(1) == [4.0, 10.0]
    assert history.latest(4) is None
    assert history.typical() == [3.5, 10.0]  # median of the last 4 rows: 2, 3, 4, 5


def test_input_magnitude_ignores_targets_and_carries_non_finite_values():
    batch = {"x": torch.tensor([[1.0, -7.0]]), "y": torch.tensor([[100.0]]), "index": torch.tensor([3])}
    inputs = floating(tensor_leaves(without_targets(batch, ["y"])))
    assert [t.tolist() for t in inputs] == [[[1.0, -7.0]]]  # neither the target nor the integer index
    assert floating(tensor_leaves(without_targets((batch["x"], batch["y"]), []))) == [batch["x"]]
    assert math.isnan(to_host(fused_norms([torch.tensor([1.0, math.nan])]))[0])


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


def test_a_flat_dict_batch_is_sized_as_the_general_walk_sizes_it():
    targets = ("y", "labels")
    floats, longs = torch.zeros(5, 3), torch.zeros(7, dtype=torch.long)
    batches = [
        {"x": floats, "y": longs},  # the first floating input
        {"labels": torch.zeros(6), "x": floats},  # a floating target first: the input decides
        {"input_ids": longs, "mask": longs},  # no floating input: the first tensor with a dim
        {"scale": torch.tensor(2.0), "y": longs},  # a scalar has no size
        {"empty": torch.zeros(0, 3), "y": longs},  # an empty input does not count as one
        {"scalar": torch.tensor(1.0)},
        {},
    ]
    # A value that is not a tensor, before the one that decides, is left to the general walk, which
    # keeps the leaves' order; after it, it cannot change the answer.
    mixed = [{"ids": [1, 2], "x": floats}, {"nested": {"x": floats}}, {"x": floats, "ids": [1, 2]}]
    for batch in batches + mixed:
        general = batch_size_of(input_tensors(batch, targets)) or batch_size_of(tensor_leaves(batch))
        assert first_dim_size(batch, targets) == general, batch
    assert [first_dim_size(b, targets) for b in batches + mixed] == [5, 5, 7, 7, 0, None, None, 5, 5, 5]


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
