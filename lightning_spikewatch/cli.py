"""The ``spikewatch`` command: read a run's spike logs after the fact, without torch.

spikewatch report LOG_DIR                 re-render the summary
spikewatch plot LOG_DIR -o spikes.png     loss curve with spikes by cause, grad norm, layer heat map
spikewatch export LOG_DIR --format csv    spikes as a table (csv, json, parquet)
"""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from lightning_spikewatch import report
from lightning_spikewatch.logdir import LogDirError, RunLog, load

EXPORT_COLUMNS = ("step", "epoch", "batch_idx", "rank", "loss", "zscore", "cause", "confidence", "signals", "evidence")


def _load(log_dir: Path) -> RunLog:
    try:
        run = load(log_dir)
    except LogDirError as err:
        raise click.ClickException(str(err)) from None
    for warning in run.warnings:
        click.echo(f"warning: {warning}", err=True)
    return run


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="lightning-spikewatch")
def main() -> None:
    """Read SpikeWatch logs: the spikes of a run, their causes, and what to do about them."""


@main.command("report")
@click.argument("log_dir", type=click.Path(path_type=Path))
@click.option("--worst", default=10, show_default=True, help="How many spikes the table shows.")
@click.option("--width", type=int, default=None, help="Console width (default: the terminal's).")
def report_command(log_dir: Path, worst: int, width: int | None) -> None:
    """Print the summary of the run logged in LOG_DIR (as printed at the end of fit)."""
    run = _load(log_dir)
    summary = {**run.summary, "steps_watched": run.steps_watched}
    Console(width=width).print(report.summary_renderable(summary, run.events, worst=worst))


@main.command("plot")
@click.argument("log_dir", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None, help="PNG file [LOG_DIR/spikes.png].")
@click.option("--worst", default=3, show_default=True, help="Spikes shown in the per-layer heat map.")
@click.option("--size", nargs=2, type=float, default=(10.0, 7.5), show_default=True, help="Figure size in inches.")
@click.option("--dpi", default=100, show_default=True, help="Pixels per inch.")
def plot_command(log_dir: Path, output: Path | None, worst: int, size: tuple[float, float], dpi: int) -> None:
    """Draw the loss curve with each spike marked by cause, the gradient norm, and a per-layer heat map."""
    from lightning_spikewatch.plot import MISSING_MATPLOTLIB, draw, matplotlib_available

    if not matplotlib_available():
        raise click.ClickException(MISSING_MATPLOTLIB)
    run = _load(log_dir)
    if not run.trace:
        raise click.ClickException(f"{log_dir} has no steps.csv to plot (was the run made with trace_every=0?)")
    output = output or log_dir / "spikes.png"
    draw(run, output, worst=worst, size=size, dpi=dpi)
    click.echo(f"wrote {output}")


@main.command("export")
@click.argument("log_dir", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["csv", "json", "parquet"]), default="csv", show_default=True)
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None, help="File to write [standard output].")
def export_command(log_dir: Path, fmt: str, output: Path | None) -> None:
    """Write the spikes as a table for spreadsheets and dataframes (one row per spike)."""
    run = _load(log_dir)
    rows = [_flat(event) for event in run.events]
    if fmt == "parquet":
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise click.ClickException("parquet needs pyarrow: pip install pyarrow (or use --format csv)") from None
        if output is None:
            raise click.ClickException("parquet is binary: give a file with -o spikes.parquet")
        pq.write_table(pa.Table.from_pylist(rows), output)
    else:
        text = json.dumps(rows, indent=2) + "\n" if fmt == "json" else _csv(rows)
        if output is None:
            sys.stdout.write(text)
            return
        output.write_text(text, encoding="utf-8")
    click.echo(f"wrote {len(rows)} spike(s) to {output}", err=True)


def _flat(event: dict[str, Any]) -> dict[str, Any]:
    row = {column: event.get(column) for column in EXPORT_COLUMNS}
    row["rank"] = event.get("rank", 0)
    row["signals"] = ";".join(event.get("signals", []))
    row["evidence"] = json.dumps(event.get("evidence", {}), sort_keys=True)
    return row


def _csv(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=EXPORT_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


if __name__ == "__main__":  # pragma: no cover
    main()
