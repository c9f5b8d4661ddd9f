"""On the CPU, gradient and input norms are read every 32nd step, on spikes, and for the step before
a spike from its kept gradients. These runs check that this finds what reading every step finds."""

import csv
import json
import math
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from lightning_spikewatch import SpikeWatch
from lightning_spikewatch.callback import CPU_BASELINE_EVERY
from tests.e2e.tiny import (
    BATCH,
    PreviousGradientsAtBackward,
    TinyNet,
    fit,
    found,
    loader,
    position,
    regression_data,
    seeded,
    watch,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))


def planted_data():
    """Causes planted on batches that fall between the CPU's gradient reads (and one on a read)."""
    data = regression_data(n=BATCH * 120)
    data.y[position(45)] += 30.0  # an outlier target
    rows = slice(position(77, 0), position(78, 0))
    data.x[rows] = data.x[rows] / 1e-4  # a batch normalised with a near-zero std
    data.y[position(96)] -= 30.0  # an outlier target on a step whose norms are read anyway (96 = 3 x 32)
    return data


def test_thinned_reads_find_the_spikes_and_causes_that_reading_every_step_finds(tmp_path):
    runs = {}
    for every in (None, 1):
        w = watch(tmp_path / str(every), baseline_every=every)
        fit(seeded(TinyNet), planted_data(), [w])
        runs[every] = w
    thinned, full = runs[None], runs[1]
    assert (
        thinned.summary()["settings"]["baseline_every"] == CPU_BASELINE_EVERY
        and full.summary()["settings"]["baseline_every"] == 1
    )
    planted = {(45, "outlier_sample"), (77, "input_scale"), (96, "outlier_sample")}
    assert planted <= {(batch, cause) for _, batch, cause in found(full)}
    assert found(thinned) == found(full)
    for a, b in zip(thinned.spikes, full.spikes):
        assert a.evidence.get("samples", [{}])[0].get("index") == b.evidence.get("samples", [{}])[0].get("index")


def test_seed_demo_finds_the_same_short_batch_spikes_either_way(tmp_path):
    import seed_adam_spikes as demo

    runs = {}
    for every in (None, 1):
        pl.seed_everything(0, verbose=False)
        w = watch(tmp_path / str(every), baseline_every=every)
        fit(demo.SeedMLP(), loader(demo.make_dataset(), shuffle=True), [w], max_epochs=15)
        runs[every] = found(w)
    assert len(runs[1]) >= 2 and {cause for _, _, cause in runs[1]} == {"short_batch"}
    assert runs[None] == runs[1]


def test_trace_has_gradient_norms_on_read_steps_and_spikes_only(tmp_path):
    data = regression_data()
    data.y[position(45)] += 30.0
    for trace_every in (1, 10):  # every batch; the default: every 10th, and each step that read the norm
        w = watch(tmp_path / str(trace_every), trace_every=trace_every)
        fit(seeded(TinyNet), data, [w])
        with (tmp_path / str(trace_every) / "steps.csv").open() as f:
            rows = list(csv.DictReader(f))
        assert [e.step for e in w.spikes] == [45]
        steps = range(len(data) // BATCH)
        read = {s for s in steps if s < w.warmup or s % CPU_BASELINE_EVERY == 0 or s == 45}
        assert [int(row["step"]) for row in rows] == [s for s in steps if (s + 1) % trace_every == 0 or s in read]
        for row in rows:
            assert math.isfinite(float(row["grad_norm"])) == (int(row["step"]) in read), row
            assert math.isfinite(float(row["loss"])) and int(row["batch_size"]) == BATCH


def test_gradients_zeroed_in_place_are_not_mistaken_for_the_step_before(tmp_path):
    class ZeroInPlace(TinyNet):
        def optimizer_zero_grad(self, epoch, batch_idx, optimizer):
            optimizer.zero_grad(set_to_none=False)  # the kept tensors then hold the next gradient

    w = watch(tmp_path)
    fit(seeded(ZeroInPlace, optimizer="sgd", lr=0.05, grad_blowup=(43, "net.3.weight", 3e3)), regression_data(), [w])
    event = w.spikes[0]
    assert event.step == 44
    # The step before cannot be read back, so nothing may be claimed or drawn for it.
    assert all(c.evidence.get("which") != "previous step" for c in event.causes)
    snapshot = json.loads((tmp_path / "layers.jsonl").read_text().splitlines()[0])
    assert snapshot["steps"][-1] == 44 and 43 not in snapshot["steps"]


def test_the_step_before_a_spike_is_read_from_its_kept_gradients(tmp_path):
    w = watch(tmp_path)
    fit(seeded(TinyNet, optimizer="sgd", lr=0.05, grad_blowup=(43, "net.3.weight", 3e3)), regression_data(), [w])
    snapshot = json.loads((tmp_path / "layers.jsonl").read_text().splitlines()[0])
    assert snapshot["steps"][-2:] == [43, 44]
    blown = snapshot["names"].index("net.3.weight")
    before = snapshot["norms"][-3]  # the last row read before the blow-up
    assert snapshot["norms"][-2][blown] > 100 * before[blown]


class RecordingReleases(SpikeWatch):
    """Records the steps settled by the detector's quiet bound, and those whose loss, read before
    backward, was under the bound planned for them (quiet steps and read steps alike)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.quiet: set[int] = set()
        self.released: set[int] = set()

    def _settle_quietly(self, loss, batch, batch_idx, step):
        self.quiet.add(step)
        super()._settle_quietly(loss, batch, batch_idx, step)

    def _see_loss(self, loss):
        bound = self._quiet_below
        super()._see_loss(loss)
        if loss.item() < bound:
            self.released.add(self._step_counter.completed)


def test_steps_that_cannot_spike_hold_no_gradients_through_backward_and_a_spike_still_reads_them(tmp_path):
    w = RecordingReleases(log_dir=tmp_path, print_spikes=False, print_summary=False)
    probe = PreviousGradientsAtBackward()
    data = regression_data(n=BATCH * 120)
    fit(seeded(TinyNet, optimizer="sgd", lr=0.05, grad_blowup=(43, "net.3.weight", 3e3)), data, [w, probe])
    # A step whose loss is under its bound needs no step before it: SpikeWatch holds none of its
    # gradients, so its backward reuses that memory, as without SpikeWatch, and no more than one set
    # of gradients is alive at a time. That holds for
    # the quiet steps and, with the bound planned to include them, for the read steps (every 32nd).
    assert w.quiet <= w.released and len(w.quiet) > 60
    assert {64, 96} <= w.released and not any(probe.alive[step] for step in w.released)
    # The spike at 44 keeps them until they are read, and blames the step before.
    assert 43 in w.quiet and 44 not in w.released and probe.alive[44]
    event = w.spikes[0]
    assert event.step == 44 and event.cause == "layer_gradient"
    assert event.evidence["layer"] == "net.3.weight" and event.evidence["which"] == "previous step"


def test_a_spike_at_the_first_step_of_an_epoch_blames_the_last_step_of_the_one_before(tmp_path):
    # The last step of epoch 0 (step 49) is settled quietly; its gradients, blown up in one layer,
    # are still on the parameters when epoch 1 begins, and its update makes step 50 spike.
    w = watch(tmp_path)
    model = seeded(TinyNet, optimizer="sgd", lr=0.05, grad_blowup=(49, "net.3.weight", 3e3))
    fit(model, regression_data(n=BATCH * 50), [w], max_epochs=2)
    event = w.spikes[0]
    assert event.step == 50 and event.epoch == 1 and event.cause == "layer_gradient"
    assert event.evidence["layer"] == "net.3.weight" and event.evidence["which"] == "previous step"


def test_a_spike_right_after_a_logging_step_blames_the_logging_step(tmp_path):
    # Step 39 is one where Lightning logs (every 10th), so SpikeWatch observes its settled steps at
    # batch end; its gradients, blown up in one layer, must still be kept for step 40's spike.
    from lightning.pytorch.loggers import CSVLogger

    w = watch(tmp_path / "w")
    model = seeded(TinyNet, optimizer="sgd", lr=0.05, grad_blowup=(39, "net.3.weight", 3e3))
    fit(model, regression_data(), [w], logger=CSVLogger(tmp_path / "logs"), log_every_n_steps=10)
    event = w.spikes[0]
    assert event.step == 40 and event.cause == "layer_gradient"
    assert event.evidence["layer"] == "net.3.weight" and event.evidence["which"] == "previous step"


class CountingSettled(SpikeWatch):
    """Counts the quiet steps settled by the detector's quiet bound and observed later."""

    settled_total = 0

    def _catch_up(self):
        self.settled_total += len(self._settled)
        super()._catch_up()


def test_quiet_steps_settled_by_the_bound_leave_spikes_and_trace_exactly_as_scoring_each_step(tmp_path):
    data = regression_data(n=BATCH * 400)  # a long run: the window fills, and the bound applies throughout
    data.y[position(251)] += 30.0
    data.y[position(333)] -= 30.0
    rows = slice(position(290, 0), position(291, 0))
    data.x[rows] = data.x[rows] / 1e-4
    runs, traces = {}, {}
    # baseline_every=1 takes the general path on every step: nothing settled early. The default trace
    # (every 10th batch) scores only the settled losses it writes.
    for every, trace_every in ((None, 1), (1, 1), (None, 10)):
        folder = tmp_path / f"{every}_{trace_every}"
        w = CountingSettled(
            log_dir=folder, print_spikes=False, print_summary=False, baseline_every=every, trace_every=trace_every
        )
        fit(seeded(TinyNet), data, [w])
        runs[every, trace_every] = w
        with (folder / "steps.csv").open() as f:
            traces[every, trace_every] = [
                (r["step"], r["loss"], r["loss_z"], r["lr"], r["spike"]) for r in csv.DictReader(f)
            ]
    settled, full, thinned = runs[None, 1], runs[1, 1], runs[None, 10]
    assert settled.settled_total > 200 and full.settled_total == 0 and thinned.settled_total > 200
    assert {(251, "outlier_sample"), (290, "input_scale"), (333, "outlier_sample")} <= {
        (batch, cause) for _, batch, cause in found(full)
    }
    assert found(settled) == found(full) == found(thinned)
    assert len(traces[None, 1]) == 400 and traces[None, 1] == traces[1, 1]  # loss z written later, yet the same
    written = {row[0] for row in traces[None, 10]}
    assert 40 <= len(written) < 80 and {"251", "290", "333"} <= written
    same_rows = [row for row in traces[1, 1] if row[0] in written]
    # The same rows; a quiet row's z may use a MAD up to 16 pushes old (as scoring each step does),
    # refreshed on another schedule when only the written rows are scored, so z agrees closely.
    assert [row[:2] + row[3:] for row in traces[None, 10]] == [row[:2] + row[3:] for row in same_rows]
    for thin, every_row in zip(traces[None, 10][1:], same_rows[1:]):
        assert float(thin[2]) == pytest.approx(float(every_row[2]), rel=0.2, abs=0.1), (thin, every_row)


def two_groups(module: torch.nn.Module) -> list[dict]:
    """Biases, then weights: parameter groups as code with and without weight decay sets them up."""
    named = list(module.named_parameters())
    return [
        {"params": [p for name, p in named if name.endswith("bias")], "weight_decay": 0.0},
        {"params": [p for name, p in named if name.endswith("weight")]},
    ]


@pytest.mark.parametrize("groups", [1, 2])
def test_steps_settled_late_are_traced_with_the_learning_rate_of_their_own_step(tmp_path, groups):
    class Decaying(TinyNet):
        def configure_optimizers(self):
            if groups == 1:
                optimizer = torch.optim.Adam(self.parameters(), lr=1e-3)
                rates = lambda step: 0.999**step  # noqa: E731 - a new rate each step
            else:
                optimizer = torch.optim.AdamW(two_groups(self), lr=1e-3)
                rates = [lambda step: 0.999**step, lambda step: 0.998**step]  # each group its own, each step
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, rates)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    w = CountingSettled(log_dir=tmp_path, print_spikes=False, print_summary=False)
    fit(seeded(Decaying), regression_data(n=BATCH * 300), [w])
    assert w.settled_total > 100
    with (tmp_path / "steps.csv").open() as f:
        rows = list(csv.DictReader(f))
    expected = [1e-3 * 0.999 ** int(r["step"]) for r in rows]  # one step off would be 0.1% off
    assert [float(r["lr"]) for r in rows] == pytest.approx(expected, rel=1e-6)  # the first group's rate
    assert [int(r["batch_size"]) for r in rows] == [BATCH] * len(rows)


def test_a_rate_jump_in_the_second_of_two_param_groups_is_named_learning_rate(tmp_path):
    class JumpInWeights(TinyNet):
        def configure_optimizers(self):
            optimizer = torch.optim.SGD(two_groups(self), lr=0.05)
            rates = [lambda step: 1.0, lambda step: 1000.0 if step >= 40 else 1.0]  # the weights' rate only
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, rates)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    w = CountingSettled(log_dir=tmp_path, print_spikes=False, print_summary=False)
    fit(seeded(JumpInWeights), regression_data(), [w])
    assert w.settled_total > 10  # the steps before the jump were settled by the quiet bound
    first = w.spikes[0]
    assert first.step == 41 and first.cause == "learning_rate"
    assert first.evidence["param_group"] == 1
    assert first.evidence["lr_before"] == pytest.approx(0.05) and first.evidence["lr_after"] == pytest.approx(50.0)
