"""Clean runs stay quiet, and watching (replays included) leaves the run bit-for-bit unchanged."""

import random

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from tests.e2e.tiny import TinyNet, classification_data, fit, position, regression_data, seeded, watch


@pytest.mark.parametrize("action", [None, "skip"])
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("task", ["regression", "classification"])
def test_clean_run_raises_no_false_alarm(tmp_path, seed, task, action):
    """With an action the gradient norm is watched too: it must not raise false alarms either."""
    data = regression_data(seed=seed) if task == "regression" else classification_data(seed=seed)
    w = watch(tmp_path, action=action)
    fit(seeded(TinyNet, task=task, seed=seed), data, [w], max_epochs=4)
    assert w.steps_watched == 4 * 60
    assert w.spikes == [] and not w.actions_taken


@pytest.mark.parametrize("action", [None, "clip"])
def test_clean_sgd_run_with_dropout_and_batchnorm_is_quiet(tmp_path, action):
    w = watch(tmp_path, action=action)
    fit(seeded(TinyNet, optimizer="sgd", lr=0.05, dropout=0.2, batchnorm=True), regression_data(), [w], max_epochs=4)
    assert w.spikes == [] and not w.actions_taken


def final_state(model, trainer):
    optimizer = trainer.optimizers[0]
    return {
        "params": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "optimizer": {
            i: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
            for i, s in optimizer.state_dict()["state"].items()
        },
        "torch_rng": torch.get_rng_state(),
        "numpy_rng": np.random.get_state()[1].copy(),
        "python_rng": random.getstate(),
        "logged": {k: float(v) for k, v in trainer.logged_metrics.items()},
        "metric": float(model.metric.compute()),
        "metric_updates": model.metric._update_count,
    }


def run_with_outliers(callbacks):
    data = regression_data()
    for batch_idx in (30, 45):  # two replayed spikes
        data.y[position(batch_idx)] += 30.0
    model = seeded(TinyNet, dropout=0.3, batchnorm=True, metric=True)
    trainer = fit(model, data, callbacks)
    return final_state(model, trainer)


def test_replay_leaves_model_optimizer_rng_metrics_and_logs_bit_for_bit_unchanged(tmp_path):
    w = watch(tmp_path)
    watched = run_with_outliers([w])
    baseline = run_with_outliers([])
    replayed = [e for e in w.spikes if e.evidence.get("source") == "replay"]
    assert [e.batch_idx for e in replayed] == [30, 45]  # the replays really ran
    assert replayed[0].evidence["samples"][0]["index"] == position(30)
    for name, value in baseline["params"].items():
        assert torch.equal(watched["params"][name], value), name  # BatchNorm running stats included
    for index, state in baseline["optimizer"].items():
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(watched["optimizer"][index][key]), torch.as_tensor(value)), key
    assert torch.equal(watched["torch_rng"], baseline["torch_rng"])
    assert np.array_equal(watched["numpy_rng"], baseline["numpy_rng"])
    assert watched["python_rng"] == baseline["python_rng"]
    assert watched["logged"] == baseline["logged"]
    assert watched["metric"] == baseline["metric"] and watched["metric_updates"] == baseline["metric_updates"]


def test_gradients_seen_by_the_optimizer_are_untouched(tmp_path):
    seen = []

    class RecordGrads(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):  # after SpikeWatch's replay and the step
            seen.append(torch.cat([p.grad.flatten() for p in pl_module.parameters()]).clone())

    data = regression_data()
    data.y[position(30)] += 30.0
    fit(seeded(TinyNet), data, [watch(tmp_path), RecordGrads()])
    with_watch = list(seen)
    seen.clear()
    fit(seeded(TinyNet), data, [RecordGrads()])
    assert all(torch.equal(a, b) for a, b in zip(with_watch, seen)) and len(seen) == len(with_watch)
