"""The console line and the summary read well, in a narrow terminal and in a log file."""

from rich.console import Console

from lightning_spikewatch.events import Cause, CauseScore, SpikeEvent
from lightning_spikewatch.report import advice, print_summary, spike_line


def make_event(step, cause, evidence, z=8.0):
    return SpikeEvent(step, 0, step, 2.0, z, ["loss"], [CauseScore(cause, 0.8, evidence)])


EVENTS = [
    make_event(
        5,
        Cause.SHORT_BATCH,
        {
            "batch_size": 1,
            "nominal_batch_size": 32,
            "which": "this batch",
            "last_batch": True,
            "dataset_size": 993,
            "dataset_remainder": 1,
        },
    ),
    make_event(
        9,
        Cause.OUTLIER_SAMPLE,
        {
            "samples": [{"position": 5, "index": 1234, "loss": 900.0}],
            "batch_size": 32,
            "share_of_batch_loss": 0.98,
            "source": "replay",
        },
        z=40.0,
    ),
]


def render(summary, events, width=80):
    console = Console(record=True, width=width, color_system=None)
    print_summary(summary, events, console)
    return console.export_text()


def test_summary_lists_counts_worst_spikes_and_advice():
    text = render({"steps_watched": 500}, EVENTS, width=200)
    assert "2 spike(s) in 500 watched steps" in text
    assert "short_batch x1" in text and "outlier_sample x1" in text
    assert text.index("1234") < text.index("What to do")  # the worst spike is named in the table
    assert "drop_last=True" in text and "993 samples leave a last batch of 1" in text
    assert "#1234" in text


def test_summary_fits_an_80_column_log_file():
    assert all(len(line) <= 80 for line in render({"steps_watched": 500}, EVENTS).splitlines())


def test_summary_without_spikes_is_one_line():
    text = render({"steps_watched": 42}, [])
    assert text.strip() == "SpikeWatch: no loss spikes in 42 watched steps."


def test_summary_also_renders_from_exported_dicts():
    assert render({"steps_watched": 500}, [e.to_dict() for e in EVENTS]) == render({"steps_watched": 500}, EVENTS)


def test_spike_line_is_one_line_with_the_cause_and_evidence():
    line = spike_line(EVENTS[1]).plain
    assert "\n" not in line
    assert line.startswith("SpikeWatch step 9 (epoch 0, batch 9): loss 2, z=40 -> outlier_sample (0.80)")
    assert "#1234" in line


def test_every_cause_has_specific_advice():
    texts = {cause: advice(cause.value, {}) for cause in Cause}
    assert len(set(texts.values())) == len(Cause)
    assert "eps" in texts[Cause.ADAM_SECOND_MOMENT] and "logits" in texts[Cause.LOG_ZERO]


def test_actions_show_on_the_line_in_the_table_and_in_the_summary():
    from dataclasses import replace

    from lightning_spikewatch.report import markdown_table

    acted = [
        replace(EVENTS[0], action={"action": "skip", "reason": "update dropped (short_batch)"}),
        replace(EVENTS[1], action={"action": "clip", "reason": "gradient norm 80 clipped to 2", "factor": 0.025}),
    ]
    assert spike_line(acted[1]).plain.endswith("[clipped x0.025]")
    summary = {"steps_watched": 500, "actions": {"skip": 1, "clip": 1}, "settings": {"action": "clip"}}
    text = render(summary, acted)
    assert "skipped" in text and "clipped x0.025" in text
    assert "Actions taken: updates dropped x1, gradients clipped x1." in text
    assert all(len(line) <= 80 for line in text.splitlines())
    assert "| action |" in markdown_table(acted) and "clipped x0.025" in markdown_table(acted)


def test_a_stop_says_where_the_checkpoint_is_and_how_to_resume():
    stopped = {"step": 40, "cause": "outlier_sample", "checkpoint": "/runs/sw/stop_step40.ckpt"}
    text = render({"steps_watched": 41, "actions": {"stop": 1}, "stopped": stopped}, EVENTS[:1], width=200)
    assert "stopped the fit at step 40 (outlier_sample)" in text and "/runs/sw/stop_step40.ckpt" in text
    assert "ckpt_path=" in text


def test_an_action_that_never_fired_is_said_so():
    text = render({"steps_watched": 42, "actions": {}, "settings": {"action": "skip"}}, [])
    assert "no loss spikes in 42 watched steps" in text and "Action 'skip': never needed." in text
