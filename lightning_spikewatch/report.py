"""What the user reads: the one-line spike announcement and the end-of-fit rich summary.

Rendering only; nothing here decides anything. Works on `SpikeEvent` objects or on their
exported dicts, so a summary can be re-rendered from the log files alone.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from lightning_spikewatch.events import Cause, SpikeEvent

CAUSE_STYLE = {
    Cause.SHORT_BATCH.value: "yellow",
    Cause.OUTLIER_SAMPLE.value: "magenta",
    Cause.LOG_ZERO.value: "red",
    Cause.INPUT_SCALE.value: "bright_red",
    Cause.ADAM_SECOND_MOMENT.value: "cyan",
    Cause.LAYER_GRADIENT.value: "blue",
    Cause.LEARNING_RATE.value: "green",
    Cause.NON_FINITE.value: "bold red",
    Cause.MINIBATCH_NOISE.value: "dim",
}


def _num(value: Any, digits: int = 3) -> str:
    if value is None:
        return "nan"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _sample_names(samples: Sequence[Mapping[str, Any]]) -> str:
    names = []
    for s in samples:
        where = f"#{s['index']}" if s.get("index") is not None else f"batch position {s['position']}"
        names.append(f"{where}" + (f" (group of {s['group_size']})" if s.get("group_size") else ""))
    return ", ".join(names)


def describe_evidence(cause: str, evidence: Mapping[str, Any]) -> str:
    """The evidence for a cause in a few words."""
    e = evidence
    if cause == Cause.SHORT_BATCH.value:
        if e["which"] == "this batch":
            last = " (last of epoch)" if e.get("last_batch") else ""
            return f"batch of {e['batch_size']}, nominal {e['nominal_batch_size']}{last}"
        return f"previous batch had {e['batch_size']}, nominal {e['nominal_batch_size']}"
    if cause == Cause.OUTLIER_SAMPLE.value:
        return f"sample {_sample_names(e['samples'])} carries {e['share_of_batch_loss']:.0%} of the batch loss"
    if cause == Cause.LOG_ZERO.value:
        if "samples" in e:
            first = e["samples"][0]
            return f"sample {_sample_names([first])}: loss {_num(first['loss'])} nats, p~{_num(e['probability'], 2)}"
        return f"batch loss {_num(e['batch_loss'])} nats, p~{_num(e['probability'], 2)}"
    if cause == Cause.INPUT_SCALE.value:
        where = f", largest in sample #{e['sample']}" if e.get("sample") is not None else ""
        return f"input RMS {_num(e['input_rms'])} vs typical {_num(e['typical_input_rms'])}{where}"
    if cause == Cause.ADAM_SECOND_MOMENT.value:
        return (
            f"{e['layer']}: update {_num(e['update_ratio'])}x lr per weight (typical {_num(e['typical_update_ratio'])})"
        )
    if cause == Cause.LAYER_GRADIENT.value:
        return f"{e['layer']}: grad norm {_num(e['ratio'])}x its typical value ({e['which']})"
    if cause == Cause.LEARNING_RATE.value:
        when = "at this step" if e["steps_before"] == 0 else f"{e['steps_before']} step(s) before"
        return f"group {e['param_group']} lr {_num(e['lr_before'])} -> {_num(e['lr_after'])} {when}"
    if cause == Cause.NON_FINITE.value:
        return "non-finite " + ", ".join(e["non_finite"])
    return f"no single cause; z={_num(e.get('loss_z'))}"


def advice(cause: str, evidence: Mapping[str, Any] | None = None) -> str:
    """What to do about a cause, in one or two sentences, using the evidence where it helps."""
    e = evidence or {}
    if cause == Cause.SHORT_BATCH.value:
        rest = ""
        if e.get("dataset_size"):
            rest = f" ({e['dataset_size']} samples leave a last batch of {e['dataset_remainder']})"
        return (
            f"Set `drop_last=True` on the training DataLoader, or pick a batch size that divides the dataset{rest}. "
            "Adam takes as large a step on a tiny, noisy batch as on a full one."
        )
    if cause == Cause.OUTLIER_SAMPLE.value:
        which = _sample_names(e.get("samples", [])) or "the sample named above"
        return f"Look at dataset sample {which}: check its label and inputs, then fix or drop it, or use a robust loss."
    if cause == Cause.LOG_ZERO.value:
        return (
            "The model gives the target a probability near 0. Compute the loss from logits "
            "(F.cross_entropy, BCEWithLogitsLoss, log_softmax) instead of log(probabilities), "
            "and check that sample's label."
        )
    if cause == Cause.INPUT_SCALE.value:
        return (
            "Inputs were blown up: check your normalisation for a near-zero std (use (x - mean) / (std + eps)), "
            "and clip or standardise the offending feature."
        )
    if cause == Cause.ADAM_SECOND_MOMENT.value:
        layer = e.get("layer", "a layer")
        return (
            f"Adam's second moment (exp_avg_sq) for {layer} had collapsed, so its step was oversized. "
            "Raise Adam's eps (e.g. 1e-6), lower the learning rate, or clip gradients (Trainer(gradient_clip_val=1.0))."
        )
    if cause == Cause.LAYER_GRADIENT.value:
        layer = e.get("layer", "one layer")
        return (
            f"The gradient of {layer} blew up. Clip gradients (Trainer(gradient_clip_val=1.0)) and check that "
            "layer's initialisation and normalisation."
        )
    if cause == Cause.LEARNING_RATE.value:
        return "The learning rate jumped just before the spike: check the scheduler (warm-up end, restarts, step size)."
    if cause == Cause.NON_FINITE.value:
        return (
            "NaN/Inf appeared. Run with Trainer(detect_anomaly=True) to find the operation; look for log(0), "
            "division by zero, or fp16 overflow (try precision='bf16-mixed')."
        )
    return (
        "Ordinary mini-batch noise, usually harmless. "
        "A larger batch, a lower learning rate or gradient clipping smooths it."
    )


def _as_dict(event: SpikeEvent | Mapping[str, Any]) -> Mapping[str, Any]:
    return event.to_dict() if isinstance(event, SpikeEvent) else event


def spike_line(event: SpikeEvent | Mapping[str, Any]) -> Text:
    """The one-line announcement printed when a spike is found."""
    e = _as_dict(event)
    rank = f" rank {e['rank']}" if e.get("rank") else ""
    text = Text("SpikeWatch ", style="bold")
    text.append(f"step {e['step']} (epoch {e['epoch']}, batch {e['batch_idx']}{rank}): ")
    text.append(f"loss {_num(e['loss'], 4)}, z={_num(e['zscore'])} -> ")
    text.append(e["cause"], style=CAUSE_STYLE.get(e["cause"], ""))
    text.append(f" ({e['confidence']:.2f}): {describe_evidence(e['cause'], e['evidence'])}")
    if e.get("action"):
        text.append(f" [{action_phrase(e['action'])}]", style="bold")
    return text


def action_phrase(action: Mapping[str, Any]) -> str:
    """What an opt-in action did, in a few words."""
    kind = action.get("action")
    if kind == "clip":
        factor = action.get("factor")
        return "clipped" + (f" x{factor:.2g}" if isinstance(factor, (int, float)) else "")
    if kind == "stop":
        return "stopped"
    return "skipped"


def listed_skip_line(step: int, entry: Mapping[str, Any]) -> Text:
    """Announces that a resumed fit skipped a batch that a stop had set aside."""
    text = Text("SpikeWatch ", style="bold")
    text.append(
        f"step {step}: skipped the update of the batch set aside by the stop at step {entry['step']} "
        f"(epoch {entry['epoch']}, batch {entry['batch_idx']}"
        + (f", cause {entry['cause']}" if entry.get("cause") else "")
        + ")."
    )
    return text


def stop_line(stopped: Mapping[str, Any]) -> Text:
    """Says that action="stop" ended the fit, where the checkpoint is, and how to go on."""
    text = Text("SpikeWatch stopped the fit ", style="bold red")
    cause = f" ({stopped['cause']})" if stopped.get("cause") else ""
    text.append(f"at step {stopped['step']}{cause} without applying that step's update. ")
    text.append(f"Checkpoint: {stopped['checkpoint']}. ")
    if stopped.get("skip_file"):
        text.append(f"The batch is listed in {stopped['skip_file']}. ")
    text.append(
        "To go on, call trainer.fit(model, ckpt_path=<that checkpoint or an earlier one>) with SpikeWatch "
        "in the callbacks; it skips the listed batches."
    )
    return text


def actions_text(summary: Mapping[str, Any]) -> Text | None:
    """One line on the actions taken (None when no action was enabled or taken)."""
    counts = summary.get("actions") or {}
    if not counts and not summary.get("stopped"):
        setting = (summary.get("settings") or {}).get("action")
        return Text(f"Action {setting!r}: never needed.", style="green") if setting else None
    names = {
        "skip": "updates dropped",
        "clip": "gradients clipped",
        "stop": "stops",
        "skip_listed": "listed batches skipped",
    }
    parts = [f"{names.get(kind, kind)} x{n}" for kind, n in counts.items()]
    text = Text("Actions taken: " + (", ".join(parts) if parts else "none") + ".", style="bold")
    if summary.get("stopped"):
        text.append("\n")
        text.append_text(stop_line(summary["stopped"]))
    return text


def summary_renderable(summary: Mapping[str, Any], events: Sequence[SpikeEvent | Mapping[str, Any]], worst: int = 10):
    """The end-of-fit summary: counts per cause, the worst spikes, and advice per cause."""
    dicts = [_as_dict(e) for e in events]
    steps = summary.get("steps_watched", 0)
    actions = actions_text(summary)
    if not dicts:
        quiet = Text(f"SpikeWatch: no loss spikes in {steps} watched steps.", style="green")
        return quiet if actions is None else Group(quiet, actions)
    counts = Counter(d["cause"] for d in dicts)
    header = Text(f"{len(dicts)} spike(s) in {steps} watched steps: ")
    header.append(", ".join(f"{cause} x{n}" for cause, n in counts.most_common()))

    table = Table(title="Worst spikes", title_justify="left", expand=False)
    for column, justify in (("step", "right"), ("ep/batch", "right"), ("loss", "right"), ("z", "right")):
        table.add_column(column, justify=justify, no_wrap=True)
    table.add_column("cause", no_wrap=True)
    table.add_column("evidence", overflow="fold")
    with_actions = any(d.get("action") for d in dicts)
    if with_actions:
        table.add_column("action", no_wrap=True)

    def severity(d: Mapping[str, Any]) -> float:
        return float("inf") if d["zscore"] is None else d["zscore"]

    for d in sorted(dicts, key=severity, reverse=True)[:worst]:
        row = [
            str(d["step"]),
            f"{d['epoch']}/{d['batch_idx']}",
            _num(d["loss"], 4),
            _num(d["zscore"]),
            Text(d["cause"], style=CAUSE_STYLE.get(d["cause"], "")),
            describe_evidence(d["cause"], d["evidence"]),
        ]
        if with_actions:
            row.append(action_phrase(d["action"]) if d.get("action") else "-")
        table.add_row(*row)
    tips = Table.grid(padding=(0, 1))
    tips.add_column(no_wrap=True)
    tips.add_column()
    for cause, _ in counts.most_common():
        example = next(d for d in dicts if d["cause"] == cause)
        tips.add_row(Text(cause, style=CAUSE_STYLE.get(cause, "")), advice(cause, example["evidence"]))
    parts = [header, table, Text("What to do:", style="bold"), tips]
    if actions is not None:
        parts.append(actions)
    if summary.get("non_finite_repeats"):
        parts.append(
            Text(
                f"The loss stayed non-finite for {summary['non_finite_repeats']} more batch(es) after the first.",
                style="red",
            )
        )
    if summary.get("amp_skipped_steps"):
        parts.append(
            Text(f"fp16 GradScaler skipped {summary['amp_skipped_steps']} step(s) on overflow (routine, not spikes).")
        )
    if summary.get("disabled"):
        parts.append(
            Text("Switched off after an error (see its warning): " + ", ".join(summary["disabled"]), style="yellow")
        )
    return Panel(Group(*parts), title="SpikeWatch summary", title_align="left")


def print_summary(
    summary: Mapping[str, Any], events: Sequence[SpikeEvent | Mapping[str, Any]], console: Console
) -> None:
    console.print(summary_renderable(summary, events))


def markdown_table(events: Sequence[SpikeEvent | Mapping[str, Any]], worst: int = 20) -> str:
    """The worst spikes as a Markdown table, for loggers that show text (TensorBoard, a .md file)."""
    dicts = sorted((_as_dict(e) for e in events), key=lambda d: -(d["zscore"] if d["zscore"] is not None else 1e300))
    with_actions = any(d.get("action") for d in dicts)
    lines = ["| step | epoch/batch | loss | z | cause | evidence |", "|---:|---:|---:|---:|---|---|"]
    if with_actions:
        lines = [lines[0] + " action |", lines[1] + "---|"]
    for d in dicts[:worst]:
        evidence = describe_evidence(d["cause"], d["evidence"]).replace("|", "/")
        line = (
            f"| {d['step']} | {d['epoch']}/{d['batch_idx']} | {_num(d['loss'], 4)} | {_num(d['zscore'])} "
            f"| {d['cause']} | {evidence} |"
        )
        if with_actions:
            line += f" {action_phrase(d['action']) if d.get('action') else '-'} |"
        lines.append(line)
    return "\n".join(lines)
