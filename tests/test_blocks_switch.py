"""The on/off switching of ``benchmarks/blocks.py``: an off block runs none of the watcher's step
hooks and holds none of its references; an on block runs it exactly as it would run unswitched."""

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import overhead  # noqa: E402
from blocks import (  # noqa: E402
    STEP_HOOKS,
    DispatchSwitch,
    FloorSwitch,
    LookbackSwitch,
    Neighbour,
    PairedBlocks,
    PeriodSwitch,
    Switch,
    summarise,
)

from lightning_spikewatch import SpikeWatch  # noqa: E402
from lightning_spikewatch.callback import CPU_BASELINE_EVERY  # noqa: E402
from tests.e2e.tiny import TinyNet, fit, regression_data, seeded  # noqa: E402


class CountingWatch(SpikeWatch):
    """SpikeWatch that counts the steps its optimizer-step hook saw, and where it held a loss."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.seen: list[int] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.seen.append(trainer.global_step)
        super().on_before_optimizer_step(trainer, pl_module, optimizer)


def test_switch_off_skips_every_step_hook_and_drops_held_references_and_on_restores_them(tmp_path):
    watch = SpikeWatch(log_dir=tmp_path, print_spikes=False, print_summary=False)
    watch.on_after_backward = None  # as SpikeWatch itself skips unused hooks during fit
    watch._held_loss, watch._held_grads = torch.ones(()), [torch.zeros(3)]
    switch = Switch(watch)
    switch.off()
    assert all(getattr(watch, name) is None for name in STEP_HOOKS)
    assert watch._held_loss is None and watch._held_grads is None
    switch.off()  # a second off keeps what the first saved
    switch.on()
    assert watch.on_after_backward is None  # skipped by the watcher before: still skipped
    assert watch.on_before_optimizer_step.__func__ is SpikeWatch.on_before_optimizer_step
    assert "on_before_backward" not in vars(watch)  # the class's hook again, not a copy


class _Strategy:
    def training_step(self, *args):
        return None


def _wrapping_watch(tmp_path) -> tuple[_Strategy, SpikeWatch]:
    """A strategy stand-in whose ``training_step`` SpikeWatch has wrapped, as at train start."""
    strategy, watch = _Strategy(), SpikeWatch(log_dir=tmp_path, print_spikes=False, print_summary=False)
    watch._attach_to_strategy(strategy)
    return strategy, watch


def test_switch_off_gives_the_strategy_its_training_step_back_and_on_wraps_it_again(tmp_path):
    strategy, watch = _wrapping_watch(tmp_path)
    assert strategy.training_step == watch._training_step
    switch = Switch(watch)
    switch.off()
    assert "training_step" not in vars(strategy) and watch._wrapped_strategy is None
    switch.on()
    assert strategy.training_step == watch._training_step and watch._wrapped_strategy is strategy


def test_paired_blocks_run_the_watcher_in_exactly_one_block_of_each_pair(tmp_path):
    watch = CountingWatch(log_dir=tmp_path, print_spikes=False, print_summary=False)
    clock = PairedBlocks(Switch(watch), skip=8, device=torch.device("cpu"), block=4)
    trainer = fit(seeded(TinyNet), regression_data(), [clock, watch])  # 60 steps: 13 blocks after the skip
    assert isinstance(trainer, pl.Trainer)
    watched = set(watch.seen)
    assert set(range(8)) <= watched  # before the first block the watcher is on, as unswitched
    blocks = [range(start, start + 4) for start in range(8, 60 - 4 + 1, 4)]
    on = [all(step in watched for step in block) for block in blocks]
    off = [not any(step in watched for step in block) for block in blocks]
    assert all(a or b for a, b in zip(on, off))  # a block is wholly on or wholly off
    for first in range(0, len(blocks) - 1, 2):  # each pair: one on, one off
        assert on[first] != on[first + 1]
    assert len(clock.pairs) >= 5 and all(a > 0 and b > 0 for a, b in clock.pairs)


def test_lookback_switch_turns_only_the_lookback_off_and_drops_the_kept_gradients(tmp_path):
    watch = SpikeWatch(log_dir=tmp_path, print_spikes=False, print_summary=False)
    watch._looks_back, watch._held_grads = True, [torch.zeros(3)]
    switch = LookbackSwitch(watch)
    switch.off()
    assert watch._looks_back is False and watch._held_grads is None and watch._lookback is None
    assert "on_before_optimizer_step" not in vars(watch)  # the hooks still run
    switch.on()
    assert watch._looks_back is True


def _per_block(steps: list[int], skip: int, block: int, total: int) -> list[int]:
    return [sum(start <= s < start + block for s in steps) for start in range(skip, total - block + 1, block)]


def test_floor_switch_leaves_only_one_hook_call_at_backward_and_one_read_of_the_loss(tmp_path):
    watch = SpikeWatch(log_dir=tmp_path, print_spikes=False, print_summary=False)
    watch._held_loss = torch.ones(())
    switch = FloorSwitch(watch)
    switch.off()
    read = watch.on_before_backward
    assert callable(read) and getattr(read, "__func__", None) is not SpikeWatch.on_before_backward
    assert all(getattr(watch, name) is None for name in STEP_HOOKS if name != "on_before_backward")
    assert watch._held_loss is None
    read(None, None, torch.tensor(2.0))  # reads the loss, touches none of SpikeWatch's state
    assert watch.steps_watched == 0
    switch.on()
    assert "on_before_backward" not in vars(watch) and "on_before_optimizer_step" not in vars(watch)


class CountingLossReads(SpikeWatch):
    """SpikeWatch that counts the steps whose loss its wrapper of the strategy's training_step read."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.called: list[int] = []

    def _see_loss(self, loss):
        self.called.append(self._step_counter.completed)
        super()._see_loss(loss)


def test_switch_detaches_the_training_step_wrapper_in_off_blocks(tmp_path):
    watch = CountingLossReads(log_dir=tmp_path, print_spikes=False, print_summary=False)
    clock = PairedBlocks(Switch(watch), skip=40, device=torch.device("cpu"), block=16)
    trainer = overhead.quiet_trainer(200, "cpu", [clock, watch])
    workload = overhead.WORKLOADS["seed_mlp"]
    trainer.fit(workload.model(), workload.loader(200))  # 10 blocks of 16 after the skip
    counts = _per_block(watch.called, 40, 16, 200)
    for first in range(0, len(counts) - 1, 2):  # every step of the on block, none of the off block
        assert sorted([counts[first], counts[first + 1]]) == [0, 16]
    assert "training_step" not in vars(trainer.strategy)  # given back when fit ended


def _fit_seed_mlp(callbacks: list, steps: int) -> None:
    """The benchmark's own workload: its losses settle quietly, so every general step is a due read."""
    workload = overhead.WORKLOADS["seed_mlp"]
    overhead.quiet_trainer(steps, "cpu", callbacks).fit(workload.model(), workload.loader(steps))


class CountingReads(SpikeWatch):
    """SpikeWatch that records the step of each read of gradient and input norms."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.reads: list[int] = []

    def _read_step(self, trainer, records):
        self.reads.append(trainer.global_step)
        return super()._read_step(trainer, records)


def test_period_switch_reads_twice_as_often_in_on_blocks(tmp_path):
    every = CPU_BASELINE_EVERY
    block = 2 * every * PeriodSwitch.SLOW  # two reads off, four on
    watch = CountingReads(log_dir=tmp_path, print_spikes=False, print_summary=False)
    clock = PairedBlocks(PeriodSwitch(watch), skip=40, device=torch.device("cpu"), block=block)
    steps = 40 + 4 * block
    _fit_seed_mlp([clock, watch], steps)  # 4 blocks after the skip
    counts = _per_block(watch.reads, 40, block, steps)
    for first in range(0, len(counts) - 1, 2):  # on: every read period; off: half as often
        assert sorted([counts[first], counts[first + 1]]) == [2, 4]
    assert all(step % every == 0 for step in watch.reads if step >= 40)


def test_summary_shows_a_cost_that_grows_over_the_fit_in_its_thirds():
    pairs = [(1.0 + 0.01 * (i // 10), 1.0) for i in range(30)]  # on blocks 0%, then 1%, then 2% dearer
    summary = summarise(pairs)
    assert summary["ratio_median_by_third"] == [1.0, 1.01, 1.02]
    assert summary["ratio_median"] == 1.01 and summary["pairs"] == 30


def test_dispatch_switch_moves_the_loss_read_between_the_strategy_and_the_hook(tmp_path):
    strategy, watch = _wrapping_watch(tmp_path)
    watch.on_before_backward = None  # as after the first step
    switch = DispatchSwitch(watch)
    switch.off()
    assert "training_step" not in vars(strategy) and "on_before_backward" not in vars(watch)
    switch.on()
    assert strategy.training_step == watch._training_step and watch.on_before_backward is None


def test_a_neighbour_runs_before_the_blocks_of_every_other_pair_and_leaves_the_fit_alone(tmp_path):
    workload = overhead.WORKLOADS["seed_mlp"]
    neighbour = Neighbour(workload, steps=3)
    before = [p.detach().clone() for p in neighbour.model.parameters()]
    runs: list[int] = []
    run = neighbour.run
    neighbour.run = lambda: (runs.append(len(clock.pairs)), run())
    watch = SpikeWatch(log_dir=tmp_path, print_spikes=False, print_summary=False)
    clock = PairedBlocks(Switch(watch), skip=40, device=torch.device("cpu"), block=16, neighbour=neighbour)
    _fit_seed_mlp([clock, watch], 40 + 16 * 9)  # 9 blocks: 4 whole pairs timed
    assert clock.neighboured == [True, False, True, False]
    assert runs == [0, 0, 2, 2, 4]  # before both blocks of the 1st, 3rd and 5th pair (its 1st block timed)
    assert any(not torch.equal(a, b) for a, b in zip(before, neighbour.model.parameters()))  # it trained
    assert watch.steps_watched in (40 + 16 * 4, 40 + 16 * 5)  # the watcher saw its on blocks (the last may be off)
