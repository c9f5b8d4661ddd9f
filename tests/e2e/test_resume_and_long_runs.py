"""Resuming from a checkpoint keeps the windows and the history; long runs stay bounded."""

import json
import math
import random
import tracemalloc

import pytest
import torch

from lightning_spikewatch import SpikeWatch
from lightning_spikewatch.detector import SpikeDetector, StepSignals
from lightning_spikewatch.stats import VectorHistory
from tests.e2e.tiny import TinyNet, fit, position, regression_data, seeded


def watch(tmp_path, **kwargs) -> SpikeWatch:
    return SpikeWatch(log_dir=tmp_path / "spikes", print_spikes=False, print_summary=False, **kwargs)


def test_resumed_fit_needs_no_second_warmup_and_appends_without_duplicates(tmp_path):
    data = regression_data()  # 60 batches an epoch, no shuffling
    data.y[position(40)] += 30.0
    first = watch(tmp_path)
    trainer = fit(seeded(TinyNet), data, [first], enable_checkpointing=True, default_root_dir=tmp_path)
    assert [e.step for e in first.spikes] == [40]

    # The run goes on from its end-of-epoch checkpoint, and a new bad row turns up at step 65:
    # 5 batches after the resume, where a fresh detector would still be warming up (warmup=20).
    data.y[position(5)] += 30.0
    resumed = watch(tmp_path)
    checkpoint = trainer.checkpoint_callback.best_model_path
    fit(seeded(TinyNet), data, [resumed], max_epochs=2, ckpt_path=checkpoint)
    assert [e.step for e in resumed.spikes][:2] == [40, 65]
    assert resumed.spikes[1].cause == "outlier_sample"
    assert resumed.spikes[1].evidence["samples"][0]["index"] == position(5)
    lines = [json.loads(line) for line in (tmp_path / "spikes" / "spikes.jsonl").read_text().splitlines()]
    steps = [line["step"] for line in lines]
    assert steps[:2] == [40, 65] and len(steps) == len(set(steps))  # appended, nothing twice
    trace = (tmp_path / "spikes" / "steps.csv").read_text().splitlines()
    assert trace[0].startswith("step,") and len(trace) == 1 + 120  # one header, both runs' rows
    assert resumed.steps_watched == 120


def test_detector_and_histories_stay_bounded_over_a_million_steps():
    rng = random.Random(0)
    detector, layers = SpikeDetector(window=128), VectorHistory(128)
    spikes = 0
    for step in range(1_000_000):
        loss = 1.0 + 0.05 * rng.random() + (5.0 if step % 100_000 == 99_999 else 0.0)
        z = detector.observe_quietly(loss, 1.0 + 0.01 * rng.random(), 2.0)
        if z is None:
            spikes += detector.observe(StepSignals(loss, 1.0, 2.0)).is_spike
        layers.record((0.1, 0.2, 0.3))
    assert spikes == 10  # the planted ones, and no more
    assert all(len(window) == 128 for window in detector.windows.values())
    assert layers.count == 128


def test_memory_does_not_grow_with_the_number_of_steps():
    detector, layers = SpikeDetector(window=128), VectorHistory(128)

    def run(steps):
        for i in range(steps):
            detector.observe_quietly(1.0 + 0.01 * math.sin(i), 1.0, 2.0)
            layers.record([0.1] * 8)

    run(1_000)
    tracemalloc.start()
    run(10_000)
    after_10k = tracemalloc.get_traced_memory()[0]
    run(100_000)
    after_110k = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert after_110k - after_10k < 64 * 1024  # nothing accumulates per step


def test_two_instances_in_one_trainer_write_separately_and_both_resume(tmp_path):
    data = regression_data()
    data.y[position(40)] += 30.0
    a = SpikeWatch(print_spikes=False, print_summary=False)
    b = SpikeWatch(print_spikes=False, print_summary=False, z_threshold=4.0)
    assert a.state_key != b.state_key
    trainer = fit(seeded(TinyNet), data, [a, b], default_root_dir=tmp_path, enable_checkpointing=True)
    assert (a.resolved_log_dir.name, b.resolved_log_dir.name) == ("spikewatch", "spikewatch_2")
    assert (a.resolved_log_dir / "spikes.jsonl").exists() and (b.resolved_log_dir / "spikes.jsonl").exists()
    assert [e.step for e in a.spikes] == [40] and 40 in [e.step for e in b.spikes]
    checkpoint = trainer.checkpoint_callback.best_model_path
    c = SpikeWatch(print_spikes=False, print_summary=False)
    d = SpikeWatch(print_spikes=False, print_summary=False, z_threshold=4.0)
    fit(seeded(TinyNet), data, [c, d], default_root_dir=tmp_path, max_epochs=2, ckpt_path=checkpoint)
    assert [e.step for e in c.spikes][:1] == [40] and c.steps_watched == 120
    assert d.steps_watched == 120


def test_a_failure_to_save_its_state_never_fails_the_checkpoint_and_the_resumed_fit_warms_up_again(
    tmp_path, monkeypatch
):
    data = regression_data()
    data.y[position(40)] += 30.0

    def broken(self):
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(SpikeDetector, "state_dict", broken)
    first = watch(tmp_path)
    with pytest.warns(RuntimeWarning, match="'checkpoint' part failed") as caught:
        trainer = fit(seeded(TinyNet), data, [first], enable_checkpointing=True, default_root_dir=tmp_path)
    assert sum("SpikeWatch" in str(w.message) for w in caught) == 1
    assert [e.step for e in first.spikes] == [40] and first.summary()["disabled"] == ["checkpoint"]
    checkpoint = trainer.checkpoint_callback.best_model_path
    assert checkpoint and first.state_key not in torch.load(checkpoint, weights_only=False)["callbacks"]

    monkeypatch.undo()
    data.y[position(30)] += 30.0  # step 90: after the fresh warm-up of the resumed fit
    resumed = watch(tmp_path)
    fit(seeded(TinyNet), data, [resumed], max_epochs=2, ckpt_path=checkpoint)
    assert resumed.steps_watched == 60  # nothing restored: counted from the resume
    # No spike history either (step 40 is not among them); the first bad row is met again at step 100.
    assert [(e.step, e.cause) for e in resumed.spikes] == [(90, "outlier_sample"), (100, "outlier_sample")]


def test_resume_works_with_both_namespaces_checkpoints(tmp_path):
    import pytorch_lightning

    from tests.e2e.tiny import tiny_net_class

    data = regression_data()
    w = watch(tmp_path)
    model = seeded(tiny_net_class(pytorch_lightning.LightningModule))
    trainer = fit(
        model, data, [w], trainer_module=pytorch_lightning, enable_checkpointing=True, default_root_dir=tmp_path
    )
    resumed = watch(tmp_path)
    model = seeded(tiny_net_class(pytorch_lightning.LightningModule))
    fit(
        model,
        data,
        [resumed],
        trainer_module=pytorch_lightning,
        max_epochs=2,
        ckpt_path=trainer.checkpoint_callback.best_model_path,
    )
    assert resumed.steps_watched == 120 and resumed.detector.batches_seen == 120


def test_two_identical_instances_are_refused_by_lightning_with_its_message():
    with pytest.raises(RuntimeError, match="more than one stateful callback"):
        fit(seeded(TinyNet), regression_data(), [SpikeWatch(), SpikeWatch()])
