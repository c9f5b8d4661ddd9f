"""A 2-process DDP run on CPU (gloo) with an outlier only rank 1 sees; run by test_distributed.py.

python tests/e2e/ddp_script.py OUT_DIR [ACTION]
"""

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from lightning_spikewatch import SpikeWatch
from tests.e2e.tiny import BATCH, TinyNet, regression_data, seeded

# DistributedSampler(shuffle=False) deals rows out in turn: rank 1 gets the odd rows.
OUTLIER_ROW = 2 * (40 * BATCH + 5) + 1  # rank 1, batch 40, position 5


class Rows(pl.LightningDataModule):
    """Rows dealt out in turn (DistributedSampler without shuffling), so which rank sees a row is known."""

    def __init__(self, data):
        super().__init__()
        self.data = data

    def train_dataloader(self):
        sampler = DistributedSampler(self.data, num_replicas=2, rank=self.trainer.global_rank, shuffle=False)
        return DataLoader(self.data, batch_size=BATCH, sampler=sampler)


def main(out: Path, action: str | None) -> None:
    data = regression_data(n=2 * 60 * BATCH)
    data.y[OUTLIER_ROW] += 30.0
    watch = SpikeWatch(log_dir=out / "spikes", action=action)
    trainer = pl.Trainer(
        strategy="ddp",
        accelerator="cpu",
        devices=2,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[watch],
        use_distributed_sampler=False,
    )
    trainer.fit(seeded(TinyNet), datamodule=Rows(data))
    result = {
        "spikes": [e.to_dict() for e in watch.spikes],
        "steps_watched": watch.steps_watched,
        "actions": dict(watch.actions_taken),
        "weights": [float(p.double().sum()) for p in trainer.lightning_module.parameters()],
    }
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))
    # Lightning leaves the process group up after fit; left to interpreter shutdown, gloo's worker
    # threads can abort the process ("terminate called without an active exception", exit -6).
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else None)
