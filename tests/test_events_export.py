"""The SpikeEvent schema and the files: JSONL flushed per spike, trace CSV, atomic summary."""

import csv
import json
import math

from lightning_spikewatch.events import Cause, CauseScore, SpikeEvent
from lightning_spikewatch.export import SpikeLog

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


def test_settled_rows_are_written_as_write_step_writes_unread_quiet_rows(tmp_path):
    rows = [(7, 1, 3, 0.123456789, -0.75, 32, 1e-3), (8, 1, 4, 2.5e-7, 1.25, -1, math.nan)]
    for name, settled in (("steps", False), ("settled", True)):
        log = SpikeLog(tmp_path / name)
        if settled:
            log.write_settled(rows)
        else:
            for step, epoch, batch_idx, loss, loss_z, size, lr in rows:
                log.write_step(step, epoch, batch_idx, loss, loss_z, None, None, None if size < 0 else size, lr, False)
        log.close()
    written = (tmp_path / "settled" / "steps.csv").read_text()
    assert written == (tmp_path / "steps" / "steps.csv").read_text()
    assert written.splitlines()[1] == "7,1,3,0.123457,-0.75,nan,nan,32,0.001,0"
