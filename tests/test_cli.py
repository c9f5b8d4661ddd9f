"""The `spikewatch` command end to end, on logs written by a real tiny run."""

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from lightning_spikewatch.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def log_dir(tmp_path_factory):
    from lightning_spikewatch import SpikeWatch
    from tests.e2e.tiny import TinyNet, fit, position, regression_data, seeded

    folder = tmp_path_factory.mktemp("run") / "spikewatch"
    data = regression_data()
    data.y[position(40)] += 30.0
    fit(seeded(TinyNet), data, [SpikeWatch(log_dir=folder, print_spikes=False, print_summary=False)], max_epochs=2)
    return folder


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG file"
    return struct.unpack(">II", header[16:24])


def test_report_renders_the_summary_from_the_files(log_dir):
    result = invoke("report", log_dir, "--width", 120)
    assert result.exit_code == 0
    assert "spike(s) in 120 watched steps" in result.output
    assert "outlier_sample" in result.output and "#1285" in result.output and "What to do" in result.output


def test_report_needs_no_torch_and_module_entry_point_works(log_dir):
    code = (
        "import sys; from lightning_spikewatch.cli import main\n"
        f"try:\n    main(['report', {str(log_dir)!r}], standalone_mode=False)\n"
        "finally:\n    print('TORCH LOADED' if 'torch' in sys.modules else 'NO TORCH')"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert run.returncode == 0 and run.stdout.strip().endswith("NO TORCH"), run.stderr
    run = subprocess.run([sys.executable, "-m", "lightning_spikewatch", "--help"], capture_output=True, text=True)
    assert run.returncode == 0 and "report" in run.stdout and "plot" in run.stdout and "export" in run.stdout


def test_plot_writes_a_png_of_the_requested_size(log_dir, tmp_path):
    out = tmp_path / "spikes.png"
    result = invoke("plot", log_dir, "-o", out, "--size", 8, 6, "--dpi", 50)
    assert result.exit_code == 0, result.output
    assert png_size(out) == (400, 300)


@pytest.mark.parametrize("fmt", ["csv", "json"])
def test_export_writes_one_row_per_spike(log_dir, tmp_path, fmt):
    out = tmp_path / f"spikes.{fmt}"
    assert invoke("export", log_dir, "--format", fmt, "-o", out).exit_code == 0
    text = out.read_text()
    events = [json.loads(line) for line in (log_dir / "spikes.jsonl").read_text().splitlines()]
    if fmt == "json":
        rows = json.loads(text)
        assert [r["step"] for r in rows] == [e["step"] for e in events]
        assert json.loads(rows[0]["evidence"])["samples"][0]["index"] == 1285
    else:
        lines = text.splitlines()
        assert lines[0].startswith("step,epoch,batch_idx,rank,loss,zscore,cause") and len(lines) == 1 + len(events)


def test_parquet_without_pyarrow_says_what_to_install(log_dir, tmp_path):
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        result = invoke("export", log_dir, "--format", "parquet", "-o", tmp_path / "x.parquet")
        assert result.exit_code == 1 and "pip install pyarrow" in result.output
    else:
        assert invoke("export", log_dir, "--format", "parquet", "-o", tmp_path / "x.parquet").exit_code == 0


def test_missing_and_empty_folders_are_clear_errors(tmp_path):
    result = invoke("report", tmp_path / "nope")
    assert result.exit_code == 1 and "is not a folder" in result.output
    (tmp_path / "empty").mkdir()
    result = invoke("report", tmp_path / "empty")
    assert result.exit_code == 1 and "holds no spikes.jsonl" in result.output


def test_truncated_last_line_is_skipped_with_a_warning(log_dir, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    lines = (log_dir / "spikes.jsonl").read_text().splitlines()
    (broken / "spikes.jsonl").write_text("\n".join(lines) + "\n" + lines[0][:40])  # a crash mid-write
    (broken / "steps.csv").write_text((log_dir / "steps.csv").read_text())
    result = CliRunner().invoke(main, ["report", str(broken)])
    assert result.exit_code == 0
    assert "skipped 1 unreadable line" in result.output
    assert "did not reach its end" in result.output  # no summary.json: counts come from the other files
    assert f"{len(lines)} spike(s)" in result.output


def test_help_everywhere():
    for command in ([], ["report"], ["plot"], ["export"]):
        result = invoke(*command, "--help")
        assert result.exit_code == 0 and "Usage" in result.output
