"""Opt-in actions on real planted spikes: what each does to training, measured, and that a clean
run (or a cause left out of ``act_on``) is left exactly as it would be without SpikeWatch."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_spikewatch import SpikeWatch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
import spike_actions as scenarios  # noqa: E402

OUTLIER_ROW = scenarios.PLANT_STEP * scenarios.BATCH + 5


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """The example's whole comparison: every scenario with every action (a few seconds on a CPU)."""
    root = tmp_path_factory.mktemp("actions")
    return {
        (scenario, str(action)): scenarios.run(scenario, action, root)
        for scenario in scenarios.SCENARIOS
        for action in scenarios.ACTIONS
    }


@pytest.mark.parametrize("action", ["skip", "clip", "stop"])
def test_clean_run_takes_no_action_and_trains_exactly_as_without_one(outcomes, action):
    watched, plain = outcomes[("clean", action)], outcomes[("clean", "None")]
    assert watched.spikes == 0 and watched.actions_taken == 0 and watched.resumes == 0
    assert (watched.final, watched.peak) == (plain.final, plain.peak)


@pytest.mark.parametrize("scenario", ["input_scale", "non_finite"])
def test_every_action_saves_a_run_that_a_bad_batch_ruins(outcomes, scenario):
    assert math.isnan(outcomes[(scenario, "None")].final)  # without an action the weights end up NaN or inf
    for action in ("skip", "clip", "stop"):
        outcome = outcomes[(scenario, action)]
        assert outcome.actions_taken >= 1 and math.isfinite(outcome.final), action
        assert outcome.peak < 1.0 and outcome.above <= 2, action
        assert outcome.causes == [scenario], action


def test_a_blown_up_gradient_is_contained_before_it_reaches_the_loss(outcomes):
    plain = outcomes[("layer_gradient", "None")]
    assert plain.peak > 10 and plain.above > 0 and plain.spikes >= 1
    for action in ("skip", "clip", "stop"):
        outcome = outcomes[("layer_gradient", action)]
        assert outcome.peak < 0.5 and outcome.above == 0, action
        assert outcome.spikes == 1 and outcome.causes == ["layer_gradient"], action  # the gradient itself


def test_outlier_sample_recovers_at_least_as_fast_with_each_action(outcomes):
    plain = outcomes[("outlier_sample", "None")]
    assert plain.above > 0
    for action in ("skip", "clip", "stop"):
        outcome = outcomes[("outlier_sample", action)]
        assert outcome.above <= plain.above and outcome.causes == ["outlier_sample"], action
    assert outcomes[("outlier_sample", "skip")].above == 0


class Snapshots(pl.Callback):
    """Parameters and optimizer state after every step: what an action did to them."""

    def __init__(self):
        self.params: dict[int, list[torch.Tensor]] = {}
        self.optimizer_steps: dict[int, float] = {}
        self.applied_norm: dict[int, float] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        norms = [p.grad.norm() for p in pl_module.parameters() if p.grad is not None]  # none once skipped
        self.applied_norm[trainer.global_step] = float(torch.stack(norms).norm()) if norms else 0.0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step - 1
        self.params[step] = [p.detach().clone() for p in pl_module.parameters()]
        state = trainer.optimizers[0].state.get(next(pl_module.parameters()), {})
        self.optimizer_steps[step] = float(state["step"]) if "step" in state else math.nan


class AdamRegressor(scenarios.Regressor):
    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def fit(model, scenario, callbacks, root, ckpt_path=None, epochs=1):
    trainer = scenarios.trainer_for(callbacks, root)
    trainer.fit_loop.max_epochs = epochs
    trainer.fit(model, DataLoader(scenarios.planted_data(scenario), batch_size=scenarios.BATCH), ckpt_path=ckpt_path)
    return trainer


def test_skip_leaves_weights_and_adam_state_exactly_as_they_were(tmp_path):
    pl.seed_everything(0, verbose=False)
    snapshots = Snapshots()
    watch = SpikeWatch(log_dir=tmp_path, action="skip", print_spikes=False, print_summary=False)
    fit(AdamRegressor(), "outlier_sample", [watch, snapshots], tmp_path)
    event = watch.spikes[0]
    assert (event.step, event.cause, event.action["action"]) == (40, "outlier_sample", "skip")
    before, after = snapshots.params[39], snapshots.params[40]
    assert all(torch.equal(a, b) for a, b in zip(before, after))  # the update was dropped, to the bit
    assert snapshots.optimizer_steps[40] == snapshots.optimizer_steps[39]  # Adam did not count the step
    assert not all(torch.equal(a, b) for a, b in zip(after, snapshots.params[41]))  # training goes on


def test_clip_scales_the_applied_gradient_to_the_bound(tmp_path):
    pl.seed_everything(0, verbose=False)
    before, after = Snapshots(), Snapshots()
    watch = SpikeWatch(log_dir=tmp_path, action="clip", print_spikes=False, print_summary=False)
    fit(scenarios.Regressor(blowup_at=40), "clean", [before, watch, after], tmp_path)
    event = watch.spikes[0]
    assert event.step == 40 and event.cause == "layer_gradient" and "grad_norm" in event.signals
    factor = event.action["factor"]
    assert event.action["action"] == "clip" and factor < 1e-2
    assert after.applied_norm[40] == pytest.approx(before.applied_norm[40] * factor, rel=1e-4)
    assert after.applied_norm[39] == before.applied_norm[39]  # other steps untouched


def test_act_on_leaves_other_causes_alone(tmp_path):
    runs = {}
    for act_on in (["non_finite"], None):
        pl.seed_everything(0, verbose=False)
        snapshots = Snapshots()
        kwargs = {"action": "skip", "act_on": act_on} if act_on else {}
        watch = SpikeWatch(log_dir=tmp_path / str(act_on), print_spikes=False, print_summary=False, **kwargs)
        fit(scenarios.Regressor(), "outlier_sample", [watch, snapshots], tmp_path)
        runs[str(act_on)] = (watch, snapshots)
    limited, plain = runs["['non_finite']"], runs["None"]
    assert [e.cause for e in limited[0].spikes] == ["outlier_sample"] and limited[0].spikes[0].action is None
    assert not limited[0].actions_taken
    assert all(torch.equal(a, b) for a, b in zip(limited[1].params[59], plain[1].params[59]))


def test_stop_saves_a_checkpoint_and_a_skip_list_and_the_resumed_fit_skips_the_batch(tmp_path):
    pl.seed_everything(0, verbose=False)
    watch = SpikeWatch(log_dir=tmp_path, action="stop", print_spikes=False, print_summary=False)
    trainer = fit(scenarios.Regressor(), "outlier_sample", [watch], tmp_path, epochs=2)
    assert trainer.global_step == 41 and trainer.state.finished  # ended cleanly right after the spike
    assert watch.stopped["step"] == 40 and watch.stopped["cause"] == "outlier_sample"
    checkpoint = Path(watch.stopped["checkpoint"])
    assert checkpoint.exists()
    listed = [json.loads(line) for line in (tmp_path / "skip_batches.jsonl").read_text().splitlines()]
    assert len(listed) == 1 and listed[0]["step"] == 40 and OUTLIER_ROW in listed[0]["indices"]
    assert json.loads((tmp_path / "summary.json").read_text())["stopped"]["step"] == 40

    # Resume with a plain SpikeWatch: Lightning restarts the non-resumable loader, so the outlier's
    # batch comes back in epoch 1 under a new batch_idx; it is recognised by content and skipped.
    pl.seed_everything(0, verbose=False)
    snapshots = Snapshots()
    resumed = SpikeWatch(log_dir=tmp_path, print_spikes=False, print_summary=False)
    trainer = fit(scenarios.Regressor(), "outlier_sample", [resumed, snapshots], tmp_path, checkpoint, epochs=2)
    assert trainer.global_step == 2 * scenarios.BATCHES
    assert resumed.actions_taken == {"stop": 1, "skip_listed": 1}  # counts carry over from the checkpoint
    skipped = [
        s
        for s in range(42, 120)
        if all(torch.equal(a, b) for a, b in zip(snapshots.params[s - 1], snapshots.params[s]))
    ]
    assert skipped == [100]  # epoch 1, batch 40: the outlier's batch, and only it
    assert [e.step for e in resumed.spikes] == [40, 100]  # the skipped batch's spike is still reported
    assert resumed.spikes[1].action["action"] == "skip" and "step 40" in resumed.spikes[1].action["reason"]


def test_skip_under_fp16_grad_scaler_drops_the_update(tmp_path):
    from lightning.pytorch.plugins import MixedPrecision

    pl.seed_everything(0, verbose=False)
    snapshots = Snapshots()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    watch = SpikeWatch(log_dir=tmp_path, action="skip", print_spikes=False, print_summary=False)
    trainer = scenarios.trainer_for([watch, snapshots], tmp_path)
    trainer.fit_loop.max_epochs = 1
    trainer.strategy._precision_plugin = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    trainer.fit(AdamRegressor(), DataLoader(scenarios.planted_data("outlier_sample"), batch_size=scenarios.BATCH))
    assert watch.spikes[0].step == 40 and watch.spikes[0].action["action"] == "skip"
    assert all(torch.equal(a, b) for a, b in zip(snapshots.params[39], snapshots.params[40]))


def test_skip_under_gradient_accumulation_drops_the_whole_accumulated_step(tmp_path):
    pl.seed_everything(0, verbose=False)
    snapshots = Snapshots()
    watch = SpikeWatch(log_dir=tmp_path, action="skip", print_spikes=False, print_summary=False)
    trainer = scenarios.trainer_for([watch, snapshots], tmp_path)
    trainer.fit_loop.max_epochs = 1
    trainer.accumulate_grad_batches = 2
    trainer.fit(scenarios.Regressor(), DataLoader(scenarios.planted_data("outlier_sample"), batch_size=32))
    event = watch.spikes[0]
    assert (event.batch_idx, event.step, event.action["action"]) == (40, 20, "skip")
    # Snapshots record on every batch; the stepping batch of optimizer step 20 is batch 41.
    assert all(torch.equal(a, b) for a, b in zip(snapshots.params[19], snapshots.params[20]))


class Sign(torch.optim.Optimizer):
    """An optimizer from outside torch.optim that assumes every parameter has a gradient."""

    def __init__(self, params, lr=1e-3):
        super().__init__(params, {"lr": lr})

    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                p.data.add_(p.grad.sign(), alpha=-group["lr"])  # no None check, as in many custom optimizers
        return loss


Sign.__module__ = "custom_optimizers"


class SignRegressor(scenarios.Regressor):
    def configure_optimizers(self):
        return Sign(self.parameters())


def test_skip_with_an_optimizer_that_needs_gradients_zeroes_them_instead(tmp_path):
    pl.seed_everything(0, verbose=False)
    snapshots = Snapshots()
    watch = SpikeWatch(log_dir=tmp_path, action="skip", print_spikes=False, print_summary=False)
    trainer = fit(SignRegressor(), "outlier_sample", [watch, snapshots], tmp_path)
    assert trainer.state.finished and watch.spikes[0].action["action"] == "skip"
    assert all(torch.equal(a, b) for a, b in zip(snapshots.params[39], snapshots.params[40]))  # sign(0) = 0
    assert "action" not in watch.summary()["disabled"]


class ManualRegressor(scenarios.Regressor):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        loss = super().training_step(batch, batch_idx)
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        return loss


def test_manual_optimization_warns_that_actions_are_off_and_still_watches(tmp_path):
    pl.seed_everything(0, verbose=False)
    watch = SpikeWatch(log_dir=tmp_path, action="skip", print_spikes=False, print_summary=False)
    with pytest.warns(UserWarning, match="needs automatic optimization"):
        fit(ManualRegressor(), "outlier_sample", [watch], tmp_path)
    # Found (manual optimization has no replay, so the sample is not named) and left alone.
    assert watch.spikes[0].batch_idx == 40 and watch.spikes[0].action is None and not watch.actions_taken
