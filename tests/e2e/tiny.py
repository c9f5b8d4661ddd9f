"""Tiny models, data and plants for end-to-end runs: every cause is planted for real at a known batch."""

from __future__ import annotations

import logging
import warnings
import weakref
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from lightning_spikewatch import SpikeWatch

BATCH = 32
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*isinstance.*LeafSpec.*")


class IndexedData(Dataset):
    """Dict samples ``{"x", "y", "index"}``, so a named outlier can be traced back to its row."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"x": self.x[i], "y": self.y[i], "index": i}


def regression_data(n: int = BATCH * 60, seed: int = 0) -> IndexedData:
    """A smooth 14 -> 4 regression with a little noise."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 14, generator=g)
    w = torch.randn(14, 4, generator=g)
    y = torch.sin(x @ w / 3) + 0.1 * torch.randn(n, 4, generator=g)
    return IndexedData(x, y)


def classification_data(n: int = BATCH * 60, seed: int = 0, separation: float = 3.0) -> IndexedData:
    """Two well separated Gaussian classes in 14 dimensions."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    direction = torch.randn(14, generator=g)
    direction = direction / direction.norm()
    x = torch.randn(n, 14, generator=g) + separation * (2 * y[:, None].float() - 1) * direction
    return IndexedData(x, y)


def position(batch_idx: int, within: int = 5) -> int:
    """Dataset row that lands at ``within`` in batch ``batch_idx`` (loaders here do not shuffle)."""
    return batch_idx * BATCH + within


def tiny_net_class(base: type) -> type:
    """The TinyNet model on either namespace's LightningModule."""

    class TinyNet(base):
        """MLP 14 -> 32 -> 16 -> out; MSE for regression, cross-entropy for classification.

        ``loss="log_prob"`` computes -log(softmax) by hand with a clamp, as code that takes the log
        of probabilities does. ``per_sample=True`` returns ``per_sample_loss`` next to the loss.
        """

        def __init__(
            self,
            task: str = "regression",
            optimizer: str = "adam",
            lr: float = 1e-3,
            loss: str = "standard",
            per_sample: bool = False,
            lr_jump: tuple[int, float] | None = None,
            grad_blowup: tuple[int, str, float] | None = None,
            dropout: float = 0.0,
            batchnorm: bool = False,
            metric: bool = False,
        ):
            super().__init__()
            self.task, self.optimizer_name, self.lr, self.loss_kind = task, optimizer, lr, loss
            self.per_sample, self.lr_jump, self.grad_blowup = per_sample, lr_jump, grad_blowup
            out = 4 if task == "regression" else 2
            layers: list[nn.Module] = [nn.Linear(14, 32)]
            if batchnorm:
                layers.append(nn.BatchNorm1d(32))
            layers += [nn.ReLU(), nn.Dropout(dropout), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, out)]
            self.net = nn.Sequential(*layers)
            self.metric = None
            if metric:
                import torchmetrics

                self.metric = torchmetrics.MeanMetric()

        def per_sample_losses(self, batch: dict[str, Any]) -> torch.Tensor:
            out = self.net(batch["x"])
            if self.task == "regression":
                return F.mse_loss(out, batch["y"], reduction="none").mean(dim=1)
            if self.loss_kind == "log_prob":
                probs = out.softmax(dim=1).gather(1, batch["y"][:, None]).squeeze(1)
                return -torch.log(probs.clamp_min(1e-12))
            return F.cross_entropy(out, batch["y"], reduction="none")

        def training_step(self, batch: dict[str, Any], batch_idx: int):
            if self.grad_blowup is not None and self.global_step == self.grad_blowup[0] and torch.is_grad_enabled():
                _, layer, factor = self.grad_blowup
                fired = []  # one backward pass only: the hook stays registered but does nothing afterwards

                def blow_up(grad: torch.Tensor) -> torch.Tensor:
                    if fired:
                        return grad
                    fired.append(True)
                    return grad * factor

                self.get_parameter(layer).register_hook(blow_up)
            losses = self.per_sample_losses(batch)
            loss = losses.mean()
            self.log("train_loss", loss)
            if self.metric is not None:
                self.metric.update(losses)
            if self.per_sample:
                return {"loss": loss, "per_sample_loss": losses.detach()}
            return loss

        def configure_optimizers(self):
            if self.optimizer_name == "adam":
                optimizer = torch.optim.Adam(self.parameters(), lr=self.lr)
            else:
                optimizer = torch.optim.SGD(self.parameters(), lr=self.lr)
            if self.lr_jump is None:
                return optimizer
            at, factor = self.lr_jump
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: factor if step >= at else 1.0)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    return TinyNet


TinyNet = tiny_net_class(pl.LightningModule)


class CollapseAdamSecondMoment(pl.Callback):
    """At one step, shrink one layer's ``exp_avg_sq`` a millionfold just before the optimizer uses it:
    what happens naturally when a layer's gradients stayed tiny for a long time and then return."""

    def __init__(self, step: int, layer: str, factor: float = 1e-6):
        self.step, self.layer, self.factor = step, layer, factor

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == self.step:
            state = optimizer.state.get(pl_module.get_parameter(self.layer))
            state["exp_avg_sq"].mul_(self.factor)


def seeded(factory: Any, *args: Any, seed: int = 0, **kwargs: Any) -> Any:
    """Build ``factory(*args, **kwargs)`` right after seeding every RNG, so runs are repeatable."""
    pl.seed_everything(seed, verbose=False)
    return factory(*args, **kwargs)


def watch(log_dir: Any, **kwargs: Any) -> SpikeWatch:
    """SpikeWatch writing to ``log_dir`` and printing nothing, as the end-to-end runs use it."""
    return SpikeWatch(log_dir=log_dir, print_spikes=False, print_summary=False, **kwargs)


def found(w: SpikeWatch) -> list[tuple[int, int, str]]:
    """A run's spikes as (step, batch index, cause)."""
    return [(e.step, e.batch_idx, e.cause) for e in w.spikes]


def loader(data: Dataset, batch_size: int = BATCH, **kwargs: Any) -> DataLoader:
    kwargs.setdefault("shuffle", False)
    return DataLoader(data, batch_size=batch_size, **kwargs)


def fit(model: pl.LightningModule, data: Any, callbacks: list, trainer_module: Any = pl, **trainer_kwargs: Any):
    """A quiet CPU fit; ``data`` is a Dataset or a DataLoader. The model is built by the caller, so
    callers seed before building it (``seeded``)."""
    settings = dict(
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    ckpt_path = trainer_kwargs.pop("ckpt_path", None)
    settings.update(trainer_kwargs)
    trainer = trainer_module.Trainer(callbacks=callbacks, **settings)
    trainer.fit(model, data if isinstance(data, DataLoader) else loader(data), ckpt_path=ckpt_path)
    return trainer


class PreviousGradientsAtBackward(pl.Callback):
    """Records, at each backward (after SpikeWatch's hook, before backward runs), whether the last
    step's gradients are still alive: Lightning has dropped them at zero_grad, so only a watcher
    can hold them."""

    def __init__(self):
        self.alive: dict[int, bool] = {}
        self._refs: list = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self._refs = [weakref.ref(p.grad) for p in pl_module.parameters() if p.grad is not None]

    def on_before_backward(self, trainer, pl_module, loss):
        self.alive[trainer.global_step] = bool(self._refs) and all(r() is not None for r in self._refs)
