"""What SpikeWatch costs per step, with machine noise cancelled block by block.

On a shared machine the step time drifts by tens of percent within seconds, far more than the few
percent being measured, and whole runs taken one after another (``overhead.py``) feel that drift.
Here every variant's fit runs at once, one thread each, but only one of them steps at a time: each
runs one block of 32 steps (one read period), then hands the turn to the next, in a fresh random order every round.
A variant's k-th block and bare's k-th block are then a few tens of milliseconds apart, and the
ratio of the two sees nearly the same machine. The result is, per variant, the median of those
per-round ratios (with its interquartile range) over hundreds of rounds.

    python benchmarks/interleaved.py                           # seed MLP, 300 rounds of 32 steps
    python benchmarks/interleaved.py --against 00a80aa         # also an earlier commit's SpikeWatch
    python benchmarks/interleaved.py --variants spikewatch --with-off  # its own work and its presence, apart
    python benchmarks/interleaved.py --variants spikewatch --fits 3   # three fits of each, timed by their mean
    python benchmarks/interleaved.py --accelerator gpu --out interleaved_gpu.json

On the CPU torch runs one thread by default here (``--threads``): with two, every operation waits
for both cores, and on a shared machine the other core is often busy, which made the per-round
ratios about twice as spread. SpikeWatch's own work is single-threaded Python, and one thread makes
the bare step faster, not slower, so its ratio is not flattered by this.

Meant for models whose gradients are small (the seed MLP). With tens of MB of gradients per fit
(the medium MLP), fits in several threads disturb each other's memory allocation: bare timed
against a second bare fit came out 6% apart there. Time such models with ``overhead.py``.

``--fits K`` runs K fits of each variant, all in the same turns, and times each variant by the mean
of its fits' k-th blocks. A fit may carry an offset of its own for its whole length (where its
model, heap and code happen to land), which more rounds would not average out; two fits of the same
code have come out 0.3 point apart, and in session 7's three-fit run within 0.2. The issue's design
repeats each variant; K fits do that here, and each variant's later fits are printed against its
first, so any such offset shows in every run.

Each block holds exactly one of SpikeWatch's periodic CPU reads (every 32nd step), so its cost is
charged to the steps in between. A median ignores what happens in fewer than half the blocks: the
trace flush every 512 steps and epoch ends; the mean ratio is printed beside it to show them.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import random
import statistics
import sys
import tempfile
import threading
from pathlib import Path

import lightning.pytorch as pl
import torch
from rich.console import Console
from rich.table import Table

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import overhead  # noqa: E402  (the workloads, variants and Trainer settings are shared)
from blocks import Switch  # noqa: E402
from blocks import summarise as summarise_pairs  # noqa: E402

from lightning_spikewatch import SpikeWatch  # noqa: E402

BLOCK = overhead.BLOCK
BUDGET = overhead.BUDGET


class Baton:
    """Whose turn it is to step. Every fit passes the turn on once per block, so round k is every
    fit's k-th block; the order within a round is shuffled, so no variant always follows another."""

    def __init__(self, names: list[str], seed: int = 0) -> None:
        self._rng = random.Random(seed)
        self._active = list(names)
        self._queue: list[str] = []
        self._turn: str | None = None
        self._changed = threading.Condition()
        with self._changed:
            self._advance()

    def _advance(self) -> None:
        self._queue = [name for name in self._queue if name in self._active]
        if not self._queue and self._active:
            self._queue = self._rng.sample(self._active, len(self._active))
        self._turn = self._queue.pop(0) if self._queue else None
        self._changed.notify_all()

    def wait(self, name: str) -> None:
        with self._changed:
            self._changed.wait_for(lambda: self._turn == name)

    def pass_on(self, name: str, finished: bool = False) -> None:
        with self._changed:
            if finished and name in self._active:
                self._active.remove(name)
            if self._turn == name:
                self._advance()


class BlockClock(pl.Callback):
    """Times whole blocks of steps between two turns; the hand-over itself is not timed."""

    def __init__(self, name: str, baton: Baton, skip: int, device: torch.device) -> None:
        self.name, self.baton, self.skip, self.device = name, baton, skip, device
        self.blocks: list[float] = []
        self._start: float | None = None

    def on_train_start(self, trainer, pl_module):
        self.baton.wait(self.name)  # set-up runs side by side; the steps only in turn

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        step = trainer.global_step
        if step < self.skip or (step - self.skip) % BLOCK:
            return
        now = overhead.synced_now(self.device)
        if self._start is not None:
            self.blocks.append(now - self._start)
        self.baton.pass_on(self.name)
        self.baton.wait(self.name)
        self._start = overhead.synced_now(self.device)


def earlier_spikewatch(revision: str) -> type:
    """SpikeWatch as it was at ``revision`` (imported beside this tree's under another name)."""
    import compare

    return importlib.import_module(compare.earlier_package(revision)).SpikeWatch


class SwitchedOffWatch(SpikeWatch):
    """SpikeWatch set up as usual at train start, then switched off for the whole fit (as in an off
    block of ``blocks.py``): in the Trainer with its state built, but doing none of its per-step work.
    Timed in turns against SpikeWatch, it leaves SpikeWatch's own work per step; against bare, what
    SpikeWatch's mere presence costs, together with the difference any two fits show."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        Switch(self).off()


SWITCHED_OFF = "spikewatch switched off"


def watcher(cls: type):
    return lambda: cls(log_dir=tempfile.mkdtemp(prefix="spikewatch_bench_"), print_spikes=False, print_summary=False)


def run_interleaved(
    workload: overhead.Workload, variants: dict, rounds: int, skip: int, accelerator: str
) -> dict[str, list[float]]:
    """Fit every variant at once, in turns; returns each variant's block times, round by round."""
    device = torch.device("cuda" if accelerator == "gpu" else "cpu")
    steps = skip + BLOCK * (rounds + 1)  # the last block is not timed: train end is not a step
    baton = Baton(list(variants))
    clocks = {name: BlockClock(name, baton, skip, device) for name in variants}
    failures: dict[str, BaseException] = {}

    def fit(name: str) -> None:
        try:
            extra = variants[name]()
            callbacks = [clocks[name]] + ([extra] if extra else [])
            trainer = overhead.quiet_trainer(steps, accelerator, callbacks, **workload.trainer_options())
            trainer.fit(workload.model(), workload.loader(steps))
        except BaseException as err:  # noqa: BLE001 - reported below; the other fits must go on
            failures[name] = err
        finally:
            baton.pass_on(name, finished=True)

    gc.collect()
    threads = [threading.Thread(target=fit, args=(name,), name=name) for name in variants]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        name, err = next(iter(failures.items()))
        raise RuntimeError(f"the {name!r} fit failed") from err
    return {name: clock.blocks for name, clock in clocks.items()}


def fit_names(name: str, fits: int) -> list[str]:
    """The names of a variant's fits: its own for the first, then ``name #2`` ... ``name #K``."""
    return [name] + [f"{name} #{number}" for number in range(2, fits + 1)]


def pool_fits(blocks: dict[str, list[float]], variants: list[str], fits: int) -> dict[str, list[float]]:
    """Per variant and round, the mean of its fits' block times (rounds all fits reached)."""
    pooled = {}
    for name in variants:
        per_fit = [blocks[fit] for fit in fit_names(name, fits)]
        pooled[name] = [sum(times) / len(times) for times in zip(*per_fit)]
    return pooled


def between_fits(blocks: dict[str, list[float]], variants: list[str], fits: int) -> dict[str, list[dict]]:
    """Per variant, each later fit against its first (median of per-round ratios, standard error):
    the offset a single fit carries, which is the same code timed twice."""
    spread = {}
    for name in variants:
        first, *later = fit_names(name, fits)
        spread[name] = []
        for fit in later:
            paired = summarise_pairs(list(zip(blocks[fit], blocks[first])))
            spread[name].append(
                {"fit": fit, "ratio_median": paired["ratio_median"], "standard_error": paired["ratio_standard_error"]}
            )
    return {name: rows for name, rows in spread.items() if rows}


def render_between_fits(spread: dict[str, list[dict]], console: Console) -> None:
    for name, rows in spread.items():
        ratios = ", ".join(f"x{row['ratio_median']:.4f} ± {row['standard_error']:.4f}" for row in rows)
        console.print(f"{name}: later fits against its first (the same code twice): {ratios}")


def summarise(blocks: dict[str, list[float]]) -> dict[str, dict]:
    bare = blocks["bare"]
    summary = {}
    for name, times in blocks.items():
        ratios = [t / b for t, b in zip(times, bare)]
        q1, median, q3 = statistics.quantiles(ratios, n=4)
        summary[name] = {
            "median_step_ms": statistics.median(times) / BLOCK * 1e3,
            "ratio_median": statistics.median(ratios),
            "ratio_q1": q1,
            "ratio_q3": q3,
            "ratio_of_means": sum(times) / sum(bare),
            "rounds": len(ratios),
        }
    return summary


def render(workload: overhead.Workload, summary: dict[str, dict], rounds: int, console: Console, fits: int = 1) -> None:
    table = Table(
        title=f"{workload.name}: {workload.parameters:,} parameters, batch {workload.batch_size}, "
        f"{rounds} rounds of {BLOCK} steps, variants in turn" + (f", {fits} fits of each" if fits > 1 else ""),
        title_justify="left",
    )
    for column in ("variant", "median step", "x bare (median of rounds)", "interquartile range", "x bare (means)"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    for name, row in summary.items():
        table.add_row(
            name,
            f"{row['median_step_ms']:.3f} ms",
            f"{row['ratio_median']:.3f}",
            f"{row['ratio_q1']:.3f}..{row['ratio_q3']:.3f}",
            f"{row['ratio_of_means']:.3f}",
        )
    console.print(table)
    watch = summary.get("spikewatch")
    if watch is None:
        return
    budget = BUDGET.get(workload.name)
    if budget is not None:
        verdict = "meets it" if watch["ratio_median"] <= budget else "MISSES it"
        console.print(f"Budget x{budget:.2f}: SpikeWatch x{watch['ratio_median']:.3f} {verdict}.")
    others = [n for n in overhead.COMPETITORS if n in summary]
    if others:
        cheaper = all(watch["ratio_median"] < summary[n]["ratio_median"] for n in others)
        console.print(f"Cheaper than every other watcher ({', '.join(others)}): {'yes' if cheaper else 'NO'}.")


def split_by_presence(blocks: dict[str, list[float]]) -> dict[str, dict]:
    """With a switched-off SpikeWatch among the fits: the median per-round ratio (with its standard
    error) of SpikeWatch to it, and of it to bare."""
    if SWITCHED_OFF not in blocks or "spikewatch" not in blocks:
        return {}
    split = {}
    for name, (top, bottom) in {"own work": ("spikewatch", SWITCHED_OFF), "presence": (SWITCHED_OFF, "bare")}.items():
        paired = summarise_pairs(list(zip(blocks[top], blocks[bottom])))  # as blocks.py's on/off pairs
        split[name] = {
            "of": top,
            "against": bottom,
            "ratio_median": paired["ratio_median"],
            "standard_error": paired["ratio_standard_error"],
        }
    return split


def render_split(split: dict[str, dict], console: Console) -> None:
    own, presence = split["own work"], split["presence"]
    console.print(
        f"SpikeWatch against itself switched off (its own work per step, as blocks.py measures it): "
        f"x{own['ratio_median']:.4f} ± {own['standard_error']:.4f}; switched off against bare (its presence, "
        f"and the difference between any two fits): x{presence['ratio_median']:.4f} ± {presence['standard_error']:.4f}."
    )


DEFAULT_VARIANTS = "bare,empty callback,fused-norm floor,spikewatch,grad_norm logging,SpikeDetection,ZClip"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--accelerator", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument("--workload", default="seed_mlp", choices=sorted(overhead.WORKLOADS))
    parser.add_argument("--variants", default=DEFAULT_VARIANTS, help="comma-separated names from overhead.py")
    parser.add_argument("--rounds", type=int, default=300, help="timed blocks per variant")
    parser.add_argument(
        "--skip", type=int, default=40, help="warm-up steps of each fit, not timed (the read then falls mid-block)"
    )
    parser.add_argument("--against", help="also time SpikeWatch at this git revision")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1: a busy second core then stalls no step)"
    )
    parser.add_argument(
        "--with-off",
        action="store_true",
        help=f"also fit {SWITCHED_OFF!r}: splits SpikeWatch's ratio into its own work and its presence",
    )
    parser.add_argument(
        "--fits", type=int, default=1, help="fits of each variant, all in the same turns; each is timed by their mean"
    )
    parser.add_argument("--out", type=Path, help="write the results as JSON")
    args = parser.parse_args()
    names = [name.strip() for name in args.variants.split(",") if name.strip()]
    unknown = [name for name in names if name not in overhead.VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {', '.join(overhead.VARIANTS)}")
    if args.rounds < 8:
        parser.error("--rounds must be at least 8")
    if args.fits < 1:
        parser.error("--fits must be at least 1")
    variants = {"bare": overhead.VARIANTS["bare"]}
    for name in names:
        if name != "bare" and overhead.VARIANTS[name]() is not None:  # ZClip only when installed
            variants[name] = overhead.VARIANTS[name]
    if args.with_off:
        variants[SWITCHED_OFF] = watcher(SwitchedOffWatch)
    if args.against:
        variants[f"spikewatch at {args.against}"] = watcher(earlier_spikewatch(args.against))
    torch.set_num_threads(args.threads)
    workload = overhead.WORKLOADS[args.workload]
    console = Console(width=None if sys.stdout.isatty() else 120)
    fits = {fit: make for name, make in variants.items() for fit in fit_names(name, args.fits)}
    console.print(f"[bold]{workload.name}[/bold]: {len(fits)} fits in turn, {args.rounds} rounds ...")
    blocks = run_interleaved(workload, fits, args.rounds, args.skip, args.accelerator)
    spread = between_fits(blocks, list(variants), args.fits)
    pooled = pool_fits(blocks, list(variants), args.fits)
    summary = summarise(pooled)
    render(workload, summary, args.rounds, console, args.fits)
    if spread:
        render_between_fits(spread, console)
    split = split_by_presence(pooled)
    if split:
        render_split(split, console)
    if args.out:
        report = {
            "workload": workload.name,
            "accelerator": args.accelerator,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "rounds": args.rounds,
            "fits": args.fits,
            "block": BLOCK,
            "variants": summary,
            "split": split,
            "between_fits": spread,
            "blocks_s": blocks,
        }
        args.out.write_text(json.dumps(report, indent=2))
        console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
