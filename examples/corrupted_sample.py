"""A single corrupted row in the dataset: SpikeWatch names it by its dataset index.

A small regression dataset yields dict batches ``{"x", "y", "index"}``; row 2021 has a target that
is off by 40 (a unit mix-up, say). Every epoch, when that row comes round, the loss spikes.
SpikeWatch replays the spiking batch on sub-batches (bit-for-bit invisible to training), finds
the row that carries the loss, and says which one to look at.

    python examples/corrupted_sample.py
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

try:
    import lightning.pytorch as pl
except ImportError:  # pragma: no cover
    import pytorch_lightning as pl

from lightning_spikewatch import SpikeWatch

CORRUPTED_ROW = 2021


class Rows(Dataset):
    """Dict samples that carry their own dataset index, so a spike can be traced to a row."""

    def __init__(self, size: int = 4096, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.x = torch.randn(size, 14, generator=generator)
        weights = torch.randn(14, 4, generator=generator)
        self.y = torch.tanh(self.x @ weights / 3) + 0.05 * torch.randn(size, 4, generator=generator)
        self.y[CORRUPTED_ROW] += 40.0

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"x": self.x[i], "y": self.y[i], "index": i}


class Regressor(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(14, 64), nn.ReLU(), nn.Linear(64, 4))

    def training_step(self, batch, batch_idx):
        return F.mse_loss(self.net(batch["x"]), batch["y"])

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def main() -> None:
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    pl.seed_everything(0, verbose=False)
    watch = SpikeWatch(log_dir=Path("spikewatch_demo") / "corrupted_sample")
    trainer = pl.Trainer(
        max_epochs=3,
        callbacks=[watch],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        accelerator="cpu",
    )
    trainer.fit(Regressor(), DataLoader(Rows(), batch_size=64, shuffle=True))
    named = {s["index"] for e in watch.spikes if e.cause == "outlier_sample" for s in e.evidence["samples"]}
    print(f"\nRows named as outliers: {sorted(named)} (the corrupted row is {CORRUPTED_ROW})")


if __name__ == "__main__":
    main()
