"""Time this working tree's SpikeWatch against an earlier commit's, paired, in one process.

    python benchmarks/compare.py --against HEAD~3             # seed MLP, 16 repetitions x 960 steps
    python benchmarks/compare.py --against 00a80aa --reps 24 --out compare.json

The earlier package is taken with ``git archive`` into a temporary folder under another name, so
both import side by side. Each repetition runs bare, an empty callback, the earlier SpikeWatch and
this one, in alternating order, and divides each run's fastest 16-step block mean by bare's: on a
shared machine other tenants only add time, so these ratios vary several times less than the
median's (``overhead.py`` reports both). The result is the median ratio of each variant with its
interquartile range.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path

HERE = Path(__file__).resolve().parent


def earlier_package(revision: str) -> str:
    """Import the package as it was at ``revision``, renamed; returns its module name."""
    archive = subprocess.run(
        ["git", "archive", revision, "lightning_spikewatch"], cwd=HERE.parent, capture_output=True, check=True
    ).stdout
    folder = Path(tempfile.mkdtemp(prefix="spikewatch_compare_"))
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        try:
            tar.extractall(folder, filter="data")
        except TypeError:  # Pythons before the extraction filters (our own archive: trusted)
            tar.extractall(folder)
    name = "lightning_spikewatch_" + re.sub(r"\W", "_", revision)
    (folder / "lightning_spikewatch").rename(folder / name)
    for source in (folder / name).glob("*.py"):
        source.write_text(re.sub(r"\blightning_spikewatch\b", name, source.read_text()))
    sys.path.insert(0, str(folder))
    return name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", required=True, help="the earlier commit (any git revision)")
    parser.add_argument("--workload", default="seed_mlp")
    parser.add_argument("--reps", type=int, default=16)
    parser.add_argument("--steps", type=int, default=960)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    sys.path.insert(0, str(HERE))
    import overhead
    import torch
    from rich.console import Console
    from rich.table import Table

    from lightning_spikewatch import SpikeWatch

    earlier = importlib.import_module(earlier_package(args.against)).SpikeWatch

    def watcher(cls):
        quiet = {"print_spikes": False, "print_summary": False}
        return lambda: cls(log_dir=tempfile.mkdtemp(prefix="spikewatch_bench_"), **quiet)

    variants = {
        "bare": lambda: None,
        "empty callback": overhead.VARIANTS["empty callback"],
        f"spikewatch at {args.against}": watcher(earlier),
        "spikewatch (this tree)": watcher(SpikeWatch),
    }
    workload = overhead.WORKLOADS[args.workload]

    def fastest_block(name: str) -> float:
        extra = variants[name]()
        clock = overhead.StepClock(30, torch.device("cpu"))
        trainer = overhead.quiet_trainer(args.steps, "cpu", [clock] + ([extra] if extra is not None else []))
        gc.collect()
        trainer.fit(workload.model(), workload.loader(args.steps))
        return clock.fastest_block_seconds

    names = list(variants)
    for name in names:  # warm-up: imports, allocator, caches
        fastest_block(name)
    ratios: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(args.reps):
        order = names if rep % 2 == 0 else names[::-1]
        seconds = {name: fastest_block(name) for name in order}
        for name in names:
            ratios[name].append(seconds[name] / seconds["bare"])
    table = Table(
        title=f"{args.workload}: fastest-block step time over bare's, {args.reps} paired runs x {args.steps} steps",
        title_justify="left",
    )
    for column in ("variant", "x bare (median)", "interquartile range"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    summary = {}
    for name, values in ratios.items():
        low, _, high = statistics.quantiles(values, n=4)
        summary[name] = {"median": statistics.median(values), "q1": low, "q3": high, "ratios": values}
        table.add_row(name, f"{summary[name]['median']:.3f}", f"{low:.3f}..{high:.3f}")
    console = Console(width=None if sys.stdout.isatty() else 120)
    console.print(table)
    if args.out:
        args.out.write_text(json.dumps({"against": args.against, "steps": args.steps, "variants": summary}, indent=2))
        console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
