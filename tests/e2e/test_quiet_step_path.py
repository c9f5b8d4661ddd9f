"""The CPU's quiet step: SpikeWatch reads the loss as the strategy's ``training_step`` returns it (not
through a Lightning hook), and plans its quiet bound every few steps there. These runs check that this
finds what scoring each step finds, gives the strategy back as it was, and never breaks the fit."""

import csv
import functools

import lightning.pytorch as pl
import pytest
import torch

from lightning_spikewatch import SpikeWatch
from lightning_spikewatch import callback as callback_module
from lightning_spikewatch.callback import CPU_BASELINE_EVERY, QUIET_HORIZON
from tests.e2e.tiny import BATCH, IndexedData, TinyNet, fit, found, position, regression_data, seeded, watch


class Checks(pl.Callback):
    """Records, at each optimizer step, whether SpikeWatch's hooks are skipped and who reads the loss."""

    def __init__(self, w: SpikeWatch):
        self.w = w
        self.hook_skipped: list[bool] = []
        self.wrapped: list[bool] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.hook_skipped.append(vars(self.w).get("on_before_backward", "class") is None)
        self.wrapped.append(vars(trainer.strategy).get("training_step") == self.w._training_step)


def test_the_loss_is_read_from_the_strategys_training_step_and_the_strategy_is_given_back_after_fit(tmp_path):
    data = regression_data(n=BATCH * 120)
    data.y[position(45)] += 30.0
    w = watch(tmp_path)
    checks = Checks(w)
    trainer = fit(seeded(TinyNet), data, [w, checks])
    assert all(checks.wrapped) and all(checks.hook_skipped)  # from the first step on: Lightning skips the hook
    assert found(w) == [(45, 45, "outlier_sample")] and w.steps_watched == 120
    assert "training_step" not in vars(trainer.strategy)  # the class's method again
    assert "on_before_backward" not in vars(w)


class BypassesWrappers(pl.Callback):
    """Sets the strategy's own ``training_step`` on it after SpikeWatch wrapped it, as code that
    patches the strategy without passing calls on might: SpikeWatch's wrapper is then never called."""

    def on_train_start(self, trainer, pl_module):
        strategy = trainer.strategy
        self.own = functools.partial(type(strategy).training_step, strategy)
        strategy.training_step = self.own


def test_a_training_step_that_bypasses_the_wrapper_leaves_the_loss_to_the_hook_with_the_same_spikes(tmp_path):
    data = regression_data(n=BATCH * 120)
    data.y[position(45)] += 30.0
    plain = watch(tmp_path / "plain")
    fit(seeded(TinyNet), data, [plain])
    w = watch(tmp_path / "bypassed")
    checks, bypass = Checks(w), BypassesWrappers()
    trainer = fit(seeded(TinyNet), data, [w, bypass, checks])
    assert not any(checks.wrapped) and not any(checks.hook_skipped)  # the hook reads every loss
    assert found(w) == found(plain) == [(45, 45, "outlier_sample")] and w.steps_watched == 120
    assert vars(trainer.strategy)["training_step"] is bypass.own  # what others set is left to them


def test_two_instances_both_read_every_loss_and_the_strategy_is_given_back(tmp_path):
    data = regression_data(n=BATCH * 120)
    data.y[position(45)] += 30.0
    first, second = watch(tmp_path / "a"), watch(tmp_path / "b")
    trainer = fit(seeded(TinyNet), data, [first, second])
    assert found(first) == found(second) == [(45, 45, "outlier_sample")]
    assert first.steps_watched == second.steps_watched == 120
    assert "training_step" not in vars(trainer.strategy)  # both wrappers unwound


def test_a_wrapper_set_after_spikewatchs_keeps_working_after_fit_and_spikewatch_only_passes_calls_on(tmp_path):
    calls = []

    class WrapsLater(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            inner = trainer.strategy.training_step

            def counting(*args):
                calls.append(args)
                return inner(*args)

            trainer.strategy.training_step = counting

    w = watch(tmp_path)
    trainer = fit(seeded(TinyNet), regression_data(), [w, WrapsLater()])  # SpikeWatch wraps first
    assert len(calls) == 60 and w.steps_watched == 60
    still = trainer.strategy.training_step  # the other wrapper stays, with SpikeWatch's inside it
    watched, open_step = w.steps_watched, w._open_step
    trainer.lightning_module.training_step = lambda *args: torch.tensor(1.0)  # no fit loop to log into now
    assert still(*calls[-1]).item() == 1.0  # as Lightning would call it later: SpikeWatch only passes it on
    assert len(calls) == 61 and w.steps_watched == watched and w._open_step == open_step


def test_a_failure_while_reading_the_loss_stops_watching_but_not_the_fit(tmp_path, monkeypatch):
    def broken(self, *args):
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(SpikeWatch, "_settle_quietly", broken)
    w = watch(tmp_path)
    with pytest.warns(RuntimeWarning, match="'watch' part failed"):
        trainer = fit(seeded(TinyNet), regression_data(), [w])
    assert trainer.global_step == 60 and "watch" in w._disabled
    assert "training_step" not in vars(trainer.strategy)  # given back at the failure


class CountingPaths(SpikeWatch):
    """Counts the steps that took the general path (the optimizer step hook) off the read schedule."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.general_off_schedule = 0

    def _lean_general_step(self, trainer, pl_module, optimizer, loss, host_loss):
        if self.steps_watched % CPU_BASELINE_EVERY and self.steps_watched >= self.warmup:
            self.general_off_schedule += 1
        super()._lean_general_step(trainer, pl_module, optimizer, loss, host_loss)


def broad_loss_data(batches: int) -> IndexedData:
    """Batches whose noise level varies by tens of percent: a broad loss curve with no spike in it."""
    data = regression_data(n=BATCH * batches)
    g = torch.Generator().manual_seed(1)
    scale = torch.exp(0.25 * torch.randn(batches, generator=g)).repeat_interleave(BATCH)[:, None]
    data.y = data.y + 0.3 * scale * torch.randn(data.y.shape, generator=g)
    return data


def test_a_broad_loss_curve_keeps_its_quiet_steps_off_the_general_path_with_the_spikes_of_scoring_each_step(
    tmp_path, monkeypatch
):
    data = broad_loss_data(400)
    data.y[position(251)] += 30.0
    runs, traces = {}, {}
    plans = (
        ("settled", None, QUIET_HORIZON),
        ("each step", 1, QUIET_HORIZON),
        ("to the read", None, CPU_BASELINE_EVERY),
    )
    for name, every, horizon in plans:
        monkeypatch.setattr(callback_module, "QUIET_HORIZON", horizon)
        w = CountingPaths(log_dir=tmp_path / name, print_spikes=False, print_summary=False, baseline_every=every)
        fit(seeded(TinyNet), data, [w])
        runs[name] = w
        with (tmp_path / name / "steps.csv").open() as f:
            traces[name] = [(r["step"], r["loss"], r["loss_z"], r["spike"]) for r in csv.DictReader(f)]
    settled, each, to_read = runs["settled"], runs["each step"], runs["to the read"]
    assert (251, 251, "outlier_sample") in found(each)
    assert found(settled) == found(each) == found(to_read)
    assert traces["settled"] == traces["each step"] == traces["to the read"]  # z of every row too
    # Planned to the next read, the bound must allow 31 pushes and falls under much of this curve;
    # planned every QUIET_HORIZON steps, almost every step between reads is settled.
    assert settled.general_off_schedule <= 15 and 3 * settled.general_off_schedule < to_read.general_off_schedule
