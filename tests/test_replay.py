"""Finding dominant samples by bisection, and replays that leave no trace."""

import random

import numpy as np
import pytest
import torch
import torchmetrics
from torch import nn

from lightning_spikewatch.replay import find_dominant_samples, preserved_training_state


def evaluator(losses, unsplittable_below=1):
    calls = []

    def loss_sum_of(positions):
        calls.append(tuple(positions))
        if len(positions) < unsplittable_below:
            return None
        return float(sum(losses[p] for p in positions))

    return loss_sum_of, calls


def test_bisection_isolates_the_outlier_in_log_steps():
    losses = [1.0] * 64
    losses[41] = 500.0
    loss_sum_of, calls = evaluator(losses)
    found = find_dominant_samples(loss_sum_of, 64, sum(losses))
    assert found.groups[0].positions == (41,)
    assert found.groups[0].loss_sum == 500.0
    assert found.replays == len(calls) <= 2 * 6  # log2(64) levels, two halves each


def test_several_outliers_are_found_largest_first():
    losses = [1.0] * 32
    losses[3], losses[20] = 100.0, 300.0
    loss_sum_of, _ = evaluator(losses)
    found = find_dominant_samples(loss_sum_of, 32, sum(losses), top_k=3)
    assert [g.positions for g in found.groups[:2]] == [(20,), (3,)]


def test_a_sample_that_cannot_be_replayed_alone_is_paired_with_a_quiet_one():
    losses = [1.0] * 16
    losses[9] = 50.0
    loss_sum_of, calls = evaluator(losses, unsplittable_below=2)  # e.g. BatchNorm refuses one sample
    found = find_dominant_samples(loss_sum_of, 16, sum(losses))
    assert found.groups[0].positions == (9,)
    assert found.groups[0].loss_sum == pytest.approx(50.0)
    assert any(len(c) == 2 and 9 in c and 8 not in c for c in calls)


def test_a_batch_that_cannot_be_split_is_reported_not_crashed_on():
    losses = [1.0] * 16
    losses[9] = 50.0
    loss_sum_of, _ = evaluator(losses, unsplittable_below=20)  # no sub-batch at all can be evaluated
    found = find_dominant_samples(loss_sum_of, 16, sum(losses))
    assert found.groups[0].positions == tuple(range(16))
    assert "could not be split below 16" in found.note


def test_the_replay_budget_is_respected():
    losses = list(np.linspace(1, 2, 64))
    loss_sum_of, calls = evaluator(losses)
    found = find_dominant_samples(loss_sum_of, 64, sum(losses), max_replays=4)
    assert len(calls) <= 4 and found.replays <= 4


class Noisy(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 1))
        self.metric = torchmetrics.MeanMetric()
        self.logged = []

    def log(self, name, value):
        self.logged.append((name, float(value.detach())))

    def forward(self, x):
        out = self.net(x).mean()
        self.metric.update(out)
        self.log("loss", out)
        random.random()
        np.random.rand()
        return out


def test_replay_restores_rng_buffers_modes_metrics_and_mutes_logging():
    torch.manual_seed(0)
    model = Noisy().train()
    model.net[1].eval()  # a user-chosen mode that must survive
    x = torch.randn(16, 4)
    model(x)
    before = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state()[1].copy(),
        "buffers": {k: v.clone() for k, v in model.named_buffers()},
        "metric": model.metric.compute().clone(),
        "logged": list(model.logged),
    }
    with preserved_training_state(model):
        for _ in range(3):
            model(x[:8])
        assert not torch.is_grad_enabled()
    assert torch.equal(torch.get_rng_state(), before["torch"])
    assert random.getstate() == before["python"]
    assert np.array_equal(np.random.get_state()[1], before["numpy"])
    for name, value in model.named_buffers():
        assert torch.equal(value, before["buffers"][name]), name
    assert model.training and not model.net[1].training
    assert torch.equal(model.metric.compute(), before["metric"])
    assert model.metric._update_count == 1
    assert model.logged == before["logged"]
    assert "log" not in vars(model)


def test_state_is_restored_even_when_the_replay_raises():
    model = Noisy().train()
    rng = torch.get_rng_state()
    with pytest.raises(RuntimeError):
        with preserved_training_state(model):
            model(torch.randn(8, 4))
            raise RuntimeError("boom")
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.is_grad_enabled()
