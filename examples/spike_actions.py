"""What each opt-in action is worth: the same planted spikes, trained with and without it.

Each scenario plants one real cause at step 40 of a small regression run (SGD, 3 epochs of 60
batches): a corrupted target, a batch blown up by a near-zero std and a NaN input (all three in
the dataset, so they come back every epoch), and one layer's gradient x3000 (once). Each is
trained with ``action=None``, ``"skip"``, ``"clip"`` and ``"stop"`` (a stopped run is resumed
from its checkpoint until it completes), plus a clean run where no action may fire. Recovery is
read on held-out clean data after every step, so it shows the damage done to the model, not the
bad batch's own loss:

- final: clean loss at the end of training;
- peak: the highest clean loss after the plant;
- above: steps after the plant whose clean loss is above its value just before the plant (how
  long the model took to get back to where it was).

    python examples/spike_actions.py            # the table (about a minute on a laptop CPU)
    python examples/spike_actions.py --markdown # the same as a Markdown table, for the README
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich import box
from rich.console import Console
from rich.table import Table
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

try:
    import lightning.pytorch as pl
except ImportError:  # pragma: no cover
    import pytorch_lightning as pl

from lightning_spikewatch import SpikeWatch

BATCH, BATCHES, EPOCHS = 32, 60, 3
PLANT_STEP = 40  # the planted batch is batch 40 of the first epoch (the loader does not shuffle)
SCENARIOS = ("clean", "outlier_sample", "input_scale", "non_finite", "layer_gradient")
ACTIONS = (None, "skip", "clip", "stop")
MAX_RESUMES = 5

logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*resuming from a checkpoint that ended before the epoch ended.*")
warnings.filterwarnings("ignore", ".*isinstance.*LeafSpec.*")


class Rows(Dataset):
    """Dict samples ``{"x", "y", "index"}`` of a smooth 14 -> 4 regression."""

    def __init__(self, size: int, seed: int):
        generator = torch.Generator().manual_seed(seed)
        self.x = torch.randn(size, 14, generator=generator)
        weights = torch.randn(14, 4, generator=torch.Generator().manual_seed(1234))
        self.y = torch.sin(self.x @ weights / 3) + 0.1 * torch.randn(size, 4, generator=generator)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"x": self.x[i], "y": self.y[i], "index": i}


def planted_data(scenario: str) -> Rows:
    data = Rows(BATCH * BATCHES, seed=0)
    row = PLANT_STEP * BATCH + 5
    if scenario == "outlier_sample":
        data.y[row] += 30.0  # a corrupted target: back every epoch
    elif scenario == "input_scale":
        rows = slice(PLANT_STEP * BATCH, (PLANT_STEP + 1) * BATCH)
        data.x[rows] = data.x[rows] / 1e-4  # (x - mean) / std with std ~ 1e-4
    elif scenario == "non_finite":
        data.x[row, 3] = float("nan")  # back every epoch
    return data


class Regressor(pl.LightningModule):
    """MLP 14 -> 32 -> 16 -> 4 with MSE and plain SGD; ``blowup`` multiplies one layer's gradient
    by 3000 at one step (the ``layer_gradient`` plant)."""

    def __init__(self, blowup_at: int | None = None):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(14, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4))
        self.blowup_at = blowup_at

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        if self.blowup_at is not None and self.global_step == self.blowup_at and torch.is_grad_enabled():
            fired: list[bool] = []

            def blow_up(grad: torch.Tensor) -> torch.Tensor:
                if fired:
                    return grad
                fired.append(True)
                return grad * 3e3

            self.net[2].weight.register_hook(blow_up)
        return F.mse_loss(self.net(batch["x"]), batch["y"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


class CleanLoss(pl.Callback):
    """Loss on fixed clean held-out data after every optimizer step: how damaged the model is.

    Evaluation only (no grad, no RNG draws, no state touched), so it changes nothing about training.
    """

    def __init__(self) -> None:
        held_out = Rows(512, seed=99)
        self.x, self.y = held_out.x, held_out.y
        self.curve: dict[int, float] = {}

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        with torch.no_grad():
            loss = F.mse_loss(pl_module.net(self.x), self.y)
        self.curve[trainer.global_step - 1] = float(loss)  # the step whose update was just applied


@dataclass
class Outcome:
    scenario: str
    action: str
    spikes: int
    actions_taken: int
    final: float
    peak: float
    above: int
    resumes: int = 0
    causes: list[str] = field(default_factory=list)


def recovery(curve: dict[int, float]) -> tuple[float, float, int]:
    """(final clean loss, peak clean loss after the plant, steps after the plant above the pre-spike level)."""
    steps = sorted(curve)
    level = curve[PLANT_STEP - 1]
    after = [curve[s] for s in steps if s >= PLANT_STEP]
    above = sum(1 for value in after if not value <= level)  # NaN counts as above
    peak = max(after, key=lambda v: math.inf if math.isnan(v) else v)
    return curve[steps[-1]], peak, above


def trainer_for(callbacks: list, root: Path) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=EPOCHS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
        default_root_dir=root,
        callbacks=callbacks,
    )


def run(scenario: str, action: str | None, root: Path, seed: int = 0) -> Outcome:
    """Train one scenario with one action; a stopped run is resumed until it completes."""
    data = planted_data(scenario)
    blowup_at = PLANT_STEP if scenario == "layer_gradient" else None
    clean = CleanLoss()
    log_dir = root / f"{scenario}-{action}"
    pl.seed_everything(seed, verbose=False)
    model = Regressor(blowup_at)
    watch = SpikeWatch(log_dir=log_dir, action=action, print_spikes=False, print_summary=False)
    trainer = trainer_for([watch, clean], root)
    trainer.fit(model, DataLoader(data, batch_size=BATCH))
    spikes, taken, causes, resumes = list(watch.spikes), sum(watch.actions_taken.values()), [], 0
    while watch.stopped is not None and resumes < MAX_RESUMES:
        resumes += 1
        checkpoint = watch.stopped["checkpoint"]
        watch = SpikeWatch(log_dir=log_dir, action=action, print_spikes=False, print_summary=False)
        trainer = trainer_for([watch, clean], root)
        trainer.fit(Regressor(blowup_at), DataLoader(data, batch_size=BATCH), ckpt_path=checkpoint)
        spikes = list(watch.spikes)  # restored from the checkpoint, plus the new ones
        taken = sum(watch.actions_taken.values())
    causes = sorted({event.cause for event in spikes})
    final, peak, above = recovery(clean.curve)
    return Outcome(scenario, str(action), len(spikes), taken, final, peak, above, resumes, causes)


def table(outcomes: list[Outcome]) -> Table:
    view = Table(
        title="Recovery with each action (clean held-out loss; lower is better)",
        title_justify="left",
        box=box.SIMPLE_HEAD,  # no vertical rules: the eight columns fit an 80-column terminal
        pad_edge=False,
    )
    for column in ("scenario", "action", "spikes", "actions", "resumes", "final", "peak", "above"):
        view.add_column(column, justify="left" if column in ("scenario", "action") else "right", no_wrap=True)
    for o in outcomes:
        view.add_row(
            o.scenario,
            o.action,
            str(o.spikes),
            str(o.actions_taken),
            str(o.resumes),
            _num(o.final),
            _num(o.peak),
            str(o.above),
        )
    return view


def markdown(outcomes: list[Outcome]) -> str:
    lines = [
        "| scenario | action | spikes | actions | resumes | final loss | peak loss | steps above |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for o in outcomes:
        lines.append(
            f"| {o.scenario} | {o.action} | {o.spikes} | {o.actions_taken} | {o.resumes} | {_num(o.final)} "
            f"| {_num(o.peak)} | {o.above} |"
        )
    return "\n".join(lines)


def _num(value: float) -> str:
    return "nan" if math.isnan(value) else f"{value:.4g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", nargs="*", default=list(SCENARIOS), choices=SCENARIOS)
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table instead")
    parser.add_argument("--out", type=Path, help="also write the outcomes as JSON")
    args = parser.parse_args()
    outcomes = []
    with tempfile.TemporaryDirectory() as folder:
        for scenario in args.scenarios:
            for action in ACTIONS:
                outcomes.append(run(scenario, action, Path(folder)))
    if args.out:
        args.out.write_text(json.dumps([asdict(o) for o in outcomes], indent=2, allow_nan=True) + "\n")
    if args.markdown:
        print(markdown(outcomes))
    else:
        Console().print(table(outcomes))


if __name__ == "__main__":
    main()
