"""Instructions per training step of each variant of the overhead benchmark, counted by callgrind.

A count that does not move with the machine's load: on a busy shared CPU the wall-clock ratios of
``overhead.py`` swing by 10% or more between repetitions, while this gives the same number, to the
instruction, run after run: the ``r``-th process of a variant runs with ``PYTHONHASHSEED=r`` unless
the variable is set. The hash seed decides how dicts and sets are laid out, and that alone moves a
count by a few thousand instructions per step (about 0.1% of a bare step); so does any change to the
code, a docstring included, since it moves the layout too. To rank two versions, compare the means
over a few seeds (``--repeat 3``; the table then gives their standard deviation). It counts
instructions only, not cache misses or memory stalls, so it ranks changes to the Python work of a
step reliably; the budget itself is still judged on time, by ``overhead.py``.

    python benchmarks/instructions.py                                   # seed MLP, every variant
    python benchmarks/instructions.py --variants bare,spikewatch --steps 256 --out instructions.json

Needs valgrind with its header ``valgrind/callgrind.h`` (Debian's ``valgrind`` package) and a C
compiler: a four-line helper library switches counting on at step ``--skip`` and off when training
ends, so imports, set-up and warm-up are not counted. Each variant runs in its own process under
valgrind (about a minute each on the seed MLP), as many at a time as there are CPUs.

``--cache-sim`` also simulates the caches (callgrind ``--cache-sim=yes``, a last level of ``--ll-mb``
MB, default 1, this machine's L2 per core) and adds the last-level misses per step: what costs time
beyond the instructions, such as memory that torch's kernels find cold. About three times slower.
Unlike the instructions, the misses move by a few hundred per step from one process to the next
(where the heap and libraries land differs), so compare them with ``--repeat`` (mean and standard
deviation over that many processes per variant).

    python benchmarks/instructions.py --variants bare,spikewatch --cache-sim --repeat 4
"""

from __future__ import annotations

import argparse
import concurrent.futures
import ctypes
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HELPER_SOURCE = """
#include <valgrind/callgrind.h>
void counting_on(void) { CALLGRIND_ZERO_STATS; CALLGRIND_START_INSTRUMENTATION; }
void counting_off(void) { CALLGRIND_DUMP_STATS; CALLGRIND_STOP_INSTRUMENTATION; }
"""


def build_helper(folder: Path) -> Path:
    source, library = folder / "counting.c", folder / "libcounting.so"
    source.write_text(HELPER_SOURCE)
    subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-o", str(library), str(source)], check=True)
    return library


def child(variant: str, workload_name: str, steps: int, skip: int, helper: str) -> None:
    """Inside valgrind: one fit, counted from step ``skip`` to the end of training."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import lightning.pytorch as pl
    import overhead
    import torch

    torch.set_num_threads(1)  # valgrind runs one thread at a time; one thread keeps the count repeatable
    counting = ctypes.CDLL(helper)

    class Counting(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == skip:
                counting.counting_on()

        def on_train_end(self, trainer, pl_module):
            counting.counting_off()

    workload = overhead.WORKLOADS[workload_name]
    extra = overhead.VARIANTS[variant]()
    if extra is None and variant != "bare":
        sys.exit(3)  # an optional variant that is not installed (ZClip)
    trainer = overhead.quiet_trainer(skip + steps, "cpu", [Counting()] + ([extra] if extra is not None else []))
    trainer.fit(workload.model(), workload.loader(skip + steps))


def count(
    variant: str,
    workload: str,
    steps: int,
    skip: int,
    helper: Path,
    folder: Path,
    ll_mb: float | None = None,
    run: int = 0,
) -> dict[str, int] | None:
    """Events in the counted steps of one variant: instructions (``Ir``) and, with a simulated last
    level of ``ll_mb`` MB, its misses (``ILmr``, ``DLmr``, ``DLmw``); None if it is not installed."""
    out = folder / f"callgrind.{re.sub(r'[^A-Za-z0-9]+', '_', variant)}.{run}"
    cache = [] if ll_mb is None else ["--cache-sim=yes", f"--LL={int(ll_mb * 2**20)},16,64"]
    command = [
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        *cache,
        f"--callgrind-out-file={out}",
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        variant,
        "--workload",
        workload,
        "--steps",
        str(steps),
        "--skip",
        str(skip),
        "--helper",
        str(helper),
    ]
    # A fixed hash seed lays out every dict and set the same way each time: the same code then gives
    # the same count to the instruction. Run r uses seed r, so --repeat averages over layouts.
    env = {**os.environ, "PYTHONHASHSEED": os.environ.get("PYTHONHASHSEED", str(run))}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode == 3:
        return None
    dump = Path(f"{out}.1")  # the first dump: the one counting_off asked for
    if done.returncode != 0 or not dump.exists():
        raise RuntimeError(f"{variant}: valgrind run failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
    text = dump.read_text()
    names = re.search(r"^events:\s*(.+)$", text, re.MULTILINE).group(1).split()
    values = re.search(r"^summary:\s*(.+)$", text, re.MULTILINE).group(1).split()
    return dict(zip(names, map(int, values)))


LAST_LEVEL_MISSES = ("ILmr", "DLmr", "DLmw")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default="seed_mlp")
    parser.add_argument("--variants", help="comma-separated names from overhead.py (default: all)")
    parser.add_argument("--steps", type=int, default=128, help="counted steps (a multiple of the read period, 32)")
    parser.add_argument("--skip", type=int, default=40, help="steps run before counting starts")
    parser.add_argument("--out", type=Path, help="write the counts as JSON")
    parser.add_argument("--cache-sim", action="store_true", help="also count simulated last-level cache misses")
    parser.add_argument("--ll-mb", type=float, default=1.0, help="simulated last-level cache size in MB")
    parser.add_argument(
        "--repeat", type=int, default=1, help="processes per variant, the r-th with hash seed r (means are reported)"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--helper", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.workload, args.steps, args.skip, args.helper)
        return

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from overhead import VARIANTS
    from rich.console import Console
    from rich.table import Table

    names = args.variants.split(",") if args.variants else list(VARIANTS)
    if "bare" not in names:
        names.insert(0, "bare")
    folder = Path(tempfile.mkdtemp(prefix="spikewatch_instructions_"))
    helper = build_helper(folder)
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        ll_mb = args.ll_mb if args.cache_sim else None
        futures = {
            (n, r): pool.submit(count, n, args.workload, args.steps, args.skip, helper, folder, ll_mb, r)
            for r in range(args.repeat)
            for n in names
        }
        runs: dict[str, list[dict[str, float]]] = {}
        for (n, _), future in futures.items():
            total = future.result()
            if total is not None:
                events = {k: v / args.steps for k, v in total.items()}
                if args.cache_sim:
                    events["LL misses"] = sum(events[k] for k in LAST_LEVEL_MISSES)
                runs.setdefault(n, []).append(events)
    per_step = {n: {k: statistics.mean(e[k] for e in each) for k in each[0]} for n, each in runs.items()}
    spread = {
        n: statistics.stdev(e["LL misses"] for e in each) if args.cache_sim and len(each) > 1 else 0.0
        for n, each in runs.items()
    }
    instruction_sd = {n: statistics.stdev(e["Ir"] for e in each) if len(each) > 1 else 0.0 for n, each in runs.items()}
    bare = per_step["bare"]
    cache = f", {args.ll_mb:g} MB last level simulated" if args.cache_sim else ""
    cache += f", mean of {args.repeat} processes each (hash seeds 0..{args.repeat - 1})" if args.repeat > 1 else ""
    table = Table(
        title=f"{args.workload}: per step, callgrind, {args.steps} steps after {args.skip}{cache}",
        title_justify="left",
    )
    columns = ["variant", "instructions per step", "added over bare", "x bare"]
    if args.repeat > 1:
        columns.insert(2, "sd over seeds")
    if args.cache_sim:
        columns += ["LL misses per step", "sd", "added over bare "] + [f"{k} added" for k in LAST_LEVEL_MISSES]
    for column in columns:
        table.add_column(column, justify="left" if column == "variant" else "right")
    rows = {}
    for name, events in per_step.items():
        value, base = events["Ir"], bare["Ir"]
        rows[name] = {"per_step": value, "added": value - base, "ratio": value / base}
        rows[name]["runs"] = [e["Ir"] for e in runs[name]]
        cells = [name, f"{value / 1e3:,.1f} k", f"{(value - base) / 1e3:+,.1f} k", f"{value / base:.4f}"]
        if args.repeat > 1:
            cells.insert(2, f"{instruction_sd[name] / 1e3:,.1f} k")
        if args.cache_sim:
            rows[name]["misses"] = {k: events[k] for k in (*LAST_LEVEL_MISSES, "LL misses")}
            rows[name]["misses_sd"] = spread[name]
            rows[name]["misses_runs"] = [e["LL misses"] for e in runs[name]]
            cells += [f"{events['LL misses']:,.0f}", f"{spread[name]:,.0f}"]
            cells += [f"{events['LL misses'] - bare['LL misses']:+,.0f}"]
            cells += [f"{events[k] - bare[k]:+,.0f}" for k in LAST_LEVEL_MISSES]
        table.add_row(*cells)
    console = Console(width=None if sys.stdout.isatty() else 160)
    console.print(table)
    if args.out:
        report = {"workload": args.workload, "steps": args.steps, "skip": args.skip, "repeat": args.repeat}
        report["variants"] = rows
        if args.cache_sim:
            report["last_level_mb"] = args.ll_mb
        args.out.write_text(json.dumps(report, indent=2))
        console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
