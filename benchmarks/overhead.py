"""What SpikeWatch costs per training step, against a bare Trainer and what users run today.

Runs real ``Trainer.fit`` loops (progress bar, logger and checkpointing off, so the loop itself is
measured) on two workloads and several variants, interleaved A B C A B C ... so that machine drift
cancels, and reports each variant's median step time relative to the bare Trainer.

    python benchmarks/overhead.py                       # CPU, both workloads, 5 repetitions
    python benchmarks/overhead.py --accelerator gpu     # the same on a GPU
    python benchmarks/overhead.py --scaling             # also: 10x more steps, same per-step cost?
    python benchmarks/overhead.py --parts               # also: where SpikeWatch's time goes in the loop
    python benchmarks/overhead.py --out overhead.json   # and write the numbers as JSON
    python benchmarks/overhead.py --memory-only         # only each variant's process peak memory

The "host peak" column is the Python heap (tracemalloc), which does not see torch's CPU tensors;
the process peak (``--memory-only``, and in full runs) is each variant's resident-set high-water
mark in a fresh process, tensors included, so holding one more set of gradients shows there
(glibc's mmap threshold is fixed for it, so the mark is what was alive at once).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import grad_norm
from rich.console import Console
from rich.table import Table
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_spikewatch import SpikeWatch
from lightning_spikewatch.callback import CPU_BASELINE_EVERY

for _name in ("lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
    logging.getLogger(_name).setLevel(logging.ERROR)
warnings.filterwarnings("ignore")


# ---------------------------------------------------------------------------------------- workloads


class MLP(pl.LightningModule):
    """``scheduled``: AdamW with and without weight decay in two param groups, a learning rate that
    changes at every step (linear warm-up, then cosine) and the loss logged with ``self.log``, as
    much training code sets it up."""

    def __init__(self, widths: list[int], lr: float = 1e-3, scheduled: bool = False):
        super().__init__()
        layers: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.net = nn.Sequential(*layers[:-1])
        self.lr, self.scheduled = lr, scheduled

    def training_step(self, batch, batch_idx):
        x, y = (batch["x"], batch["y"]) if isinstance(batch, dict) else batch
        loss = F.cross_entropy(self.net(x), y)
        if self.scheduled:
            self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        if not self.scheduled:
            return torch.optim.Adam(self.parameters(), lr=self.lr)
        named = list(self.named_parameters())
        groups = [
            {"params": [p for name, p in named if name.endswith("weight")], "weight_decay": 0.01},
            {"params": [p for name, p in named if name.endswith("bias")], "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW(groups, lr=self.lr)
        warmup, total = 100, 1_000_000

        def rate(step: int) -> float:
            return (step + 1) / warmup if step < warmup else 0.5 * (1 + math.cos(math.pi * step / total))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, rate)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _dict_batch(samples: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {"x": torch.stack([x for x, _ in samples]), "y": torch.stack([y for _, y in samples])}


@dataclass(frozen=True)
class Workload:
    name: str
    widths: list[int]
    batch_size: int
    steps: int
    typical: bool = False  # dict batches, two param groups, a new learning rate every step, a logger

    def model(self) -> MLP:
        torch.manual_seed(0)
        return MLP(self.widths, scheduled=self.typical)

    def loader(self, steps: int) -> DataLoader:
        generator = torch.Generator().manual_seed(0)
        n = self.batch_size * min(steps, 512)
        x = torch.randn(n, self.widths[0], generator=generator)
        y = torch.randint(0, self.widths[-1], (n,), generator=generator)
        collate = _dict_batch if self.typical else None
        return DataLoader(
            TensorDataset(x, y), batch_size=self.batch_size, shuffle=True, drop_last=True, collate_fn=collate
        )

    def trainer_options(self) -> dict:
        """What this workload changes in ``quiet_trainer``: the typical one logs, as most runs do."""
        if not self.typical:
            return {}
        root = tempfile.mkdtemp(prefix="bench_logs_")
        return {"logger": CSVLogger(root), "log_every_n_steps": 50, "default_root_dir": root}

    @property
    def parameters(self) -> int:
        return sum(a * b + b for a, b in zip(self.widths[:-1], self.widths[1:]))


WORKLOADS = {
    "seed_mlp": Workload("seed_mlp", [14, 100, 40, 4], 32, 600),
    "seed_mlp_typical": Workload("seed_mlp_typical", [14, 100, 40, 4], 32, 600, typical=True),
    "medium_mlp": Workload("medium_mlp", [1024, 2048, 2048, 1024], 32, 160),
}


# ---------------------------------------------------------------------------------------- variants


class GradNormLogging(pl.Callback):
    """What many users do today: log every layer's gradient norm every step with Lightning's utility."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        pl_module.log_dict(grad_norm(pl_module, norm_type=2))


def lightning_spike_detection() -> pl.Callback:
    from lightning.pytorch.callbacks import SpikeDetection

    return SpikeDetection(exclude_batches_path=tempfile.mkdtemp())


def zclip_callback() -> pl.Callback | None:
    try:
        from zclip import ZClipLightningCallback
    except ImportError:
        return None
    return ZClipLightningCallback()


def spikewatch() -> pl.Callback:
    return SpikeWatch(log_dir=tempfile.mkdtemp(prefix="spikewatch_bench_"), print_spikes=False, print_summary=False)


def spikewatch_reading_every(every: int) -> pl.Callback:
    """SpikeWatch with another CPU read period, to compare periods."""
    log_dir = tempfile.mkdtemp(prefix="spikewatch_bench_")
    return SpikeWatch(log_dir=log_dir, baseline_every=every, print_spikes=False, print_summary=False)


def spikewatch_every_step() -> pl.Callback:
    """SpikeWatch reading gradient and input norms on every step, as it does on accelerators."""
    return spikewatch_reading_every(1)


def spikewatch_skip() -> pl.Callback:
    """SpikeWatch with an action on: the gradient norm is then scored every step as well."""
    return SpikeWatch(
        log_dir=tempfile.mkdtemp(prefix="spikewatch_bench_"), action="skip", print_spikes=False, print_summary=False
    )


class FusedNormFloor(pl.Callback):
    """The least a gradient watcher can do each step: one fused norm over all gradients and one
    transfer of the result. Measured inside the loop, where it pays what any callback pays."""

    def on_fit_start(self, trainer, pl_module):
        self.params = [p for p in pl_module.parameters() if p.requires_grad]

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        torch.stack(torch._foreach_norm([p.grad for p in self.params if p.grad is not None])).tolist()


VARIANTS: dict[str, Callable[[], pl.Callback | None]] = {
    "bare": lambda: None,
    "empty callback": pl.Callback,  # what Lightning charges for any callback at all
    "fused-norm floor": FusedNormFloor,
    "spikewatch": spikewatch,
    "spikewatch every step": spikewatch_every_step,
    "spikewatch action=skip": spikewatch_skip,
    "grad_norm logging": GradNormLogging,
    "SpikeDetection": lightning_spike_detection,
    "ZClip": zclip_callback,
}
COMPETITORS = ("grad_norm logging", "SpikeDetection", "ZClip")


# ---------------------------------------------------------------------------------------- timing


def synced_now(device: torch.device) -> float:
    """The time once the device's queued work is done (on a GPU kernels run after their launch)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


BLOCK = CPU_BASELINE_EVERY  # steps per timing block: one periodic CPU read each (see StepClock.step_seconds)


class StepClock(pl.Callback):
    """Time between consecutive step starts after ``skip`` warm-up steps; the median interval is
    robust to the odd stall a shared machine adds. On a GPU the queue of kernels fills up within a
    few steps, so intervals measure throughput without a sync per step (one at each end)."""

    def __init__(self, skip: int, device: torch.device):
        self.skip, self.device = skip, device
        self.stamps: list[float] = []
        self.cpu_start = self.cpu_end = 0.0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.skip:
            self._sync()
            self.cpu_start = time.process_time()
        if trainer.global_step >= self.skip:
            self.stamps.append(time.perf_counter())

    def on_train_end(self, trainer, pl_module):
        self._sync()
        self.stamps.append(time.perf_counter())
        self.cpu_end = time.process_time()

    def _block_means(self) -> list[float]:
        intervals = [b - a for a, b in zip(self.stamps, self.stamps[1:])]
        blocks = [intervals[i : i + BLOCK] for i in range(0, len(intervals) - BLOCK + 1, BLOCK)]
        return [sum(block) / BLOCK for block in blocks] or intervals

    @property
    def step_seconds(self) -> float:
        """Median over blocks of BLOCK consecutive steps of the block's mean step time: robust to a
        stall like a plain median, yet it charges work done every n-th step (n dividing BLOCK,
        such as SpikeWatch's periodic gradient reads on the CPU) to the steps in between."""
        return statistics.median(self._block_means())

    @property
    def fastest_block_seconds(self) -> float:
        """The fastest block's mean step time. On a shared machine other tenants only ever add
        time, so the fastest of many blocks estimates the step without them: the ratios built
        on it vary several times less between repetitions than the median's when the machine is busy."""
        return min(self._block_means())

    @property
    def step_cpu_seconds(self) -> float:
        """CPU time of the whole process per step (all threads)."""
        return (self.cpu_end - self.cpu_start) / max(1, len(self.stamps) - 1)


def quiet_trainer(steps: int, accelerator: str, callbacks: list, **options: Any) -> pl.Trainer:
    """A Trainer with progress bar, logger, checkpointing and summary off: the loop itself is measured.
    ``options`` (a workload's ``trainer_options``) override those settings."""
    settings = {
        "max_steps": steps,
        "accelerator": accelerator,
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "callbacks": callbacks,
        "default_root_dir": tempfile.mkdtemp(prefix="bench_"),
    }
    return pl.Trainer(**{**settings, **options})


def run_once(
    workload: Workload, variant: str, steps: int, skip: int, accelerator: str, trace_memory: bool = False
) -> dict | None:
    extra = VARIANTS[variant]()
    if extra is None and variant != "bare":
        return None
    device = torch.device("cuda" if accelerator == "gpu" else "cpu")
    clock = StepClock(skip, device)
    trainer = quiet_trainer(
        steps, accelerator, [clock] + ([extra] if extra is not None else []), **workload.trainer_options()
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    gc.collect()
    if trace_memory:  # tracemalloc slows Python down, so memory is measured in separate, untimed runs
        tracemalloc.start()
    trainer.fit(workload.model(), workload.loader(steps))
    host_peak = tracemalloc.get_traced_memory()[1] / 2**20 if trace_memory else None
    tracemalloc.stop()
    device_peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {
        "step_s": clock.step_seconds,
        "fastest_s": clock.fastest_block_seconds,
        "step_cpu_s": clock.step_cpu_seconds,
        "host_peak_mb": host_peak,
        "device_peak_mb": device_peak,
    }


def process_peak_mb(workload: Workload, variant: str, steps: int, skip: int, accelerator: str) -> float | None:
    """The resident-set high-water mark of one fit of ``variant`` in a fresh process, in MB: what the
    machine had to hold at once, torch's tensors included (None if the variant is not installed)."""
    command = [sys.executable, __file__, "--memory-child", variant, "--workloads", workload.name]
    command += ["--steps", str(steps), "--skip", str(skip), "--accelerator", accelerator]
    # glibc's mmap threshold fixed: freed big tensors go back to the system at once, so the mark is
    # what was alive at once, not what the allocator happened to keep (which moved it by +-20 MB).
    env = os.environ | {"MALLOC_MMAP_THRESHOLD_": "131072"}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode == 3:
        return None
    if done.returncode != 0:
        raise RuntimeError(f"{variant}: memory run failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
    return float(done.stdout.split()[-1])


def _memory_child(workload: Workload, variant: str, steps: int, skip: int, accelerator: str) -> None:
    if run_once(workload, variant, steps, skip, accelerator) is None:
        sys.exit(3)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KB on Linux, bytes on macOS
    print(peak / 2**20 if sys.platform == "darwin" else peak / 2**10)


def process_peaks(workload: Workload, accelerator: str, skip: int, reps: int, console: Console) -> dict:
    """Each variant's process peak (median of ``reps`` fresh processes) and its excess over bare."""
    peaks: dict[str, list[float]] = {}
    for _ in range(reps):  # interleaved, as the timings
        for name in VARIANTS:
            peak = process_peak_mb(workload, name, workload.steps, skip, accelerator)
            if peak is not None:
                peaks.setdefault(name, []).append(peak)
    bare = statistics.median(peaks["bare"])
    rows = {name: {"median_mb": statistics.median(v), "min_mb": min(v), "max_mb": max(v)} for name, v in peaks.items()}
    table = Table(
        title=f"{workload.name}: process peak memory (resident-set high-water mark), {workload.steps} steps, "
        f"median of {reps} fresh processes",
        title_justify="left",
    )
    for column in ("variant", "process peak", "over bare", "min..max"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    for name, row in rows.items():
        row["over_bare_mb"] = row["median_mb"] - bare
        table.add_row(
            name,
            f"{row['median_mb']:.1f} MB",
            f"{row['over_bare_mb']:+.1f} MB",
            f"{row['min_mb']:.1f}..{row['max_mb']:.1f}",
        )
    console.print(table)
    gradients_mb = workload.parameters * 4 / 2**20
    size = f"{gradients_mb:.1f} MB" if gradients_mb >= 0.1 else f"{gradients_mb * 1024:.0f} KB"
    console.print(f"one set of {workload.name}'s float32 gradients is {size}.\n")
    return {"reps": reps, "gradients_mb": gradients_mb, "variants": rows}


def fused_norm_floor(workload: Workload, accelerator: str, repeats: int = 200) -> float:
    """Seconds for one fused norm over all gradients: about the least a gradient watcher can cost."""
    device = torch.device("cuda" if accelerator == "gpu" else "cpu")
    model = workload.model().to(device)
    x, y = next(iter(workload.loader(1)))
    model.training_step((x.to(device), y.to(device)), 0).backward()
    grads = [p.grad for p in model.parameters()]
    timings = []
    for _ in range(5):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        if device.type == "cuda":
            torch.cuda.synchronize()
        timings.append((time.perf_counter() - start) / repeats)
    return statistics.median(timings)


# ---------------------------------------------------------------------------------------- reporting


@dataclass
class VariantResult:
    step_ms: list[float] = field(default_factory=list)
    ratio: list[float] = field(default_factory=list)
    fastest_ratio: list[float] = field(default_factory=list)
    host_peak_mb: list[float] = field(default_factory=list)
    device_peak_mb: list[float] = field(default_factory=list)

    def summary(self) -> dict:
        return {
            "median_step_ms": statistics.median(self.step_ms),
            "ratio_median": statistics.median(self.ratio),
            "ratio_min": min(self.ratio),
            "ratio_max": max(self.ratio),
            "fastest_ratio_median": statistics.median(self.fastest_ratio),
            "fastest_ratio_min": min(self.fastest_ratio),
            "fastest_ratio_max": max(self.fastest_ratio),
            "host_peak_mb": max(self.host_peak_mb),
            "device_peak_mb": max(self.device_peak_mb) if self.device_peak_mb else None,
        }


def measure(workload: Workload, reps: int, skip: int, accelerator: str, steps: int | None = None) -> dict:
    steps = steps or workload.steps
    results = {name: VariantResult() for name in VARIANTS}
    for name in VARIANTS:  # warm-up pass: imports, allocator, caches
        run_once(workload, name, skip + 20, skip, accelerator)
    for _ in range(reps):
        bare = None
        for name in VARIANTS:  # interleaved: bare, spikewatch, ..., bare, spikewatch, ...
            outcome = run_once(workload, name, steps, skip, accelerator)
            if outcome is None:
                continue
            bare = outcome if name == "bare" else bare
            result = results[name]
            result.step_ms.append(outcome["step_s"] * 1e3)
            result.ratio.append(outcome["step_s"] / bare["step_s"])
            result.fastest_ratio.append(outcome["fastest_s"] / bare["fastest_s"])
            if outcome["device_peak_mb"] is not None:
                result.device_peak_mb.append(outcome["device_peak_mb"])
    for name, result in results.items():  # Python-heap peak of each variant, in an untimed run
        outcome = run_once(workload, name, steps, skip, accelerator, trace_memory=True)
        if outcome is not None:
            result.host_peak_mb.append(outcome["host_peak_mb"])
    isolated_floor_ms = fused_norm_floor(workload, accelerator) * 1e3
    summary = {name: r.summary() for name, r in results.items() if r.step_ms}
    bare_ms = summary["bare"]["median_step_ms"]
    sw_added_ms = summary["spikewatch"]["median_step_ms"] - bare_ms
    floor_added_ms = summary["fused-norm floor"]["median_step_ms"] - bare_ms
    return {
        "workload": asdict(workload) | {"parameters": workload.parameters},
        "steps": steps,
        "variants": summary,
        "isolated_fused_norm_ms": isolated_floor_ms,
        "isolated_fused_norm_fraction_of_bare": isolated_floor_ms / bare_ms,
        "floor_added_ms": floor_added_ms,
        "spikewatch_added_ms": sw_added_ms,
        "spikewatch_added_over_floor": sw_added_ms / floor_added_ms if floor_added_ms > 0 else None,
    }


BUDGET = {"seed_mlp": 1.03, "medium_mlp": 1.05}


def render(results: list[dict], console: Console) -> None:
    for result in results:
        name = result["workload"]["name"]
        table = Table(
            title=f"{name}: {result['workload']['parameters']:,} parameters, batch {result['workload']['batch_size']}, "
            f"{result['steps']} steps",
            title_justify="left",
        )
        columns = ("variant", "median step", "x bare", "min..max", "x bare, fastest blocks", "min..max ", "host peak")
        for column in columns:
            table.add_column(column, justify="left" if column == "variant" else "right")
        for variant, v in result["variants"].items():
            table.add_row(
                variant,
                f"{v['median_step_ms']:.3f} ms",
                f"{v['ratio_median']:.3f}",
                f"{v['ratio_min']:.3f}..{v['ratio_max']:.3f}",
                f"{v['fastest_ratio_median']:.3f}",
                f"{v['fastest_ratio_min']:.3f}..{v['fastest_ratio_max']:.3f}",
                f"{v['host_peak_mb']:.1f} MB",
            )
        console.print(table)
        console.print(
            "x bare: median block time over bare's, median of the repetitions; fastest blocks: the same from each "
            f"run's fastest {BLOCK}-step block (other tenants only add time, so it varies less on a busy machine)."
        )
        variants = result["variants"]
        sw = variants["spikewatch"]["ratio_median"]
        sw_fastest = variants["spikewatch"]["fastest_ratio_median"]
        cheapest = all(sw < variants[k]["ratio_median"] for k in COMPETITORS if k in variants)
        verdict = "meets" if sw <= BUDGET[name] else "MISSES"
        over_floor = result["spikewatch_added_over_floor"]
        acting = variants.get("spikewatch action=skip")
        if acting is not None:
            bare_ms = variants["bare"]["median_step_ms"]
            extra_us = (acting["ratio_median"] - variants["spikewatch"]["ratio_median"]) * bare_ms * 1e3
            console.print(
                f"With action='skip' (no spike, so nothing is dropped): x{acting['ratio_median']:.3f} "
                f"({extra_us:+.0f} us per step over watching only), "
                f"{'meets' if acting['ratio_median'] <= BUDGET[name] else 'MISSES'} the x{BUDGET[name]:.2f} budget."
            )
        console.print(
            f"one fused norm over all gradients, timed alone: {result['isolated_fused_norm_ms']:.3f} ms = "
            f"{result['isolated_fused_norm_fraction_of_bare']:.1%} of a bare step; inside the loop (the "
            f"'fused-norm floor' callback) it adds {result['floor_added_ms']:.3f} ms.\n"
            f"SpikeWatch adds {result['spikewatch_added_ms']:.3f} ms = "
            f"{'n/a' if over_floor is None else f'{over_floor:.2f}x'} the in-loop floor. "
            f"Budget x{BUDGET[name]:.2f}: SpikeWatch x{sw:.3f} {verdict} it "
            f"(fastest blocks: x{sw_fastest:.3f}, {'meets' if sw_fastest <= BUDGET[name] else 'MISSES'}); "
            f"{'cheaper than' if cheapest else 'NOT cheaper than'} every other watcher "
            f"({', '.join(k for k in COMPETITORS if k in variants)}).\n"
        )


def scaling_check(workload: Workload, accelerator: str, skip: int, console: Console) -> dict:
    """The same run at 10x the steps: SpikeWatch's per-step cost and memory must not grow."""
    rows = {}
    for steps in (workload.steps, workload.steps * 10):
        bare = run_once(workload, "bare", steps, skip, accelerator)
        watched = run_once(workload, "spikewatch", steps, skip, accelerator)
        bare_memory = run_once(workload, "bare", steps, skip, accelerator, trace_memory=True)
        watched_memory = run_once(workload, "spikewatch", steps, skip, accelerator, trace_memory=True)
        rows[steps] = {
            "ratio": watched["step_s"] / bare["step_s"],
            "added_ms": (watched["step_s"] - bare["step_s"]) * 1e3,
            "host_peak_mb": watched_memory["host_peak_mb"],
            "bare_host_peak_mb": bare_memory["host_peak_mb"],
        }
    # Trace size: a known number of steps, extrapolated to a million; every row (the default) and thinned.
    trace_steps, mb_per_million = 2000, {}
    for trace_every in (1, 10):
        log_dir = Path(tempfile.mkdtemp(prefix="spikewatch_trace_"))
        watch = SpikeWatch(log_dir=log_dir, print_spikes=False, print_summary=False, trace_every=trace_every)
        trainer = quiet_trainer(trace_steps, accelerator, [watch])
        trainer.fit(WORKLOADS["seed_mlp"].model(), WORKLOADS["seed_mlp"].loader(trace_steps))
        size = os.path.getsize(log_dir / "steps.csv")
        mb_per_million[f"trace_every={trace_every}"] = size / trace_steps * 1e6 / 2**20
    table = Table(title=f"scaling: {workload.name}, 1x and 10x steps", title_justify="left")
    for column in ("steps", "SpikeWatch x bare", "added per step", "host peak (watched)", "host peak (bare)"):
        table.add_column(column, justify="right")
    for steps, row in rows.items():
        table.add_row(
            str(steps),
            f"{row['ratio']:.3f}",
            f"{row['added_ms']:.3f} ms",
            f"{row['host_peak_mb']:.1f} MB",
            f"{row['bare_host_peak_mb']:.1f} MB",
        )
    console.print(table)
    sizes = ", ".join(f"{mb:.1f} MB at {label}" for label, mb in mb_per_million.items())
    console.print(f"steps.csv per million steps: {sizes}\n")
    return {"rows": rows, "trace_mb_per_million_steps": mb_per_million}


def spike_cost(workload: Workload, accelerator: str, console: Console) -> dict:
    """What one spike costs: evidence gathering and the replay that names the samples."""
    from lightning_spikewatch.callback import _SpikeWatchHooks

    timings: list[float] = []
    original = _SpikeWatchHooks._start_spike

    def timed(self, *args, **kwargs):
        start = time.perf_counter()
        original(self, *args, **kwargs)
        timings.append(time.perf_counter() - start)

    class Outliers(TensorDataset):  # every 40th batch carries one sample with blown-up inputs
        def __getitem__(self, i):
            x, y = super().__getitem__(i)
            return (x * 1000.0, y) if i % (40 * workload.batch_size) == 40 * workload.batch_size - 25 else (x, y)

    loader = workload.loader(400)
    data = Outliers(*loader.dataset.tensors)
    _SpikeWatchHooks._start_spike = timed
    try:
        watch = SpikeWatch(log_dir=tempfile.mkdtemp(), print_spikes=False, print_summary=False)
        trainer = quiet_trainer(400, accelerator, [watch])
        trainer.fit(workload.model(), DataLoader(data, batch_size=workload.batch_size, drop_last=True))
    finally:
        _SpikeWatchHooks._start_spike = original
    per_spike_ms = statistics.median(timings) * 1e3 if timings else math.nan
    console.print(
        f"{workload.name}: one spike costs {per_spike_ms:.1f} ms (median of {len(timings)} spikes: evidence, "
        f"Adam state and the replay that names the samples, up to {SpikeWatch().max_replays} training_step calls)"
    )
    return {"per_spike_ms": per_spike_ms, "spikes": len(timings)}


PARTS = {  # where SpikeWatch's per-step time goes; indented names run inside the hook above them
    "on_train_batch_start": "hook: batch start (first step only, then the batch is read where Lightning keeps it)",
    "on_before_backward": "hook: before backward (first step only, then the loss from training_step below)",
    "_see_loss": "the loss as the strategy's training_step returns it: its one item(), quiet steps settled",
    "_settle_quietly": "  quiet step: settled by the bound (step, batch size, learning rate)",
    "_hold_previous_grads": "  lookback: the last settled step's gradients kept by reference (near-spikes only)",
    "on_before_optimizer_step": "hook: before the optimizer step (general steps only)",
    "_lean_general_step": "  general step: warm-up, every n-th step, near-spikes",
    "_catch_up": "    settled steps scored in order, their trace rows",
    "observe_settled": "      detector: robust z of the settled losses",
    "write_settled": "      their steps.csv rows",
    "_read_step": "    fused gradient + input norms and their transfer",
    "_read_batch": "      the batch's input tensors and size",
    "_evaluate_read": "    layer history, detector and trace of this step",
    "observe_quietly": "      detector: robust z of this step's loss",
    "_plan_quiet_steps": "    the quiet bound for the next steps",
    "on_train_batch_end": "hook: spikes completed, loggers (skipped while idle)",
}


def part_costs(workload: Workload, accelerator: str, skip: int, console: Console) -> dict:
    """Time SpikeWatch's hooks and main parts inside a real loop (timers add ~0.1 us per call).

    Inside the loop each part costs several times what it costs timed alone, as the loop's tensor
    work leaves the caches cold for Python; this is where the per-step overhead goes.
    """
    from lightning_spikewatch.callback import _SpikeWatchHooks
    from lightning_spikewatch.detector import SpikeDetector
    from lightning_spikewatch.export import SpikeLog

    spent: dict[str, list[int]] = {name: [] for name in PARTS}
    originals = {}
    for name in PARTS:
        owner = next(cls for cls in (_SpikeWatchHooks, SpikeDetector, SpikeLog) if hasattr(cls, name))
        original = originals[name] = (owner, getattr(owner, name))

        def timed(*args, _name=name, _original=original[1], **kwargs):
            start = time.perf_counter_ns()
            try:
                return _original(*args, **kwargs)
            finally:
                spent[_name].append(time.perf_counter_ns() - start)

        setattr(owner, name, timed)

    class StartCounting(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == skip:
                for calls in spent.values():
                    calls.clear()

    steps = workload.steps * 2
    try:
        watch = SpikeWatch(log_dir=tempfile.mkdtemp(), print_spikes=False, print_summary=False)
        trainer = quiet_trainer(steps, accelerator, [StartCounting(), watch], **workload.trainer_options())
        trainer.fit(workload.model(), workload.loader(steps))
    finally:
        for name, (owner, original) in originals.items():
            setattr(owner, name, original)
    measured = steps - skip
    table = Table(title=f"{workload.name}: where SpikeWatch's time goes, inside the loop", title_justify="left")
    for column in ("part", "us per step", "calls per step", "us per call (median)"):
        table.add_column(column, justify="left" if column == "part" else "right")
    rows = {}
    for name, label in PARTS.items():
        calls = spent[name]
        rows[name] = {
            "us_per_step": sum(calls) / measured / 1e3,
            "calls_per_step": len(calls) / measured,
            "us_per_call_median": statistics.median(calls) / 1e3 if calls else 0.0,
        }
        row = rows[name]
        table.add_row(
            label, f"{row['us_per_step']:.1f}", f"{row['calls_per_step']:.3f}", f"{row['us_per_call_median']:.1f}"
        )
    console.print(table)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--accelerator", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument("--workloads", default="seed_mlp,medium_mlp")
    parser.add_argument("--reps", type=int, default=7, help="interleaved repetitions (at least 5)")
    parser.add_argument("--skip", type=int, default=30, help="steps left out of the timing at the start of each fit")
    parser.add_argument("--scaling", action="store_true", help="also run 10x the steps")
    parser.add_argument("--parts", action="store_true", help="also time SpikeWatch's parts inside the loop")
    parser.add_argument("--parts-only", action="store_true", help="only time SpikeWatch's parts (seconds, not minutes)")
    parser.add_argument("--memory-only", action="store_true", help="only each variant's process peak memory")
    parser.add_argument("--memory-reps", type=int, default=3, help="fresh processes per variant for the peak")
    parser.add_argument("--out", type=Path, help="write the results as JSON")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.memory_child:
        _memory_child(WORKLOADS[args.workloads], args.memory_child, args.steps, args.skip, args.accelerator)
        return
    console = Console(width=None if sys.stdout.isatty() else 120)  # whole table rows in a log file
    if args.memory_only:
        peaks = {
            name: process_peaks(WORKLOADS[name], args.accelerator, args.skip, args.memory_reps, console)
            for name in args.workloads.split(",")
        }
        if args.out:
            args.out.write_text(json.dumps({"accelerator": args.accelerator, "process_peak": peaks}, indent=2))
        return
    if args.parts_only:
        parts = {
            name: part_costs(WORKLOADS[name], args.accelerator, args.skip, console)
            for name in args.workloads.split(",")
        }
        if args.out:
            args.out.write_text(json.dumps({"accelerator": args.accelerator, "parts": parts}, indent=2))
        return
    results = []
    for name in args.workloads.split(","):
        workload = WORKLOADS[name]
        console.print(f"[bold]{name}[/bold]: measuring {len(VARIANTS)} variants x {args.reps} repetitions ...")
        results.append(measure(workload, args.reps, args.skip, args.accelerator))
    render(results, console)
    report = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
        "accelerator": args.accelerator,
        "results": results,
    }
    if torch.cuda.is_available() and args.accelerator == "gpu":
        report["machine"]["gpu"] = torch.cuda.get_device_name()
    report["spike_cost"] = {
        name: spike_cost(WORKLOADS[name], args.accelerator, console) for name in args.workloads.split(",")
    }
    report["process_peak"] = {
        name: process_peaks(WORKLOADS[name], args.accelerator, args.skip, args.memory_reps, console)
        for name in args.workloads.split(",")
    }
    if args.parts:
        report["parts"] = {
            name: part_costs(WORKLOADS[name], args.accelerator, args.skip, console)
            for name in args.workloads.split(",")
        }
    if args.scaling:
        report["scaling"] = scaling_check(WORKLOADS[args.workloads.split(",")[0]], args.accelerator, args.skip, console)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
        console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
