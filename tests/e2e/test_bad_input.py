"""Batches, models and optimizers nobody planned for: training always completes, SpikeWatch keeps
working where it can and says plainly where it cannot."""

import csv
import dataclasses
import json
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.nn import functional as F
from torch.nn.utils.rnn import pack_sequence
from torch.utils.data import DataLoader, IterableDataset

from lightning_spikewatch import SpikeWatch
from tests.e2e.tiny import BATCH, TinyNet, fit, loader, position, regression_data, seeded, watch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))


def outlier_data(batch_idx=40):
    data = regression_data()
    data.y[position(batch_idx)] += 30.0
    return data


def our_warnings(caught):
    return [str(w.message) for w in caught if "SpikeWatch" in str(w.message)]


@dataclasses.dataclass
class Batch:
    x: torch.Tensor
    y: torch.Tensor
    index: torch.Tensor


def collate(shape):
    """A collate_fn producing the batch in the given shape, and a getter for (x, y) back out of it."""

    def stack(items):
        return (
            torch.stack([i["x"] for i in items]),
            torch.stack([i["y"] for i in items]),
            torch.tensor([i["index"] for i in items]),
        )

    def make(items):
        x, y, index = stack(items)
        return {
            "tensor": lambda: torch.cat([x, y], dim=1),
            "tuple": lambda: (x, y),
            "list": lambda: [x, y],
            "nested": lambda: {"inputs": {"x": x}, "y": y, "index": index},
            "metadata": lambda: {
                "x": x,
                "y": y,
                "index": index,
                "names": [f"row{i}" for i in index.tolist()],
                "tag": "a",
            },
            "dataclass": lambda: Batch(x, y, index),
            "ragged": lambda: {"seqs": [x[i].repeat(4 + i % 10, 1) for i in range(len(x))], "y": y},
            "packed": lambda: {
                "packed": pack_sequence([x[i].repeat(2 + i % 5, 1) for i in range(len(x))], enforce_sorted=False),
                "y": y,
            },
        }[shape]()

    def unpack(batch):
        if shape == "tensor":
            return batch[:, :14], batch[:, 14:]
        if shape in ("tuple", "list"):
            return batch[0], batch[1]
        if shape == "nested":
            return batch["inputs"]["x"], batch["y"]
        if shape == "dataclass":
            return batch.x, batch.y
        if shape == "ragged":
            return torch.stack([s.mean(0) for s in batch["seqs"]]), batch["y"]
        if shape == "packed":
            data, sizes = torch.nn.utils.rnn.pad_packed_sequence(batch["packed"], batch_first=True)
            return data.sum(1) / sizes[:, None].to(data.dtype), batch["y"]
        return batch["x"], batch["y"]

    return make, unpack


class AnyBatchNet(TinyNet):
    def __init__(self, unpack):
        super().__init__()
        self.unpack = unpack

    def training_step(self, batch, batch_idx):
        x, y = self.unpack(batch)
        return F.mse_loss(self.net(x), y)


SPLITTABLE = ["tensor", "tuple", "list", "nested", "metadata", "dataclass"]


@pytest.mark.parametrize("shape", SPLITTABLE + ["ragged", "packed"])
def test_every_batch_shape_trains_and_its_spike_is_found(tmp_path, shape):
    make, unpack = collate(shape)
    w = watch(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = fit(seeded(AnyBatchNet, unpack), DataLoader(outlier_data(), batch_size=BATCH, collate_fn=make), [w])
    assert trainer.global_step == 60
    assert our_warnings(caught) == []
    assert 40 in [e.batch_idx for e in w.spikes]
    event = next(e for e in w.spikes if e.batch_idx == 40)
    if shape in SPLITTABLE:
        assert event.cause == "outlier_sample"
        if shape in ("nested", "metadata", "dataclass"):
            assert event.evidence["samples"][0]["index"] == position(40)
        else:
            assert event.evidence["samples"][0]["position"] == 5


def test_batch_that_cannot_be_split_is_reported_as_such(tmp_path):
    class FixedBatch(TinyNet):
        def training_step(self, batch, batch_idx):
            x = batch["x"].reshape(BATCH, 14)  # only ever works on a full batch
            return F.mse_loss(self.net(x), batch["y"])

    w = watch(tmp_path)
    trainer = fit(seeded(FixedBatch), outlier_data(), [w])
    assert trainer.global_step == 60
    event = next(e for e in w.spikes if e.batch_idx == 40)
    assert "could not be split below 32 samples" in event.evidence["replay_note"]


class Stream(IterableDataset):
    """No __len__: the last batch can only be recognised as it comes."""

    def __init__(self, data):
        self.data = data

    def __iter__(self):
        return (self.data[i] for i in range(len(self.data)))


def test_iterable_dataset_without_length(tmp_path):
    w = watch(tmp_path)
    data = outlier_data()
    trainer = fit(seeded(TinyNet), DataLoader(Stream(data), batch_size=BATCH), [w])
    assert trainer.global_step == 60 and [(e.batch_idx, e.cause) for e in w.spikes] == [(40, "outlier_sample")]


def test_batch_size_one(tmp_path):
    data = regression_data(n=200)
    data.y[150] += 30.0
    w = watch(tmp_path)
    trainer = fit(seeded(TinyNet), loader(data, batch_size=1), [w])
    assert trainer.global_step == 200
    assert 150 in [e.batch_idx for e in w.spikes]  # found; a batch of one needs no replay


def test_model_without_trainable_parameters(tmp_path):
    class Frozen(TinyNet):
        def __init__(self):
            super().__init__(per_sample=True)
            self.automatic_optimization = False
            self.requires_grad_(False)

        def training_step(self, batch, batch_idx):
            losses = self.per_sample_losses(batch)
            return {"loss": losses.mean(), "per_sample_loss": losses}

        def configure_optimizers(self):
            return None

    w = watch(tmp_path)
    trainer = fit(seeded(Frozen), outlier_data(), [w])
    assert trainer.state.finished
    assert [(e.batch_idx, e.cause) for e in w.spikes] == [(40, "outlier_sample")]


class PlainSignSGD(torch.optim.Optimizer):
    """A custom optimizer SpikeWatch knows nothing about."""

    def __init__(self, params, lr=1e-3):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad.sign(), alpha=-group["lr"])
        return loss


OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-3),
    "lbfgs": lambda p: torch.optim.LBFGS(p, lr=0.1, max_iter=3),
    "custom": lambda p: PlainSignSGD(p),
    "adam_foreach": lambda p: torch.optim.Adam(p, lr=1e-3, foreach=True),
    "adam_fused": lambda p: torch.optim.Adam(p, lr=1e-3, fused=True),
    "adamw_capturable": lambda p: torch.optim.AdamW(p, lr=1e-3, capturable=True),
}
CUDA_ONLY = {"adamw_capturable"}  # torch refuses capturable=True for CPU parameters


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=pytest.mark.skipif(n in CUDA_ONLY, reason="capturable Adam needs a GPU"))
        for n in OPTIMIZERS
    ],
)
def test_optimizers_other_than_plain_adam(tmp_path, name):
    class Net(TinyNet):
        def configure_optimizers(self):
            return OPTIMIZERS[name](self.parameters())

    w = watch(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = fit(seeded(Net), outlier_data(), [w])
    assert trainer.global_step == 60 and our_warnings(caught) == []
    assert (40, "outlier_sample") in [(e.batch_idx, e.cause) for e in w.spikes]


def test_inf_loss_is_non_finite(tmp_path):
    class InfAt(TinyNet):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return loss * float("inf") if batch_idx == 40 else loss

    w = watch(tmp_path)
    trainer = fit(seeded(InfAt), regression_data(), [w])
    assert trainer.global_step == 60
    assert (w.spikes[0].batch_idx, w.spikes[0].cause) == (40, "non_finite")


# Step 64 is one whose gradients are read on the CPU (every 32nd); at step 43 they are not, and the NaN
# gradient is found from that step's gradients, kept by reference, when the next loss is NaN. At 203
# the 128-batch loss window is full.
@pytest.mark.parametrize("baseline_every", [None, 1], ids=["cpu_default", "every_step"])
@pytest.mark.parametrize("step", [64, 43, 203])
def test_nan_gradient_with_a_finite_loss_is_non_finite(tmp_path, step, baseline_every):
    w = watch(tmp_path, baseline_every=baseline_every)
    model = seeded(TinyNet, grad_blowup=(step, "net.3.weight", float("nan")))
    batches = 60 if step < 60 else 240
    trainer = fit(model, regression_data(n=BATCH * batches), [w])
    assert trainer.global_step == batches
    first = w.spikes[0]
    assert (first.step, first.batch_idx, first.cause) == (step, step, "non_finite")
    assert first.evidence["non_finite"] == ["grad_norm"]
    assert len(w.spikes) == 1 and w.non_finite_repeats > 0  # the NaN weights that follow are counted once


@pytest.mark.parametrize(
    "settings",
    [{"fast_dev_run": True}, {"limit_train_batches": 10, "max_epochs": 3}, {"max_steps": 5}],
    ids=["fast_dev_run", "limit_train_batches", "max_steps"],
)
def test_short_debug_runs_stay_quiet(tmp_path, settings):
    w = watch(tmp_path)
    settings = {"max_epochs": 1, **settings}
    trainer = fit(seeded(TinyNet), regression_data(), [w], **settings)
    assert trainer.state.finished and w.spikes == []


def test_predict_stays_quiet(tmp_path):
    class Predicts(TinyNet):
        def predict_step(self, batch, batch_idx):
            return self.net(batch["x"])

    w = watch(tmp_path)
    trainer = pl.Trainer(logger=False, enable_progress_bar=False, callbacks=[w])
    trainer.predict(seeded(Predicts), loader(outlier_data()))
    assert w.spikes == [] and not (tmp_path / "spikes.jsonl").exists()


def test_crash_in_user_code_keeps_what_was_found(tmp_path):
    class CrashesLater(TinyNet):
        def training_step(self, batch, batch_idx):
            if batch_idx == 50:
                raise RuntimeError("user bug")
            return super().training_step(batch, batch_idx)

    w = watch(tmp_path)
    with pytest.raises(RuntimeError, match="user bug"):
        fit(seeded(CrashesLater), outlier_data(), [w])
    lines = (tmp_path / "spikes.jsonl").read_text().splitlines()
    assert [json.loads(line)["batch_idx"] for line in lines] == [40]
    assert json.loads((tmp_path / "summary.json").read_text())["spikes"] == 1


def weighted_batches(samples):
    features, labels = torch.utils.data.default_collate(samples)
    return torch.ones(4), features, labels  # 4 class weights first: dim 0 is 4, whatever the batch


LAST = 31  # the index of each epoch's batch of one
EPOCHS = 15
STEPS = EPOCHS * (LAST + 1)


def short_batch_run(tmp_path, **kwargs) -> tuple[SpikeWatch, list[dict[str, str]], list[str]]:
    import seed_adam_spikes as demo

    class WeightedSeedMLP(demo.SeedMLP):
        """The seed MLP on ``(class_weights, features, labels)`` batches: the first tensor is not per
        sample, so the batch size is not its first dimension and needs ``batch_size_fn``."""

        def training_step(self, batch, batch_idx):
            weights, features, labels = batch
            return F.cross_entropy(self.net(features), labels, weight=weights)

    pl.seed_everything(0, verbose=False)
    data = demo.make_dataset()  # 31 x 32 + 1 samples: each epoch ends on a batch of one
    assert len(data) == LAST * BATCH + 1
    w = watch(tmp_path, **kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(WeightedSeedMLP(), loader(data, shuffle=True, collate_fn=weighted_batches), [w], max_epochs=EPOCHS)
    with (tmp_path / "steps.csv").open() as f:
        return w, list(csv.DictReader(f)), our_warnings(caught)


def test_batch_size_fn_sizes_every_batch_and_the_short_batch_is_named(tmp_path):
    w, trace, said = short_batch_run(tmp_path / "fn", batch_size_fn=lambda batch: len(batch[2]))
    assert said == [] and len(trace) == STEPS and w.summary()["disabled"] == []
    # Every step's size, settled quietly, read or flagged alike: 32, and 1 at each epoch's end.
    sizes = {(int(r["batch_idx"]), int(r["batch_size"])) for r in trace}
    assert sizes == {(LAST, 1)} | {(i, BATCH) for i in range(LAST)}
    assert len(w.spikes) >= 2
    for event in w.spikes:
        assert event.batch_idx == LAST and event.cause == "short_batch" and event.evidence["batch_size"] == 1

    _, unsized, _ = short_batch_run(tmp_path / "default")  # without it: dim 0 of the first tensor
    assert {r["batch_size"] for r in unsized} == {"4"}


def test_batch_size_fn_that_fails_stops_only_batch_sizes_with_one_warning_and_training_goes_on(tmp_path):
    calls = []

    def breaks_on_the_400th_batch(batch):
        calls.append(1)
        if len(calls) == 400:
            raise KeyError("labels")
        return len(batch[2])

    w, trace, said = short_batch_run(tmp_path, batch_size_fn=breaks_on_the_400th_batch)
    assert len(said) == 1 and "batch_size_fn failed on batch" in said[0] and "KeyError" in said[0]
    assert len(calls) == 400  # not called again
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["disabled"] == ["batch_size"] and summary["steps_watched"] == STEPS and len(trace) == STEPS
    sizes = [int(r["batch_size"]) for r in trace]
    failed_at = sizes.index(-1)
    assert 380 <= failed_at < 400 and set(sizes[failed_at:]) == {-1}  # known up to the failure, then unknown
    before = [(e.step, e.cause) for e in w.spikes if e.step < failed_at]
    assert before == [(351, "short_batch")]  # found before the failure, as with a working batch_size_fn
    assert all(e.cause != "short_batch" for e in w.spikes if e.step >= failed_at)  # no size, no such claim


@pytest.mark.parametrize("returned", [3.5, "32", -1])
def test_batch_size_fn_that_returns_no_size_is_reported_once(tmp_path, returned):
    w, trace, said = short_batch_run(tmp_path, batch_size_fn=lambda batch: returned)
    assert len(said) == 1 and "batch_size_fn failed on batch 0 of epoch 0" in said[0]
    assert {r["batch_size"] for r in trace} == {"-1"} and w.summary()["disabled"] == ["batch_size"]
