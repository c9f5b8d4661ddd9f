"""What a watcher costs per step, timed against itself switched off within one fit.

One fit per variant. Its steps are cut into blocks of 32 (one CPU read period), taken in pairs: in
one block of each pair the watcher is on, in the other it is off (Lightning then skips all of its
per-step hooks, as for a Trainer without it), in a random order per pair. The result is the median
over pairs of the ratio on/off (with its interquartile range and standard error). The two blocks of
a pair are adjacent steps of one process, one model and one allocator, so the machine's drift,
which reaches tens of percent within seconds on a shared machine, cancels, and no second fit
competes for the caches.

Works for small and large models alike: on the CPU SpikeWatch keeps the last step's gradients
alive into the next step (the step-before lookback) but lets them go before that step's backward
unless its loss may be a spike, so on and off blocks hold the same number of gradient sets and the
allocator's heap does not move between them.

    python benchmarks/blocks.py                                   # seed MLP: spikewatch and empty callback
    python benchmarks/blocks.py --variants "spikewatch,ZClip" --also-every 32 --pairs 1200
    python benchmarks/blocks.py --workload medium_mlp --variants "spikewatch,fused-norm floor" --pairs 200

``--switch`` picks what the off blocks leave out, to time one part of SpikeWatch within its fit:
``lookback`` its step-before lookback alone; ``floor`` SpikeWatch against the least a loss watcher
built as a callback does (one hook call at backward and one ``item()``); ``period`` reads every 32nd
step against every 64th (with ``--block 64``); ``trace`` a row for every batch against
``trace_every=10``; ``dispatch`` the loss read from the strategy's ``training_step`` against Lightning's
call of the ``on_before_backward`` hook. ``--aa`` switches nothing (both blocks of a pair on): the
noise floor of the method, which should print x1.000 within its error.

``--neighbour STEPS`` runs that many steps of another model (plain torch, untimed) before each block
of every other pair, as another fit's turn runs between two blocks of ``interleaved.py``, and
reports both kinds of pair: whether a hand-over, with its caches used by other work, costs the
watcher more.

A watcher switched off keeps its state; it only stops seeing steps. For SpikeWatch the references it
holds between steps (the last loss, the gradients kept for the step-before lookback) are dropped
when it is switched off, so an off block holds nothing more than a bare Trainer does. Each on block
holds exactly one of SpikeWatch's periodic CPU reads (every 32nd step), so their cost is charged to
the steps in between. A median ignores what happens in fewer than half the blocks (the trace flush
every 512 steps, epoch ends); the ratio of mean block times is printed beside it to show them.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import math
import random
import statistics
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from rich.console import Console
from rich.table import Table

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import overhead  # noqa: E402  (the workloads, variants and Trainer settings are shared)

BLOCK = overhead.BLOCK
BUDGET = overhead.BUDGET
STEP_HOOKS = (
    "on_train_batch_start",
    "on_before_backward",
    "on_after_backward",
    "on_before_optimizer_step",
    "on_before_zero_grad",
    "on_train_batch_end",
)
# SpikeWatch's references across steps
HELD_BETWEEN_STEPS = ("_held_loss", "_held_host_loss", "_held_grads", "_lookback", "_settled_batch")


def _spikewatch_only(callback: pl.Callback, switch: str, attribute: str) -> pl.Callback:
    """The callback, if it is SpikeWatch (it has ``attribute``): the part switches reach into its state."""
    if not hasattr(callback, attribute):
        raise SystemExit(f"--switch {switch} needs a SpikeWatch variant")
    return callback


class Switch:
    """Turns a callback's per-step hooks off (``None`` on the instance: Lightning skips a hook that is
    not callable) and back on exactly as they were, including hooks the callback skips itself. For
    SpikeWatch its wrapper of the strategy's ``training_step``, which reads the loss, is taken off too."""

    def __init__(self, callback: pl.Callback) -> None:
        self.callback = callback
        self._saved: dict[str, object] | None = None
        self._strategy: object | None = None

    def off(self) -> None:
        if self._saved is not None:
            return
        state = vars(self.callback)
        self._saved = {name: state[name] for name in STEP_HOOKS if name in state}
        for name in STEP_HOOKS:
            setattr(self.callback, name, None)
        for name in HELD_BETWEEN_STEPS:
            if name in state:
                state[name] = None
        self._strategy = state.get("_wrapped_strategy")
        if self._strategy is not None:
            self.callback._detach_from_strategy()

    def on(self) -> None:
        if self._saved is None:
            return
        state = vars(self.callback)
        for name in STEP_HOOKS:
            state.pop(name, None)
        state.update(self._saved)
        self._saved = None
        if self._strategy is not None:
            self.callback._attach_to_strategy(self._strategy)


class LookbackSwitch:
    """Turns only SpikeWatch's step-before lookback off and on (the gradients kept by reference on
    quiet CPU steps), to time that one part; the rest of SpikeWatch runs in both blocks."""

    def __init__(self, callback: pl.Callback) -> None:
        self.callback = _spikewatch_only(callback, "lookback", "_looks_back")

    def off(self) -> None:
        watch = self.callback
        watch._looks_back = False
        watch._held_grads = watch._lookback = watch._settled_batch = None

    def on(self) -> None:
        self.callback._looks_back = True


class FloorSwitch(Switch):
    """Off: the watcher's step hooks replaced by the least a loss watcher built as a callback does
    (one hook call at backward, reading the loss with one ``item()``). For a watcher that is reached
    through its hooks, on against off is its own work, without Lightning's call of that one hook;
    SpikeWatch reads the loss from the strategy's ``training_step`` instead of a hook, so for it on
    against off is its whole cost less that of such a minimal watcher."""

    def off(self) -> None:
        if self._saved is not None:
            return
        super().off()

        def read_loss(trainer, pl_module, loss):
            loss.item()  # the one transfer to the host

        self.callback.on_before_backward = read_loss


class PeriodSwitch:
    """SpikeWatch reading gradient and input norms every 32nd step (on) or every 64th (off): what the
    periodic read costs. Use with ``--block 64``. (Much rarer reads do not work: the quiet bound
    needs fewer pushes than half the loss window, so longer stretches would not be settled.)"""

    SLOW = 2  # the off blocks read this many times less often

    def __init__(self, callback: pl.Callback) -> None:
        self.callback = _spikewatch_only(callback, "period", "_every")
        self.every = overhead.CPU_BASELINE_EVERY

    def off(self) -> None:
        self.callback._every = self.every * self.SLOW

    def on(self) -> None:
        watch = self.callback
        watch._every = self.every
        # Steps planned under the longer period: settle no more of them than this period allows (the
        # bound planned for more steps holds for fewer), so the next read comes when it is due.
        watch._quiet_left = min(watch._quiet_left, -watch.steps_watched % self.every)


class TraceSwitch:
    """SpikeWatch writing every batch to ``steps.csv`` (on, the default) or a thinned trace (off:
    ``trace_every=10``, which still keeps the read steps and spikes): what the full trace costs."""

    THINNED = 10

    def __init__(self, callback: pl.Callback) -> None:
        self.callback = _spikewatch_only(callback, "trace", "trace_every")
        self.thinned = self.THINNED

    def off(self) -> None:
        self.callback.trace_every = self.thinned

    def on(self) -> None:
        self.callback.trace_every = 1


class DispatchSwitch:
    """SpikeWatch reading the loss from the strategy's ``training_step`` (on, the default) or through
    Lightning's call of its ``on_before_backward`` hook (off): what that hook dispatch would cost."""

    def __init__(self, callback: pl.Callback) -> None:
        self.callback = _spikewatch_only(callback, "dispatch", "_wrapped_strategy")
        self.strategy: object | None = None

    def off(self) -> None:
        watch = self.callback
        if watch._wrapped_strategy is None:
            return
        self.strategy = watch._wrapped_strategy
        watch._detach_from_strategy()
        vars(watch).pop("on_before_backward", None)  # the class's hook, called by Lightning

    def on(self) -> None:
        if self.strategy is None:
            return
        self.callback.on_before_backward = None
        self.callback._attach_to_strategy(self.strategy)
        self.strategy = None


class Neighbour:
    """Another model's training steps (plain torch, untimed), run before each block of every other
    pair, as another fit's turn runs between two of a fit's blocks in ``interleaved.py``: those
    blocks start on caches that other work has just used. The pairs in between follow each other as
    the steps of one training run do, so the two kinds of pair, taken in the same fit, show what a
    hand-over costs the watcher."""

    def __init__(self, workload: overhead.Workload, steps: int) -> None:
        self.steps = steps
        self.model = workload.model().net
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        self.batches = [(x, y) for x, y in workload.loader(64)]

    def run(self) -> None:
        for index in range(self.steps):
            x, y = self.batches[index % len(self.batches)]
            loss = torch.nn.functional.cross_entropy(self.model(x), y)
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            loss.item()


SWITCHES = {
    "hooks": Switch,
    "trace": TraceSwitch,
    "lookback": LookbackSwitch,
    "floor": FloorSwitch,
    "period": PeriodSwitch,
    "dispatch": DispatchSwitch,
}


class PairedBlocks(pl.Callback):
    """Times blocks of steps and switches the watcher at each block start, in pairs of on and off.

    Listed before the watcher, so a block starts before any of the watcher's hooks of that step."""

    def __init__(
        self,
        switch: Any,
        skip: int,
        device: torch.device,
        block: int = BLOCK,
        seed: int = 0,
        neighbour: Neighbour | None = None,
    ) -> None:
        self.switch, self.skip, self.device, self.block, self.neighbour = switch, skip, device, block, neighbour
        self.pairs: list[tuple[float, float]] = []  # (on, off) block seconds
        self.neighboured: list[bool] = []  # per pair: did the neighbour run before its blocks
        self._neighbour_now = False
        self._random = random.Random(seed)
        self._plan: list[bool] = []
        self._pair: dict[bool, float] = {}
        self._state: bool | None = None
        self._start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        step = trainer.global_step
        if step < self.skip or (step - self.skip) % self.block:
            return
        now = overhead.synced_now(self.device)
        if self._state is not None:
            self._pair[self._state] = now - self._start
        if not self._plan:
            if len(self._pair) == 2:
                self.pairs.append((self._pair[True], self._pair[False]))
                self.neighboured.append(self._neighbour_now)
            self._pair = {}
            self._plan = self._random.sample([True, False], 2)
            self._neighbour_now = self.neighbour is not None and not self._neighbour_now
        self._state = self._plan.pop()
        if self._neighbour_now:
            self.neighbour.run()
        if self.switch is not None:
            (self.switch.on if self._state else self.switch.off)()
        self._start = overhead.synced_now(self.device)


def run_pairs(
    workload: overhead.Workload,
    variant: str,
    pairs: int,
    skip: int,
    accelerator: str,
    aa: bool = False,
    block: int = BLOCK,
    switch: str = "hooks",
    neighbour_steps: int = 0,
) -> tuple[list[tuple[float, float]], list[bool]]:
    """One fit of ``variant``, switched on and off block by block: the (on, off) block times, and
    per pair whether a neighbour's steps ran before its blocks."""
    device = torch.device("cuda" if accelerator == "gpu" else "cpu")
    steps = skip + block * (2 * pairs + 1)  # the last block is not timed: train end is not a step
    watcher = overhead.VARIANTS[variant]()
    if watcher is None:
        raise SystemExit(f"{variant!r} is not available here (is its package installed?)")
    neighbour = Neighbour(workload, neighbour_steps) if neighbour_steps else None
    clock = PairedBlocks(None if aa else SWITCHES[switch](watcher), skip, device, block, neighbour=neighbour)
    gc.collect()
    trainer = overhead.quiet_trainer(steps, accelerator, [clock, watcher], **workload.trainer_options())
    trainer.fit(workload.model(), workload.loader(steps))
    return clock.pairs, clock.neighboured


def summarise(pairs: list[tuple[float, float]], block: int = BLOCK) -> dict:
    ratios = [on / off for on, off in pairs]
    quartiles = statistics.quantiles(ratios, n=4)
    # Standard error of a median: about 1.25 x that of a mean for a bell-shaped spread.
    error = 1.2533 * statistics.stdev(ratios) / math.sqrt(len(ratios))
    return {
        "pairs": len(ratios),
        "on_step_ms": statistics.median(on for on, _ in pairs) / block * 1e3,
        "off_step_ms": statistics.median(off for _, off in pairs) / block * 1e3,
        "ratio_median": statistics.median(ratios),
        "ratio_standard_error": error,
        "ratio_quartiles": [quartiles[0], quartiles[2]],
        "ratio_of_means": statistics.fmean(on for on, _ in pairs) / statistics.fmean(off for _, off in pairs),
        # A cost that grows over the fit (state that grows, or a shortcut that stops applying as the
        # loss curve changes) shows as a later third dearer than the first.
        "ratio_median_by_third": [
            statistics.median(ratios[i * len(ratios) // 3 : (i + 1) * len(ratios) // 3]) for i in range(3)
        ],
    }


def render(
    workload: overhead.Workload, results: dict[str, dict], console: Console, block: int = BLOCK, aa: bool = False
) -> None:
    any_result = next(iter(results.values()))
    table = Table(
        title=f"{workload.name}: {workload.parameters:,} parameters, batch {workload.batch_size}, "
        f"{any_result['pairs']} pairs of {block}-step blocks, each variant on against itself off",
        title_justify="left",
    )
    for column in ("variant", "step off", "step on", "x off (median of pairs)", "std. error", "IQR", "x off (means)"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    for name, r in results.items():
        low, high = r["ratio_quartiles"]
        table.add_row(
            name,
            f"{r['off_step_ms']:.3f} ms",
            f"{r['on_step_ms']:.3f} ms",
            f"{r['ratio_median']:.4f}",
            f"±{r['ratio_standard_error']:.4f}",
            f"{low:.3f}..{high:.3f}",
            f"{r['ratio_of_means']:.4f}",
        )
    console.print(table)
    for name, r in results.items():
        thirds = ", ".join(f"x{ratio:.4f}" for ratio in r["ratio_median_by_third"])
        console.print(f"{name}: median of pairs in each third of the fit, first to last: {thirds}")
    spikewatch = next((r for name, r in results.items() if name.startswith("spikewatch")), None)
    budget = BUDGET.get(workload.name)
    if spikewatch is not None and budget is not None and not aa:
        ratio, error = spikewatch["ratio_median"], spikewatch["ratio_standard_error"]
        if ratio + 2 * error <= budget:
            verdict = "meets it"
        else:
            verdict = "misses it" if ratio - 2 * error > budget else "is within error of it"
        console.print(f"Budget x{budget:.2f}: SpikeWatch x{ratio:.4f} ± {error:.4f} {verdict} (two standard errors).")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--accelerator", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument("--workload", default="seed_mlp", choices=sorted(overhead.WORKLOADS))
    parser.add_argument("--variants", default="spikewatch,empty callback", help="comma-separated; one fit each")
    parser.add_argument("--pairs", type=int, default=1250, help="pairs of on/off blocks per variant")
    parser.add_argument("--block", type=int, default=BLOCK, help="steps per block (a multiple of the read period)")
    parser.add_argument("--skip", type=int, default=200, help="steps before the first block (warm-up)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (see interleaved.py)")
    parser.add_argument(
        "--also-every", type=int, action="append", default=[], help="add SpikeWatch with this baseline_every"
    )
    parser.add_argument(
        "--switch",
        default="hooks",
        choices=sorted(SWITCHES),
        help="what is off: all step hooks; the lookback; all but the least a loss watcher does (floor); "
        "reads every 32nd step against every 64th (period); every row against trace_every=10 (trace); "
        "the loss read from training_step against the on_before_backward hook (dispatch)",
    )
    parser.add_argument("--aa", action="store_true", help="switch nothing: the method's noise floor")
    parser.add_argument(
        "--neighbour",
        type=int,
        default=0,
        metavar="STEPS",
        help="before each block of every other pair, run this many steps of another model (plain torch, "
        "untimed), as another fit's turn in interleaved.py; both kinds of pair are reported",
    )
    parser.add_argument("--out", type=Path, help="write the results as JSON")
    args = parser.parse_args()
    if args.accelerator == "cpu":
        torch.set_num_threads(args.threads)
    if args.switch == "period" and args.block % (BLOCK * PeriodSwitch.SLOW):
        raise SystemExit(f"--switch period needs --block a multiple of {BLOCK * PeriodSwitch.SLOW}")
    workload = overhead.WORKLOADS[args.workload]
    names = [name.strip() for name in args.variants.split(",") if name.strip()]
    for every in args.also_every:  # e.g. the CPU read period SpikeWatch had before, for comparison
        name = f"spikewatch baseline_every={every}"
        overhead.VARIANTS[name] = functools.partial(overhead.spikewatch_reading_every, every)
        names.append(name)
    unknown = [name for name in names if name not in overhead.VARIANTS or name == "bare"]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {[n for n in overhead.VARIANTS if n != 'bare']}")
    console = Console(width=140)
    results: dict[str, dict] = {}
    for index, name in enumerate(names):
        label = name if name not in results else f"{name} ({index + 1})"
        pairs, neighboured = run_pairs(
            workload, name, args.pairs, args.skip, args.accelerator, args.aa, args.block, args.switch, args.neighbour
        )
        suffix = " (A/A)" if args.aa else "" if args.switch == "hooks" else f" ({args.switch} only)"
        if not args.neighbour:
            results[label + suffix] = summarise(pairs, args.block)
            continue
        for after, kind in ((False, "steps in a row"), (True, f"after {args.neighbour} neighbour steps")):
            chosen = [pair for pair, flag in zip(pairs, neighboured) if flag is after]
            results[f"{label}{suffix}, {kind}"] = summarise(chosen, args.block)
    render(workload, results, console, args.block, args.aa or args.switch != "hooks")
    if args.out:
        report = {
            "workload": workload.name,
            "accelerator": args.accelerator,
            "threads": torch.get_num_threads(),
            "block_steps": args.block,
            "aa": args.aa,
            "switch": args.switch,
            "neighbour_steps": args.neighbour,
            "results": results,
        }
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
