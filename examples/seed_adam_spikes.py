"""Why does my loss spike with Adam but not with full-batch gradient descent?

An MLP 14 -> 100 -> 40 -> 4 trained with Adam (default betas/eps) on mini-batches of 32 from a
dataset of 993 samples: every epoch ends with a batch of a single sample. SpikeWatch finds the periodic spikes
and attributes them to `short_batch`; the same run with ``drop_last=True`` is quiet, and full-batch
gradient descent gives a smooth curve.

    python examples/seed_adam_spikes.py            # the three runs, about half a minute on a CPU
"""

from __future__ import annotations

import argparse
import logging
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

try:
    import lightning.pytorch as pl
except ImportError:  # pragma: no cover - the package also works with pytorch_lightning alone
    import pytorch_lightning as pl

from lightning_spikewatch import SpikeWatch
from lightning_spikewatch.plot import matplotlib_available as plot_available

DATASET_SIZE = 993  # 31 batches of 32, then a batch of 1
BATCH_SIZE = 32


def make_dataset(size: int = DATASET_SIZE, seed: int = 0) -> TensorDataset:
    """Four overlapping Gaussian classes in 14 dimensions, standardised."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(size, 14, generator=generator)
    centers = torch.randn(4, 14, generator=generator) * 0.5
    labels = torch.randint(0, 4, (size,), generator=generator)
    features = centers[labels] + noise
    features = (features - features.mean(0)) / features.std(0)
    return TensorDataset(features, labels)


class SeedMLP(pl.LightningModule):
    """The classic MLP 14 -> 100 -> 40 -> 4; its training_step returns only a scalar loss."""

    def __init__(self, optimizer: str = "adam", lr: float = 1e-3):
        super().__init__()
        self.optimizer_name = optimizer
        self.lr = lr
        self.net = nn.Sequential(nn.Linear(14, 100), nn.ReLU(), nn.Linear(100, 40), nn.ReLU(), nn.Linear(40, 4))

    def training_step(self, batch, batch_idx):
        features, labels = batch
        loss = F.cross_entropy(self.net(features), labels)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        if self.optimizer_name == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr)
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def run(
    title: str, *, drop_last: bool, full_batch: bool = False, epochs: int = 40, log_root: Path, plot: bool = False
) -> SpikeWatch:
    pl.seed_everything(0, verbose=False)
    dataset = make_dataset()
    batch_size = len(dataset) if full_batch else BATCH_SIZE
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=drop_last)
    model = SeedMLP("sgd" if full_batch else "adam", lr=0.5 if full_batch else 1e-3)
    watch = SpikeWatch(log_dir=log_root / title.replace(" ", "_").replace(",", ""), plot=plot and plot_available())
    trainer = pl.Trainer(
        max_epochs=epochs * (8 if full_batch else 1),
        callbacks=[watch],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    print(f"\n=== {title} ===")
    trainer.fit(model, loader)
    return watch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument(
        "--log-dir", type=Path, default=None, help="where the runs write their logs (./spikewatch_demo)"
    )
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    log_root = args.log_dir or Path("spikewatch_demo")

    adam = run("Adam, batch 32, last batch of 1", drop_last=False, epochs=args.epochs, log_root=log_root, plot=True)
    fixed = run("Adam, batch 32, drop_last=True", drop_last=True, epochs=args.epochs, log_root=log_root)
    full = run("Full-batch gradient descent", drop_last=False, full_batch=True, epochs=args.epochs, log_root=log_root)

    print("\n=== Verdict ===")
    causes = [event.cause for event in adam.spikes]
    short = causes.count("short_batch")
    print(f"Adam on mini-batches: {len(causes)} spike(s), {short} attributed to short_batch.")
    print(f"Same run with drop_last=True: {len(fixed.spikes)} spike(s).")
    print(f"Full-batch gradient descent: {len(full.spikes)} spike(s).")
    print(f"Spike logs: {log_root}  (try: spikewatch report {adam.resolved_log_dir})")
    if adam.plot:
        print(f"Plot: {adam.resolved_log_dir / 'spikes.png'}")


if __name__ == "__main__":
    main()
