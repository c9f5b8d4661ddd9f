"""Each cause planted for real in a tiny training run: found at its batch and named correctly."""

import sys
from pathlib import Path

import pytest

from lightning_spikewatch import SpikeWatch
from tests.e2e.tiny import (
    BATCH,
    CollapseAdamSecondMoment,
    TinyNet,
    classification_data,
    fit,
    loader,
    position,
    regression_data,
    seeded,
    watch,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))


def only_spike(w: SpikeWatch):
    assert len(w.spikes) == 1, [(e.step, e.cause) for e in w.spikes]
    return w.spikes[0]


@pytest.mark.parametrize("per_sample", [False, True], ids=["replay", "per_sample_loss"])
def test_corrupted_target_is_attributed_to_outlier_sample_with_its_dataset_index(tmp_path, per_sample):
    data = regression_data()
    data.y[position(40)] += 30.0
    w = watch(tmp_path)
    fit(seeded(TinyNet, per_sample=per_sample), data, [w])
    event = only_spike(w)
    assert (event.step, event.batch_idx) == (40, 40)
    assert event.cause == "outlier_sample"
    assert event.evidence["samples"][0]["index"] == position(40)
    assert event.evidence["source"] == ("per_sample_loss" if per_sample else "replay")
    assert "input_scale" not in [c.cause.value for c in event.causes]  # a bad target is not a bad input


def test_confident_wrong_label_with_log_of_probabilities_is_log_zero(tmp_path):
    data = classification_data(separation=4.0)
    data.y[position(50)] = 1 - data.y[position(50)]
    w = watch(tmp_path)
    fit(seeded(TinyNet, task="classification", loss="log_prob", lr=1e-2), data, [w])
    event = only_spike(w)
    assert event.batch_idx == 50 and event.cause == "log_zero"
    assert event.evidence["samples"][0]["index"] == position(50)
    assert event.evidence["samples"][0]["loss"] >= 13.8


# Inputs are read for their baseline at step 64 (every 32nd on the CPU), not at 43; at 203 the
# 128-batch loss window is full, so each loss settled by the quiet bound also pushes an old one out.
@pytest.mark.parametrize("batch", [64, 43, 203])
def test_batch_normalised_with_near_zero_std_is_input_scale(tmp_path, batch):
    data = regression_data(n=BATCH * (60 if batch < 60 else 240))
    rows = slice(position(batch, 0), position(batch + 1, 0))
    data.x[rows] = data.x[rows] / 1e-4  # (x - mean) / std with std ~ 1e-4
    w = watch(tmp_path)
    fit(seeded(TinyNet), data, [w])
    event = w.spikes[0]
    assert event.batch_idx == batch and event.cause == "input_scale"
    assert event.evidence["ratio"] > 1000
    assert all(e.batch_idx > batch for e in w.spikes[1:])  # only aftershocks of the damaged weights follow


def test_nan_input_is_non_finite_and_training_completes(tmp_path):
    data = regression_data()
    data.x[position(40), 3] = float("nan")
    w = watch(tmp_path)
    trainer = fit(seeded(TinyNet), data, [w], max_epochs=2)
    assert trainer.state.finished and trainer.global_step == 2 * len(data) // BATCH
    event = only_spike(w)  # the NaN weights that follow are counted, not reported again
    assert event.batch_idx == 40 and event.cause == "non_finite"
    assert "loss" in event.evidence["non_finite"]
    assert w.non_finite_repeats > 0


def test_collapsed_adam_second_moment_is_named_with_its_layer(tmp_path):
    w = watch(tmp_path)
    plant = CollapseAdamSecondMoment(150, "net.3.weight")
    fit(seeded(TinyNet, lr=3e-2), regression_data(), [plant, w], max_epochs=3)
    first = w.spikes[0]
    assert first.step == 151  # the oversized update at step 150 shows in the loss of step 151
    assert first.cause == "adam_second_moment" and first.evidence["layer"] == "net.3.weight"
    assert first.evidence["update_ratio"] > 5 * first.evidence["typical_update_ratio"]


# On the CPU gradients are read every 32nd step (64 is one, 43 is not; the step before a spike is then
# read from its gradients, kept by reference; at 203 the loss window is full); baseline_every=1 reads
# every step, as on accelerators.
@pytest.mark.parametrize("baseline_every", [None, 1], ids=["cpu_default", "every_step"])
@pytest.mark.parametrize("step", [64, 43, 203])
def test_one_layer_gradient_blowup_is_layer_gradient(tmp_path, step, baseline_every):
    w = watch(tmp_path, baseline_every=baseline_every)
    data = regression_data(n=BATCH * (60 if step < 60 else 240))
    fit(seeded(TinyNet, optimizer="sgd", lr=0.05, grad_blowup=(step, "net.3.weight", 3e3)), data, [w])
    event = w.spikes[0]  # the damaged layer may cause aftershocks in the next steps
    assert event.step == step + 1 and event.cause == "layer_gradient"
    assert event.evidence["layer"] == "net.3.weight" and event.evidence["which"] == "previous step"


def test_learning_rate_jump_is_learning_rate(tmp_path):
    w = watch(tmp_path)
    fit(seeded(TinyNet, optimizer="sgd", lr=0.05, lr_jump=(40, 100.0)), regression_data(), [w])
    first = w.spikes[0]
    assert first.step == 41 and first.cause == "learning_rate"
    assert first.evidence["lr_before"] == pytest.approx(0.05) and first.evidence["lr_after"] == pytest.approx(5.0)


def test_single_sample_last_batch_is_short_batch_and_drop_last_removes_it(tmp_path):
    import lightning.pytorch as pl
    import seed_adam_spikes as demo

    pl.seed_everything(0, verbose=False)
    data = demo.make_dataset()
    w = watch(tmp_path / "a")
    fit(demo.SeedMLP(), loader(data, shuffle=True), [w], max_epochs=15)
    assert len(w.spikes) >= 2
    for event in w.spikes:
        assert event.batch_idx == len(data) // BATCH  # the batch of one sample that ends each epoch
        assert event.cause == "short_batch"
        assert event.evidence["batch_size"] == 1 and event.evidence["dataset_remainder"] == 1

    pl.seed_everything(0, verbose=False)
    fixed = watch(tmp_path / "b")
    fit(demo.SeedMLP(), loader(data, shuffle=True, drop_last=True), [fixed], max_epochs=15)
    assert fixed.spikes == []
