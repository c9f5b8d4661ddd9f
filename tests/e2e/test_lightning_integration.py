"""SpikeWatch in the ways people run Lightning: both namespaces, accumulation, manual optimization,
mixed precision, loggers, exports, console output, and internal failures that must not stop a run."""

import csv
import json
import warnings

import lightning.pytorch as pl
import pytest
import torch
from torch.nn import functional as F

from lightning_spikewatch import SpikeWatch
from tests.e2e.tiny import BATCH, TinyNet, fit, loader, position, regression_data, seeded, tiny_net_class


def watch(tmp_path, **kwargs) -> SpikeWatch:
    kwargs.setdefault("print_spikes", False)
    kwargs.setdefault("print_summary", False)
    return SpikeWatch(log_dir=tmp_path, **kwargs)


def outlier_data(batch_idx=40):
    data = regression_data()
    data.y[position(batch_idx)] += 30.0
    return data


def assert_outlier_found(w, batch_idx=40):
    assert [(e.batch_idx, e.cause) for e in w.spikes] == [(batch_idx, "outlier_sample")]
    assert w.spikes[0].evidence["samples"][0]["index"] == position(batch_idx)


def test_one_class_is_a_callback_of_both_namespaces():
    import pytorch_lightning

    assert issubclass(SpikeWatch, pl.Callback) and issubclass(SpikeWatch, pytorch_lightning.Callback)


def test_pytorch_lightning_trainer(tmp_path):
    import pytorch_lightning

    w = watch(tmp_path)
    model = seeded(tiny_net_class(pytorch_lightning.LightningModule))
    fit(model, outlier_data(), [w], trainer_module=pytorch_lightning)
    assert_outlier_found(w)


def test_lightning_pytorch_trainer(tmp_path):
    w = watch(tmp_path)
    fit(seeded(TinyNet), outlier_data(), [w])
    assert_outlier_found(w)


def test_gradient_accumulation_reports_the_micro_batch_and_its_undivided_loss(tmp_path):
    w = watch(tmp_path)
    trainer = fit(seeded(TinyNet), outlier_data(41), [w], accumulate_grad_batches=2)
    assert_outlier_found(w, 41)
    event = w.spikes[0]
    assert event.step == 20 and trainer.global_step == 30
    assert event.loss > 20  # the raw batch loss, not divided by the accumulation factor
    assert w.steps_watched == 30 and w.batches_watched == 60


def test_bf16_mixed_precision(tmp_path):
    w = watch(tmp_path)
    fit(seeded(TinyNet), outlier_data(), [w], precision="bf16-mixed")
    assert_outlier_found(w)


def test_fp16_with_grad_scaler_reads_the_unscaled_loss(tmp_path):
    from lightning.pytorch.plugins import MixedPrecision

    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    w = watch(tmp_path)
    fit(seeded(TinyNet), outlier_data(), [w], plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    assert_outlier_found(w)
    rows = list(csv.DictReader((tmp_path / "steps.csv").open()))
    assert float(rows[0]["loss"]) < 5  # the raw loss, not the loss times the scale of 1024


class TwoOptimizers(TinyNet):
    """Manual optimization with one optimizer per half of the network."""

    def __init__(self):
        super().__init__(per_sample=True)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        losses = self.per_sample_losses(batch)
        loss = losses.mean()
        first, second = self.optimizers()
        first.zero_grad()
        second.zero_grad()
        self.manual_backward(loss)
        first.step()
        second.step()
        return {"loss": loss.detach(), "per_sample_loss": losses.detach()}

    def configure_optimizers(self):
        params = list(self.net.parameters())
        return torch.optim.Adam(params[:2], lr=1e-3), torch.optim.SGD(params[2:], lr=1e-2)


def test_manual_optimization_with_two_optimizers(tmp_path):
    w = watch(tmp_path)
    fit(seeded(TwoOptimizers), outlier_data(), [w])
    assert_outlier_found(w)
    assert w.spikes[0].step == 80  # two optimizer steps per batch


def test_exports_match_the_events_and_loggers_get_the_scalars(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    w = SpikeWatch(print_spikes=False, print_summary=False)  # default log_dir: under the logger's folder
    logger = CSVLogger(tmp_path)
    fit(seeded(TinyNet), outlier_data(), [w], logger=logger, log_every_n_steps=10)
    folder = tmp_path / "lightning_logs" / "version_0" / "spikewatch"
    assert w.resolved_log_dir == folder
    lines = [json.loads(line) for line in (folder / "spikes.jsonl").read_text().splitlines()]
    assert lines == [e.to_dict() for e in w.spikes]
    rows = list(csv.DictReader((folder / "steps.csv").open()))
    assert len(rows) == 60 and [r["spike"] for r in rows].count("1") == 1
    assert rows[40]["batch_size"] == str(BATCH) and float(rows[40]["loss"]) == pytest.approx(w.spikes[0].loss, rel=1e-5)
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["spikes"] == 1 and summary["causes"] == {"outlier_sample": 1}
    metrics = list(csv.DictReader((tmp_path / "lightning_logs" / "version_0" / "metrics.csv").open()))
    spike_counts = [float(r["spikewatch/spikes"]) for r in metrics if r.get("spikewatch/spikes")]
    assert spike_counts[0] == 0 and spike_counts[-1] == 1
    assert any(r.get("spikewatch/loss_z") for r in metrics)


def test_trace_can_be_thinned_or_disabled(tmp_path):
    full = watch(tmp_path / "full")  # the default: every batch
    fit(seeded(TinyNet), outlier_data(45), [full])
    assert _trace_steps(tmp_path / "full") == list(range(60))
    thin = watch(tmp_path / "thin", trace_every=25)
    fit(seeded(TinyNet), outlier_data(45), [thin])
    # every 25th batch, the spike, and the steps that read the gradient norm (warm-up, every 32nd)
    expected = sorted({24, 49, 45, 32, *range(thin.warmup)})
    assert _trace_steps(tmp_path / "thin") == expected
    off = watch(tmp_path / "off", trace_every=0)
    fit(seeded(TinyNet), outlier_data(), [off])
    assert not (tmp_path / "off" / "steps.csv").exists() and len(off.spikes) == 1


def test_console_shows_one_line_per_spike_and_the_summary(tmp_path, capsys):
    w = watch(tmp_path, print_spikes=True, print_summary=True)
    fit(seeded(TinyNet), outlier_data(), [w])
    out = capsys.readouterr().out
    spike_lines = [line for line in out.splitlines() if line.startswith("SpikeWatch step")]
    assert len(spike_lines) == 1 and "outlier_sample" in spike_lines[0] and f"#{position(40)}" in spike_lines[0]
    assert "SpikeWatch summary" in out and "What to do" in out


def test_spike_line_goes_through_the_tqdm_progress_bar(tmp_path, capsys):
    w = watch(tmp_path, print_spikes=True)
    fit(seeded(TinyNet), outlier_data(), [w], enable_progress_bar=True)
    captured = capsys.readouterr()
    assert any(line.startswith("SpikeWatch step 40") for line in (captured.out + captured.err).splitlines())


def test_internal_failure_disables_only_that_part_with_one_warning(tmp_path, monkeypatch):
    import lightning_spikewatch.callback as callback_module

    def broken(*args, **kwargs):
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(callback_module, "find_dominant_samples", broken)
    data = outlier_data(30)
    data.y[position(45)] += 30.0
    w = watch(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = fit(seeded(TinyNet), data, [w])
    ours = [str(c.message) for c in caught if "SpikeWatch" in str(c.message)]
    assert len(ours) == 1 and "'replay' part failed" in ours[0] and "training continues" in ours[0]
    assert trainer.state.finished and trainer.global_step == 60
    assert [e.batch_idx for e in w.spikes] == [30, 45]  # detection carries on without the replay
    assert w.summary()["disabled"] == ["replay"]


def test_failure_in_a_hook_never_reaches_the_fit_loop(tmp_path, monkeypatch):
    import lightning_spikewatch.callback as callback_module

    monkeypatch.setattr(callback_module, "input_tensors", lambda batch, keys: 1 / 0)
    w = watch(tmp_path)
    with pytest.warns(RuntimeWarning, match="'watch' part failed"):
        trainer = fit(seeded(TinyNet), outlier_data(), [w])
    assert trainer.global_step == 60 and w.spikes == []


def test_after_watching_fails_the_summary_still_tells_what_was_found_and_the_files_are_closed(
    tmp_path, monkeypatch, capsys
):
    from lightning_spikewatch.detector import SpikeDetector

    original, failed_at = SpikeDetector.observe_settled, []

    def fails_after_the_spike(self, losses, scored=None):
        if w.spikes and not failed_at:  # the first catch-up after the spike at 40, before the end of the run
            failed_at.append(w.steps_watched)
            raise RuntimeError("simulated bug")
        return original(self, losses, scored)

    monkeypatch.setattr(SpikeDetector, "observe_settled", fails_after_the_spike)
    w = SpikeWatch(log_dir=tmp_path, print_spikes=False)
    with pytest.warns(RuntimeWarning, match="'watch' part failed"):
        trainer = fit(seeded(TinyNet), outlier_data(), [w])
    assert trainer.global_step == 60 and len(failed_at) == 1 and 41 <= failed_at[0] < 60
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["disabled"] == ["watch"] and summary["spikes"] == 1 and summary["worst"][0]["batch_idx"] == 40
    assert (tmp_path / "steps.csv").read_text().count("\n") > 40  # written up to the failure
    assert w._log._steps is None  # closed
    assert "Switched off after an error (see its warning): watch" in capsys.readouterr().out


def test_unwritable_log_dir_warns_once_and_training_continues(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    w = watch(blocker / "spikewatch")
    with pytest.warns(RuntimeWarning, match="'export' part failed"):
        trainer = fit(seeded(TinyNet), outlier_data(), [w])
    assert trainer.global_step == 60 and len(w.spikes) == 1


def test_validate_and_test_calls_stay_quiet(tmp_path):
    class WithEval(TinyNet):
        def validation_step(self, batch, batch_idx):
            return F.mse_loss(self.net(batch["x"]), batch["y"])

        test_step = validation_step

    w = watch(tmp_path)
    model = seeded(WithEval)
    trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[w])
    from tests.e2e.tiny import loader

    trainer.validate(model, loader(outlier_data()))
    trainer.test(model, loader(outlier_data()))
    assert w.spikes == [] and w.steps_watched == 0


def test_sharded_strategies_switch_off_the_per_rank_partial_signals():
    from types import SimpleNamespace

    from lightning_spikewatch.callback import sharded_reason

    class FSDPStrategy:  # named like Lightning's
        pass

    module = TinyNet()
    assert (
        sharded_reason(SimpleNamespace(strategy=FSDPStrategy()), module)
        == "the FSDPStrategy shards parameters across ranks"
    )
    assert sharded_reason(SimpleNamespace(strategy=object()), module) is None


def test_plot_at_fit_end_and_results_in_the_csv_logger(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    w = SpikeWatch(print_spikes=False, print_summary=False, plot=True)
    fit(seeded(TinyNet), outlier_data(), [w], logger=CSVLogger(tmp_path))
    version = tmp_path / "lightning_logs" / "version_0"
    assert (version / "spikewatch" / "spikes.png").read_bytes()[:4] == b"\x89PNG"
    assert "outlier_sample" in (version / "spikewatch_spikes.md").read_text()
    metrics = list(csv.DictReader((version / "metrics.csv").open()))
    assert [r["spikewatch/cause/outlier_sample"] for r in metrics if r.get("spikewatch/cause/outlier_sample")] == [
        "1.0"
    ]


def test_plot_without_matplotlib_warns_once_and_finishes(tmp_path, monkeypatch):
    import lightning_spikewatch.plot as plot

    monkeypatch.setattr(plot, "matplotlib_available", lambda: False)
    w = watch(tmp_path, plot=True)
    with pytest.warns(UserWarning, match=r"plot=True but plotting needs matplotlib"):
        trainer = fit(seeded(TinyNet), outlier_data(), [w])
    assert trainer.state.finished and not (tmp_path / "spikes.png").exists() and len(w.spikes) == 1


class HookCalls(pl.Callback):
    """Records, at each batch start, which SpikeWatch hooks Lightning would call (callable ones)."""

    def __init__(self, watched):
        self.watched, self.seen = watched, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        names = ("on_train_batch_start", "on_before_zero_grad", "on_after_backward", "on_train_batch_end")
        self.seen.append({name for name in names if callable(getattr(self.watched, name))})


def test_hooks_with_nothing_to_do_are_skipped_during_fit_and_restored_after(tmp_path):
    w = watch(tmp_path)
    calls = HookCalls(w)
    fit(seeded(TinyNet), outlier_data(), [w, calls])
    assert_outlier_found(w)  # batch end ran for the spike: its event is complete, with its samples
    assert calls.seen[30] == set()  # a quiet step after warm-up: none of the four is called
    # The batch and its index are read where Lightning keeps them during the step: batch start runs once.
    assert all("on_train_batch_start" not in seen for seen in calls.seen)
    assert all(callable(getattr(w, name)) for name in ("on_before_zero_grad", "on_after_backward"))
    assert callable(w.on_train_batch_start) and callable(w.on_train_batch_end)  # after fit: the class's again


def test_batch_start_keeps_running_where_lightning_keeps_the_batch_elsewhere(tmp_path, monkeypatch):
    from lightning_spikewatch import callback

    class Elsewhere:
        batch = None  # not the batch the hook is given

    monkeypatch.setattr(callback, "_loop_batch_source", lambda trainer: (Elsewhere(), None))
    w = watch(tmp_path)
    calls = HookCalls(w)
    fit(seeded(TinyNet), outlier_data(), [w, calls])
    assert all("on_train_batch_start" in seen for seen in calls.seen)  # called every step, as before
    assert_outlier_found(w)


class CountingBatchEnds(SpikeWatch):
    """Records Lightning's count of stepped batches at each batch end SpikeWatch runs."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.batch_ends = []

    def _end_batch(self, trainer, *args):
        self.batch_ends.append(trainer.fit_loop.epoch_loop._batches_that_stepped)
        super()._end_batch(trainer, *args)


def test_with_a_logger_batch_end_runs_at_the_logging_steps_and_the_spike_only(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    w = CountingBatchEnds(log_dir=tmp_path / "w", print_spikes=False, print_summary=False)
    fit(seeded(TinyNet), outlier_data(), [w], logger=CSVLogger(tmp_path / "logs"), log_every_n_steps=5)
    assert_outlier_found(w)  # batch end ran for the spike at step 40: its event has its samples
    assert w.batch_ends == sorted({*range(4, 60, 5), 40})  # Lightning logs where (count + 1) % 5 == 0
    metrics = list(csv.DictReader((tmp_path / "logs" / "lightning_logs" / "version_0" / "metrics.csv").open()))
    ours = [int(r["step"]) for r in metrics if r.get("spikewatch/spikes")]
    assert ours == [int(r["step"]) for r in metrics if r.get("train_loss")] == list(range(4, 60, 5))
    assert [float(r["spikewatch/spikes"]) for r in metrics if r.get("spikewatch/spikes")] == [0.0] * 8 + [1.0] * 4


def test_a_subclass_keeps_the_hooks_it_overrides(tmp_path):
    class CountingBackward(SpikeWatch):
        backwards = 0

        def on_after_backward(self, trainer, pl_module):
            self.backwards += 1

    w = CountingBackward(log_dir=tmp_path, print_spikes=False, print_summary=False)
    trainer = fit(seeded(TinyNet), outlier_data(), [w])
    assert w.backwards == trainer.global_step == 60
    assert_outlier_found(w)


def _trace_steps(log_dir) -> list[int]:
    with open(log_dir / "steps.csv") as f:
        return [int(row["step"]) for row in csv.DictReader(f)]


def test_one_batch_per_epoch_watches_every_step_and_finds_a_spike_in_a_later_epoch(tmp_path):
    # Full-batch training: the epoch loop's batch counter is 1 at every step, so it cannot tell one
    # step's backward from the next (it once left every step after the first unwatched).
    data = regression_data(n=BATCH * 4)
    clean = watch(tmp_path / "clean")
    fit(seeded(TinyNet, optimizer="sgd", lr=0.1), loader(data, batch_size=len(data)), [clean], max_epochs=150)
    assert clean.steps_watched == 150 and clean.spikes == []
    assert _trace_steps(tmp_path / "clean") == list(range(150))
    jumped = watch(tmp_path / "jumped")
    model = seeded(TinyNet, optimizer="sgd", lr=0.1, lr_jump=(100, 60.0))
    fit(model, loader(data, batch_size=len(data)), [jumped], max_epochs=150)
    assert jumped.steps_watched == 150
    first = jumped.spikes[0]
    assert (first.epoch, first.batch_idx, first.cause) == (first.step, 0, "learning_rate")
    assert 100 <= first.step <= 102
