"""The SpikeEvent schema and the files: JSONL flushed per spike, trace CSV, atomic summary."""

import csv
import json
import math

import pytest

from lightning_spikewatch.events import Cause, CauseScore, SpikeEvent
from lightning_spikewatch.export import TRACE_BUFFER_ROWS, SpikeLog

SCHEMA = {
    "step",
    "epoch",
    "batch_idx",
    "loss",
    "zscore",
    "signals",
    "cause",
    "confidence",
    "causes",
    "evidence",
    "rank",
    "action",
}


def event(loss=2.5, z=9.0) -> SpikeEvent:
    causes = [
        CauseScore(Cause.SHORT_BATCH, 0.8, {"batch_size": 1, "nominal_batch_size": 32}),
        CauseScore(Cause.MINIBATCH_NOISE, 0.3, {"loss_z": z}),
    ]
    return SpikeEvent(step=12, epoch=1, batch_idx=3, loss=loss, zscore=z, signals=["loss"], causes=causes)


def test_event_dict_has_the_public_fields():
    d = event().to_dict()
    assert set(d) == SCHEMA
    assert d["cause"] == "short_batch" and d["confidence"] == 0.8
    assert d["evidence"] == {"batch_size": 1, "nominal_batch_size": 32}
    assert [c["cause"] for c in d["causes"]] == ["short_batch", "minibatch_noise"]
    assert set(d["causes"][0]) == {"cause", "score", "evidence"}


def test_non_finite_numbers_become_json_null():
    d = event(loss=math.nan, z=math.inf).to_dict()
    assert d["loss"] is None and d["zscore"] is None
    json.dumps(d, allow_nan=False)


def test_spikes_are_on_disk_as_soon_as_they_are_written(tmp_path):
    log = SpikeLog(tmp_path)
    log.write_spike(event())
    # Read while the file is still open: the line must already be there (a crash loses nothing).
    lines = (tmp_path / "spikes.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [12]
    log.write_step(1, 0, 1, 0.5, 0.1, 1.0, 0.2, 32, 1e-3, False)
    log.write_summary({"spikes": 1})
    log.close()
    rows = list(csv.reader((tmp_path / "steps.csv").open()))
    assert rows[0][:4] == ["step", "epoch", "batch_idx", "loss"] and len(rows) == 2
    assert json.loads((tmp_path / "summary.json").read_text()) == {"spikes": 1}


def test_append_mode_keeps_earlier_lines_and_a_single_header(tmp_path):
    for append, step in ((False, 12), (True, 30)):
        log = SpikeLog(tmp_path, append=append)
        log.write_spike(event())  # step 12: found again after a resume, written once only
        log.write_spike(SpikeEvent(step, 1, 3, 2.5, 9.0, ["loss"], event().causes))
        log.write_step(1, 0, 0, 1.0, 0.0, None, None, None, None, True)
        log.close()
    assert [json.loads(line)["step"] for line in (tmp_path / "spikes.jsonl").read_text().splitlines()] == [12, 30]
    assert [r[0] for r in csv.reader((tmp_path / "steps.csv").open())] == ["step", "1", "1"]


SETTLED = [  # (step, batch_idx, batch_size, loss, lr) and the loss z of each: sizes and rates change, or not
    ((7, 3, 32, 0.123456789, 1e-3), -0.75),
    ((8, 4, 32, 2.5e-7, 1e-3), 1.25),
    ((9, 5, None, 3.0, math.nan), math.inf),
    ((10, 6, 1, 1e30, math.nan), -2.0),
    ((11, 7, 1, -0.5, 2.5e-4), math.nan),
]


@pytest.mark.parametrize("every", [1, 2, 3])
def test_settled_rows_are_written_as_write_step_writes_unread_quiet_rows(tmp_path, every):
    rows, loss_z = [row for row, _ in SETTLED], [z for _, z in SETTLED]
    first = 4  # the batch number of the first row: with every=2 rows 0, 2, 4 are kept, with 3 row 2
    for name, settled in (("steps", False), ("settled", True)):
        log = SpikeLog(tmp_path / name)
        if settled:
            log.write_settled(1, rows[:2], loss_z[:2], first, every)
            log.write_settled(1, rows[2:], loss_z[2:], first + 2, every)
        else:
            for number, ((step, batch_idx, size, loss, lr), z) in enumerate(SETTLED, first):
                if number % every == 0:
                    log.write_step(step, 1, batch_idx, loss, z, None, None, size, lr, False)
        log.close()
    written = (tmp_path / "settled" / "steps.csv").read_text()
    assert written == (tmp_path / "steps" / "steps.csv").read_text()
    lines = written.splitlines()
    assert len(lines) == 1 + {1: 5, 2: 3, 3: 1}[every]
    if every == 1:
        assert lines[1] == "7,1,3,0.123457,-0.75,nan,nan,32,0.001,0"
        assert lines[3] == "9,1,5,3,inf,nan,nan,-1,nan,0"


def test_the_trace_buffer_holds_at_most_its_bound_of_rows(tmp_path):
    log = SpikeLog(tmp_path)
    rows = [(step, step, 32, 1.0, 1e-3) for step in range(TRACE_BUFFER_ROWS - 1)]
    log.write_settled(0, rows, [0.0] * len(rows))
    assert log._buffered == TRACE_BUFFER_ROWS - 1  # formatted later, when written
    log.write_settled(0, rows[:2], [0.0, 0.0])
    assert log._buffered == 0  # the bound was reached: all of it went to the file
    log.close()
    assert (tmp_path / "steps.csv").read_text().count("\n") == 1 + TRACE_BUFFER_ROWS + 1
