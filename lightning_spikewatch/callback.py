"""`SpikeWatch`: the thin adapter from Lightning's hooks to the detector, the rules and the exports.

Per step it moves the loss to the host (the one transfer) and scores it. The gradient and input
norms (one fused norm, riding the same transfer) are read on every step on accelerators, where that
costs one kernel launch; on the CPU, where it costs more than everything else together, they are
read every ``baseline_every``-th step for their baselines, on every spike, and for the step before
a spike from that step's gradients, kept by reference. Between those reads, a loss under the
detector's quiet bound (the lowest spike threshold the next few steps can reach) cannot be a spike:
it is settled by that one comparison and scored at the next read, in order, with the same result.
Everything costly (Adam state, replay, class counts) happens only when the detector has flagged a
spike. Every run-time failure is caught, reported once, and switches off only the part that failed.
"""

from __future__ import annotations

import functools
import importlib
import logging
import math
import operator
import os
import warnings
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich import get_console
from rich.text import Text

from lightning_spikewatch import report
from lightning_spikewatch.actions import STRENGTH, Action, ActionPolicy, ActionTaken, SkipEntry, SkipList, stronger
from lightning_spikewatch.causes import LayerGradients, SampleLoss, SampleLosses, SpikeContext, rank_causes
from lightning_spikewatch.detector import SpikeDetector, StepSignals, Verdict
from lightning_spikewatch.events import Cause, SpikeEvent
from lightning_spikewatch.export import PLOT_FILE, SpikeLog, kept_rows, read_skip_entries
from lightning_spikewatch.interventions import clip_gradients, drop_update, drops_missing_gradients, fingerprint_tensors
from lightning_spikewatch.replay import (
    find_dominant_samples,
    loss_from_output,
    preserved_training_state,
    training_step_takes_batch_idx,
)
from lightning_spikewatch.signals import (
    GradientReader,
    adam_layers,
    class_counts,
    dataset_indices,
    first_dim_size,
    fused_norms,
    index_value,
    input_tensors,
    largest_input_position,
    slice_batch,
    tensor_leaves,
    to_host,
)
from lightning_spikewatch.stats import VectorHistory

TOP_SAMPLES = 3
LR_LOOKBACK = 8  # steps back in which a learning-rate jump can explain a spike
LAYER_SNAPSHOT_ROWS = 32  # steps of per-layer gradient norms written to layers.jsonl per spike
CPU_BASELINE_EVERY = 32  # on the CPU, read gradient and input norms every n-th step between spikes
# Steps settled under one quiet bound before it is planned again. The bound must hold whatever the
# settled losses pushed before a loss's scoring, so it loosens fast with their number: at 31 pushes
# into a window of 128 it lets the spread fall to its floor, and once a loss curve is broad (a model
# fitting its data) one step in eight would exceed it and take the general path. Planned every 8
# steps it stays within a few spreads of the real threshold.
QUIET_HORIZON = 8
_GRAD_OF = operator.attrgetter("grad")  # a C-level getter: the lookback keeps every gradient by reference
_NEG_INF = -math.inf
_SEQUENCES = (tuple, list)
# Lightning calls every per-step hook on every callback, each call inside a profiler context with a
# formatted name: about as costly as SpikeWatch's whole quiet step. It skips a hook that is not
# callable (`_call_callback_hooks`: `if callable(fn)`, since Lightning 1.6), so during fit the hooks
# with nothing to do are set to None on the instance, and restored when fit ends.
_UNUSED_STEP_HOOKS = ("on_before_zero_grad", "on_after_backward")
# The hooks the lean path skips while it has nothing for them (the loss is then read as the strategy's
# training_step returns it, before Lightning calls zero_grad, backward and the callbacks' on_before_backward).
_LEAN_STEP_HOOKS = ("on_train_batch_start", "on_before_backward", "on_before_optimizer_step", "on_train_batch_end")


@dataclass(slots=True)
class _Batch:
    """One training batch until its optimizer step: references only, read in ``_evaluate``."""

    batch: Any
    batch_idx: int
    step: int = 0
    epoch: int = 0
    size: int | None = None
    inputs: list[torch.Tensor] = field(default_factory=list)  # floating input tensors, targets left out
    input_numel: int = 0
    loss: torch.Tensor | None = None
    host_loss: float | None = None  # the loss already read to the host (unscaled, undivided), if it was
    per_sample_loss: torch.Tensor | None = None
    layer_norms: tuple[torch.Tensor, ...] | None = None  # manual optimization: read at the first step
    grad_positions: list[int] | None = None
    fingerprint: tuple[float, ...] | None = None  # read only while batches are listed to skip


@dataclass(slots=True)
class _StepNumbers:
    """One optimizer step's numbers on the host."""

    layers: list[float]  # gradient norm of each present parameter (scaled up where sampled)
    grad_positions: list[int] | None  # parameters those norms belong to, when some had no gradient
    input_norms: list[float]  # L2 norm of each floating input tensor, batch after batch
    losses: list[float]  # each batch's loss, unscaled and undivided
    amp_scaled: bool  # an fp16 GradScaler was active


# A quiet step settled by one comparison with the detector's quiet bound, observed later in order:
# (step, batch_idx, batch size or None, loss, learning rate of the first param group or NaN). A plain
# tuple, as it is made on every quiet step; the epoch is the current one (settled steps are caught up
# at every epoch end) and the batch number follows from the order.
_Settled = tuple[int, int, "int | None", float, float]


@dataclass(slots=True)
class _Lookback:
    """The last step whose gradients were not read: references only, read if the next step spikes."""

    record: _Batch
    loss: float
    grads: list[torch.Tensor]
    positions: list[int] | None
    norms: list[float] | None = None  # read on demand, at most once


@dataclass
class _PendingSpike:
    """A flagged batch whose event is completed in ``on_train_batch_end`` (when outputs are known)."""

    record: _Batch
    context: SpikeContext
    signals: list[str] = field(default_factory=list)
    layers: dict[str, Any] | None = None  # the per-layer norms leading up to the spike, for the heat map
    action: ActionTaken | None = None  # what the opt-in action did to its optimizer step


def _safely(part: str):
    """Run a hook body so that no exception reaches the fit loop; a failure disables ``part``."""

    def decorate(hook: Callable) -> Callable:
        @functools.wraps(hook)
        def guarded(self: _SpikeWatchHooks, *args: Any, **kwargs: Any) -> Any:
            if part in self._disabled:
                return None
            try:
                return hook(self, *args, **kwargs)
            except Exception as err:  # noqa: BLE001 - the user's run must never die of a SpikeWatch bug
                self._disable(part, err)
                return None

        return guarded

    return decorate


class _SpikeWatchHooks:
    """Explain loss spikes: detect them with a robust z-score and name their most likely cause.

    Add it to any Trainer; the LightningModule needs no change. Each spike is announced in one
    line, a summary with advice is printed when fit ends, and ``<log_dir>/spikes.jsonl``,
    ``steps.csv`` and ``summary.json`` are written as the run goes.

    Args:
        log_dir: where to write the exports. Default: ``spikewatch/`` under the trainer's log dir
            when it has a logger, else under ``default_root_dir`` (the working directory unless set).
        window: number of recent batches a loss is compared with.
        warmup: batches seen before any spike is flagged (non-finite values are always flagged).
        z_threshold: robust z-score above which a loss is a spike (only upward counts).
        min_rel_spread: floor on the spread, as a fraction of the median loss, so that a very
            flat loss curve does not turn every wiggle into a spike.
        replay: on a spike, replay the batch on sub-batches (no gradients, all state restored)
            to find the samples that carry its loss.
        max_replays: most ``training_step`` calls one spike may cost.
        index_keys: batch keys (dict keys or attributes) holding dataset indices, used to name
            outlier samples.
        target_keys: dict keys holding targets, left out of the input magnitude (as is the last
            element of a tuple or list batch).
        trace_every: write every n-th batch to ``steps.csv`` (spikes always, and on the CPU each
            step that read the gradient norm); 0 disables the trace.
        print_spikes: print one line per spike as it is found.
        print_summary: print the summary when fit ends.
        batch_size_fn: ``batch -> int`` for batches whose size is not the first dim of their first tensor.
        grad_sample: on the CPU, a gradient with more elements than this is watched through a
            fixed sample of about this many elements (exact norms are still read on a spike), so
            that watching does not cost a full pass over every gradient each step. None reads
            every element. Accelerators always read every element: one fused kernel is cheap there.
        plot: when fit ends, draw ``spikes.png`` in ``log_dir`` (needs matplotlib, the ``plot``
            extra) and log it to TensorBoard when the trainer has a TensorBoard logger.
        baseline_every: read the gradient and input norms on every n-th step to keep their
            baselines; a spike, and the step just before it, are always read in full. None (the
            default): every step on accelerators, where one fused norm riding the loss's transfer
            is cheap, and every 32nd step on the CPU, where it costs more than the rest of SpikeWatch
            together. On the CPU the step before is read from its gradients, kept alive by reference
            for one step (one more set of gradients in host memory); on an accelerator with n > 1 it
            is not read back, which would hold a second set of gradients in device memory. With an
            action or manual optimization every step is read.
        action: what to do about a spike before the optimizer uses its gradients. None (default)
            only watches and changes nothing. ``"skip"`` drops the step's update; ``"clip"``
            scales the gradient down to the largest norm the detector does not call an outlier;
            ``"stop"`` drops the update, saves ``stop_step<N>.ckpt`` and lists the batch in
            ``skip_batches.jsonl`` in ``log_dir``, and ends the fit; resuming from a checkpoint
            with SpikeWatch skips the listed batches. With an action, a gradient-norm outlier
            counts as a spike even when the loss has not moved yet. Automatic optimization only.
        act_on: the causes the action applies to, e.g. ``["outlier_sample", "non_finite"]``;
            every cause when None.

    Raises:
        ValueError: if an argument is out of range.

    Example::

        >>> from lightning_spikewatch import SpikeWatch
        >>> watch = SpikeWatch(z_threshold=6.0)
        >>> watch.spikes
        []
    """

    def __init__(
        self,
        log_dir: str | os.PathLike | None = None,
        *,
        window: int = 128,
        warmup: int = 20,
        z_threshold: float = 6.0,
        min_rel_spread: float = 0.02,
        replay: bool = True,
        max_replays: int = 24,
        index_keys: Sequence[str] = ("index", "idx", "indices", "sample_index"),
        target_keys: Sequence[str] = ("y", "target", "targets", "label", "labels"),
        trace_every: int = 1,
        print_spikes: bool = True,
        print_summary: bool = True,
        batch_size_fn: Callable[[Any], int] | None = None,
        grad_sample: int | None = 65536,
        baseline_every: int | None = None,
        plot: bool = False,
        action: str | None = None,
        act_on: Sequence[str] | None = None,
    ) -> None:
        _check(isinstance(window, int) and window >= 8, "window", window, "an integer >= 8")
        _check(
            isinstance(warmup, int) and 3 <= warmup <= window,
            "warmup",
            warmup,
            f"an integer from 3 to window ({window})",
        )
        _check(_is_number(z_threshold) and z_threshold > 0, "z_threshold", z_threshold, "a number > 0 (e.g. 6.0)")
        _check(
            _is_number(min_rel_spread) and 0 <= min_rel_spread < 1,
            "min_rel_spread",
            min_rel_spread,
            "a number in [0, 1)",
        )
        _check(isinstance(max_replays, int) and max_replays >= 0, "max_replays", max_replays, "an integer >= 0")
        _check(
            isinstance(trace_every, int) and trace_every >= 0,
            "trace_every",
            trace_every,
            "an integer >= 0 (0 disables)",
        )
        _check(
            not isinstance(index_keys, str) and all(isinstance(k, str) for k in index_keys),
            "index_keys",
            index_keys,
            "a list of strings such as ['index', 'idx']",
        )
        _check(
            not isinstance(target_keys, str) and all(isinstance(k, str) for k in target_keys),
            "target_keys",
            target_keys,
            "a list of strings such as ['y', 'target']",
        )
        _check(
            grad_sample is None
            or (isinstance(grad_sample, int) and not isinstance(grad_sample, bool) and grad_sample >= 1024),
            "grad_sample",
            grad_sample,
            "None or an integer >= 1024",
        )
        _check(
            baseline_every is None
            or (isinstance(baseline_every, int) and not isinstance(baseline_every, bool) and baseline_every >= 1),
            "baseline_every",
            baseline_every,
            "None or an integer >= 1 (1 reads every step)",
        )
        _check(batch_size_fn is None or callable(batch_size_fn), "batch_size_fn", batch_size_fn, "a callable or None")
        for name, value in (
            ("replay", replay),
            ("print_spikes", print_spikes),
            ("print_summary", print_summary),
            ("plot", plot),
        ):
            _check(isinstance(value, bool), name, value, "True or False")
        _check(log_dir is None or isinstance(log_dir, (str, os.PathLike)), "log_dir", log_dir, "a path or None")
        _check(
            act_on is None or action is not None,
            "act_on",
            act_on,
            "None unless an action is chosen (e.g. action='skip')",
        )
        self._policy = ActionPolicy.build(action, act_on) if action is not None else None
        self.action = action
        self.act_on = None if act_on is None else tuple(act_on)
        self.log_dir = log_dir
        self.window = window
        self.warmup = warmup
        self.z_threshold = float(z_threshold)
        self.min_rel_spread = float(min_rel_spread)
        self.replay = replay
        self.max_replays = max_replays
        self.index_keys = tuple(index_keys)
        self.target_keys = tuple(target_keys)
        self.trace_every = trace_every
        self.print_spikes = print_spikes
        self.print_summary = print_summary
        self.batch_size_fn = batch_size_fn
        self.grad_sample = grad_sample
        self.baseline_every = baseline_every
        self._every = baseline_every or 1  # resolved for the device at fit start
        self._looks_back = False
        self.plot = plot
        self.spikes: list[SpikeEvent] = []
        self._disabled: set[str] = set()
        self._restored: dict[str, Any] | None = None
        self._instance = 1  # among the default-folder SpikeWatch callbacks of the trainer (see on_fit_start)
        # Checkpoint key: the class name, plus the settings that set this instance apart, so two
        # differently configured callbacks in one Trainer keep separate state (and keep it on resume).
        defaults = {"log_dir": None, "window": 128, "warmup": 20, "z_threshold": 6.0}
        chosen = {"log_dir": None if log_dir is None else str(log_dir), "window": window, "warmup": warmup}
        chosen["z_threshold"] = float(z_threshold)
        distinct = {k: v for k, v in chosen.items() if v != defaults[k]}
        self._state_key = self._generate_state_key(**distinct) if distinct else "SpikeWatch"
        self._reset_run_state()

    # ------------------------------------------------------------------ run state

    def _reset_run_state(self) -> None:
        self.detector = SpikeDetector(
            self.window,
            self.warmup,
            self.z_threshold,
            self.min_rel_spread,
            watch_grad_norm=self._policy is not None,
            baseline_window=self._baseline_rows(),
        )
        self.actions_taken: Counter[str] = Counter()
        self.stopped: dict[str, Any] | None = None  # where action="stop" ended the fit, and its checkpoint
        self._skip_list = SkipList()
        self._step_grad_norm: float | None = None
        self._repeat_this_step = False
        self._stop_entry: SkipEntry | None = None
        self.steps_watched = 0
        self.batches_watched = 0
        self.amp_skipped_steps = 0
        self.non_finite_repeats = 0
        self._non_finite_streak = False
        self._grads: GradientReader | None = None
        self._layer_history: VectorHistory | None = None
        self._layer_steps: deque[int] = deque(maxlen=self._baseline_rows())
        self._lookback: _Lookback | None = None
        self._lean = False
        self._step_counter: Any = None  # lean path: Lightning's count of optimizer steps (trainer.global_step)
        self._reports_to_loggers = False
        self._epoch_loop: Any = None  # lean path with loggers: where Lightning counts the steps it logs at
        self._batch_end_at: int | None = None  # its count at the next logging step, while batch end is skipped
        self._held_batch: Any = None  # lean path: this step's batch and its index, by reference
        self._held_idx = 0
        self._loop_batch: tuple[Any, Any] | None = None  # lean path: where Lightning keeps them (see _follow_loop)
        self._follow_loop_untried = False
        self._held_loss: torch.Tensor | None = None  # lean path: this step's loss, as training_step returned it
        self._held_host_loss: float | None = None  # lean path on CPU: that loss, read before backward
        self._open_step = -1  # lean path: the optimizer step whose first loss was seen (a closure may run several)
        self._optimizer: Any = None  # lean path: the one optimizer, for the learning rate of quiet steps
        self._backward_only = False  # CPU lean path: quiet steps are settled when their loss is read, before backward
        self._step_hook_skipped = False  # on_before_optimizer_step is None on the instance (a quiet step)
        self._may_skip_step_hook = False
        self._first_dim_is_size = False  # no batch_size_fn: a batch's size is dim 0 of its first tensor
        self._wrapped_strategy: Any = None  # lean path: the strategy whose training_step hands us the loss
        self._wrapped_training_step: Callable | None = None  # what that training_step was before
        self._strategy_had_own = False  # it was set on the strategy instance, not taken from its class
        self._held_grads: list[torch.Tensor | None] | None = None  # the last settled step's gradients, by reference
        self._settled_batch: Any = None  # the batch of the last settled step, for the lookback's evidence
        self._settled: list[_Settled] = []  # quiet steps not yet observed by the detector
        self._quiet_left = 0  # lean path: steps that may still be settled before the next general step
        self._quiet_below = _NEG_INF  # a loss under it cannot spike up to and including the next read
        self._lr_changes: dict[int, deque[tuple[int, list[float]]]] = {}
        self._lr_seen = math.nan  # the learning rate of a single float param group, as last recorded
        self._lrs_seen: list[float] | None = None  # every group's, when all are floats (None: not known)
        self._trace_lr = math.nan  # the first param group's rate, as last recorded (NaN: not known)
        self._records: list[_Batch] = []
        self._pending: list[_PendingSpike] = []
        self._sizes: Counter[int] = Counter()
        self._nominal_batch_size: int | None = None
        self._dataset_size: int | None = None
        self._previous_batch_size: int | None = None
        self._last_loss_z = math.nan
        self._log: SpikeLog | None = None
        self._resolved_log_dir: Path | None = None
        self._finished = False
        self._fit_started = False
        self._unshared: list[SpikeEvent] = []
        self._manual = False
        self._accumulate = 1
        self._epoch = 0
        self._console = get_console()  # the console Lightning's RichProgressBar draws on

    def _baseline_rows(self) -> int:
        """Rows kept of the signals read every ``_every``-th step: as many steps back as the loss window."""
        return self.window if self._every == 1 else max(self.warmup, math.ceil(self.window / self._every))

    def _resolve_every(self, pl_module: Any) -> None:
        """How often the gradient and input norms are read between spikes, for this run's device."""
        on_cpu = getattr(getattr(pl_module, "device", None), "type", "cpu") == "cpu"
        every = self.baseline_every or (CPU_BASELINE_EVERY if on_cpu else 1)
        if self._policy is not None or not pl_module.automatic_optimization:
            every = 1  # an action is decided from this step's gradient norm; manual steps read their own
        self._every = every
        self._looks_back = every > 1 and on_cpu

    def _disable(self, part: str, err: BaseException, message: str | None = None) -> None:
        """Switch ``part`` off for the rest of the run, with one warning: ``message`` where the
        failure is the user's to fix, else a request to report it."""
        if part in self._disabled:
            return
        self._disabled.add(part)
        # The lean hooks test these flags, not the set.
        if part == "watch":
            self._lean = False
            if self._step_hook_skipped:  # the class's hook, which checks the set, as off the lean path
                del self.on_before_optimizer_step
                self._step_hook_skipped = False
            self.__dict__.pop("on_before_backward", None)
            self._detach_from_strategy()
        if part == "grad_norms":
            self._looks_back = False
            self._held_grads = self._lookback = None
        if message is None:
            message = (
                f"SpikeWatch: its {part!r} part failed ({type(err).__name__}: {err}) and is switched off for the "
                "rest of this run; training continues unaffected. Please report this message."
            )
        warnings.warn(message, RuntimeWarning, stacklevel=2)

    def _attempt(self, part: str, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        """Call ``fn``; on failure disable ``part`` once and return None."""
        if part in self._disabled:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001
            self._disable(part, err)
            return None

    # ------------------------------------------------------------------ fit lifecycle

    @_safely("watch")
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self._resolve_every(pl_module)
        self._reset_run_state()
        self.spikes = []
        self._fit_started = True
        self._skip_list.rank = trainer.global_rank
        resumed = self._restored is not None
        if resumed:
            self._apply_state(self._restored)
        self._manual = not pl_module.automatic_optimization
        if self._policy is not None and self._manual:
            self._disabled.add("action")
            warnings.warn(
                f"SpikeWatch: action={self.action!r} needs automatic optimization; with manual optimization "
                "SpikeWatch only watches. Drop or clip the step in your training_step instead.",
                stacklevel=2,
            )
        self._grads = GradientReader(pl_module.named_parameters(), self.grad_sample)
        reason = sharded_reason(trainer, pl_module)
        if reason is not None:
            # Each rank holds a shard: per-layer norms and Adam state would be partial, and a replay
            # on one rank would wait forever on the others' all-gathers. Say so once, keep the rest.
            self._disabled.update({"grad_norms", "adam", "replay", "action"})
            if trainer.is_global_zero:
                rank_zero_info(
                    f"SpikeWatch: {reason}, so per-layer gradient norms, Adam state, batch replay and actions are "
                    "off; the loss, inputs, learning rate and batch composition are still watched."
                )
        if self.log_dir is None:  # a second default-folder SpikeWatch writes to spikewatch_2/, and so on
            position = next((i for i, cb in enumerate(trainer.callbacks) if cb is self), len(trainer.callbacks))
            before = trainer.callbacks[:position]
            self._instance = 1 + sum(isinstance(cb, _SpikeWatchHooks) and cb.log_dir is None for cb in before)
        # trainer.log_dir broadcasts under DDP: every rank resolves it, so the collective is symmetric.
        directory = self._attempt("export", self._resolve_log_dir, trainer)
        if directory is not None:
            self._resolved_log_dir = directory
            suffix = "" if trainer.is_global_zero else f"rank{trainer.global_rank}"
            self._log = self._attempt("export", SpikeLog, directory, resumed, self.trace_every > 0, suffix)
            if resumed:  # batches a stop set aside after the checkpoint resumed from was written
                listed = self._attempt("action", read_skip_entries, directory, suffix) or []
                self._attempt("action", self._skip_list.add, [SkipEntry.from_dict(d) for d in listed])

    def _resolve_log_dir(self, trainer: Any) -> Path:
        if self.log_dir is not None:
            return Path(self.log_dir)
        folder = "spikewatch" if self._instance == 1 else f"spikewatch_{self._instance}"
        if trainer.loggers:
            return Path(trainer.log_dir or trainer.default_root_dir) / folder
        return Path(trainer.default_root_dir) / folder

    # ------------------------------------------------------------------ checkpoints

    @property
    def state_key(self) -> str:
        # Two SpikeWatch callbacks in one Trainer need distinct keys to be checkpointed side by side.
        return self._state_key

    def state_dict(self) -> dict[str, Any]:
        """Windows, spike history and counters, so a resumed fit needs no second warm-up. Called by
        the user's checkpointing, which must not fail because of it: on an error nothing is saved
        (a resumed fit then warms up again), with one warning."""
        return self._attempt("checkpoint", self._state) or {}

    def _state(self) -> dict[str, Any]:
        self._attempt("watch", self._catch_up)
        layers = self._layer_history
        return {
            "detector": self.detector.state_dict(),
            "spikes": [event.to_dict() for event in self.spikes],
            "steps_watched": self.steps_watched,
            "batches_watched": self.batches_watched,
            "amp_skipped_steps": self.amp_skipped_steps,
            "non_finite_repeats": self.non_finite_repeats,
            "layer_history": layers.rows() if layers is not None else [],
            "skip_list": self._skip_list.state_dict(),
            "actions_taken": dict(self.actions_taken),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = dict(state_dict)
        if self._fit_started:  # strategies that restore after on_fit_start (DeepSpeed, ModelParallel)
            self._attempt("watch", self._apply_state, self._restored)

    def _apply_state(self, state: dict[str, Any]) -> None:
        self.detector.load_state_dict(state["detector"])
        self.spikes = [SpikeEvent.from_dict(d) for d in state.get("spikes", [])]
        self.steps_watched = state.get("steps_watched", 0)
        self.batches_watched = state.get("batches_watched", 0)
        self.amp_skipped_steps = state.get("amp_skipped_steps", 0)
        self.non_finite_repeats = state.get("non_finite_repeats", 0)
        self._skip_list.load_state_dict(state.get("skip_list", {}))
        self.actions_taken = Counter(state.get("actions_taken", {}))
        if state.get("layer_history"):
            self._layer_history = VectorHistory(self._baseline_rows())
            for row in state["layer_history"][-self._baseline_rows() :]:
                self._layer_history.record(row)

    @_safely("watch")
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        loader = trainer.train_dataloader
        size = getattr(loader, "batch_size", None) or getattr(
            getattr(loader, "batch_sampler", None), "batch_size", None
        )
        self._nominal_batch_size = size if isinstance(size, int) and size > 0 else None
        self._dataset_size = _dataset_length(loader)
        self._accumulate = max(1, int(trainer.accumulate_grad_batches))
        # The short per-step path: nothing to decide, undo or recognise on most steps.
        self._lean = (
            self._every > 1
            and not self._manual
            and self._accumulate == 1
            and self._policy is None
            and not self._skip_list
            and self._grads is not None
            and self._loss_scale(trainer) is None
        )
        self._step_counter = _optimizer_step_counter(trainer) if self._lean else None
        self._lean = self._step_counter is not None and len(trainer.optimizers) == 1
        self._optimizer = trainer.optimizers[0] if self._lean else None
        self._reports_to_loggers = bool(trainer.loggers) and trainer.is_global_zero
        self._epoch_loop = getattr(trainer.fit_loop, "epoch_loop", None) if self._reports_to_loggers else None
        self._follow_loop_untried = self._lean
        # On the CPU a quiet step is settled where its loss is read anyway, before backward (one call).
        self._backward_only = self._lean and self._looks_back
        self._looks_back = self._backward_only
        # A subclass that overrides the optimizer step hook has it called on every step.
        self._may_skip_step_hook = type(self).on_before_optimizer_step is _SpikeWatchHooks.on_before_optimizer_step
        self._first_dim_is_size = self.batch_size_fn is None
        self._skip_hooks(*_UNUSED_STEP_HOOKS)
        self._skip_batch_end_if_idle(trainer, at_batch_end=False)
        # Checked at the first step, by on_before_backward. Where the hook reads the loss instead (a
        # subclass overrides it, or the wrapper is not called), zero_grad has run: settled steps then
        # keep no gradients for the lookback, and the steps scored at their optimizer step still do.
        if self._lean and type(self).on_before_backward is _SpikeWatchHooks.on_before_backward:
            self._attach_to_strategy(trainer.strategy)

    def _skip_hooks(self, *names: str) -> None:
        """Have Lightning skip these hooks for the rest of fit (unless a subclass overrides them)."""
        for name in names:
            if getattr(type(self), name) is getattr(_SpikeWatchHooks, name, getattr(_CALLBACK_BASES[0], name)):
                setattr(self, name, None)

    def _skip_batch_end_if_idle(self, trainer: Any, at_batch_end: bool = True) -> None:
        """On the lean path batch end has work only while a spike waits for its outputs, and with a
        logger at Lightning's logging steps: until then Lightning skips the hook (``_see_loss`` gives
        it back at the next logging step). Called at each batch end it runs, and at train start."""
        self._batch_end_at = None
        if not self._lean or self._pending:
            return
        if not self._reports_to_loggers:
            self._skip_hooks("on_train_batch_end")
            return
        # Lightning logs at the step whose count of stepped batches c has (c + 1) % log_every_n_steps
        # == 0 (or where the fit stops: a stop set during a skipped step is not logged by SpikeWatch);
        # the count is raised after batch end. Unknown counters: the hook runs every step, as before.
        stepped = getattr(self._epoch_loop, "_batches_that_stepped", None)
        every = getattr(trainer, "log_every_n_steps", None)
        if every == 0:  # log_every_n_steps=0: Lightning never logs during fit
            self._skip_hooks("on_train_batch_end")
            return
        if type(stepped) is not int or type(every) is not int or every < 1:
            return
        upcoming = stepped + 1 if at_batch_end else stepped  # the count during the next step
        logs_at = upcoming + -(upcoming + 1) % every
        if logs_at > upcoming:
            self._batch_end_at = logs_at
            self._skip_hooks("on_train_batch_end")

    def _restore_hooks(self) -> None:
        for name in (*_UNUSED_STEP_HOOKS, *_LEAN_STEP_HOOKS):
            self.__dict__.pop(name, None)
        self._step_hook_skipped = False
        self._detach_from_strategy()

    @_safely("watch")
    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._epoch = trainer.current_epoch

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self._lean:  # references only (nothing here can fail); a record is made if the step is not quiet
            self._held_batch, self._held_idx = batch, batch_idx
            if self._follow_loop_untried:
                self._follow_loop_untried = False
                self._attempt("watch", self._follow_loop, trainer, batch, batch_idx)
            return
        self._start_batch(trainer, batch, batch_idx)

    def _follow_loop(self, trainer: Any, batch: Any, batch_idx: int) -> None:
        """From now on read the batch and its index where Lightning keeps them during the step, and
        have Lightning skip this hook: one hook call less per step. Taken only if both hold exactly
        what this first call was given (else this hook keeps running, as before)."""
        source = _loop_batch_source(trainer)
        if source is not None and source[0].batch is batch and source[1].ready - 1 == batch_idx:
            self._loop_batch = source
            self._skip_hooks("on_train_batch_start")

    @_safely("watch")
    def _start_batch(self, trainer: Any, batch: Any, batch_idx: int) -> None:
        records = self._records
        # Batches that never reach an optimizer step (training_step returned None) must not pile up.
        if len(records) >= self._accumulate:
            del records[0]
        records.append(_Batch(batch, batch_idx, trainer.global_step))

    def _read_batch(self, trainer: Any, record: _Batch) -> None:
        """Fill in what the batch itself tells (host metadata only, no device work)."""
        record.epoch = self._epoch
        record.inputs = input_tensors(record.batch, self.target_keys)
        record.input_numel = sum(t.numel() for t in record.inputs)
        record.size = self._size_of(record.batch, record.batch_idx, record.inputs)

    def _size_of(self, batch: Any, batch_idx: int, inputs: list[torch.Tensor] | None = None) -> int | None:
        """The batch size: ``batch_size_fn`` when given, else dim 0 of the first input tensor, as
        Lightning does (the quiet step reads the usual ``(x, y)`` batch's in place)."""
        if self.batch_size_fn is not None:
            return self._user_batch_size(batch, batch_idx)
        return first_dim_size(batch, self.target_keys, inputs)

    def _user_batch_size(self, batch: Any, batch_idx: int) -> int | None:
        """``batch_size_fn(batch)``, as an int. The user's function may fail on a batch it did not
        expect: then sizes are unknown (None) from here on, with one warning, and the rest goes on."""
        if "batch_size" in self._disabled:
            return None
        try:
            size = operator.index(self.batch_size_fn(batch))  # numpy and 0-dim integer tensors too
            if size < 0:
                raise ValueError(f"it returned {size}")
            return size
        except Exception as err:  # noqa: BLE001 - the user's function: the run goes on, sizes are unknown
            message = (
                f"SpikeWatch: batch_size_fn failed on batch {batch_idx} of epoch {self._epoch} "
                f"({type(err).__name__}: {err}). SpikeWatch no longer knows batch sizes for the rest of this run, "
                "so it cannot name a short batch or the sample behind a spike; all else goes on, and so does "
                "training. Make batch_size_fn return the number of samples (an int >= 0) for every batch, or "
                "leave it out to use dim 0 of the batch's first tensor."
            )
            self._disable("batch_size", err, message)
            return None

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: torch.Tensor) -> None:
        if not self._lean:
            self._keep_loss(loss)
            return
        if self._wrapped_strategy is not None:  # the first step with the strategy's training_step wrapped
            if self._open_step == self._step_counter.completed:
                self._skip_hooks("on_before_backward")  # the wrapper saw this step first: it alone reads the loss
                return
            self._detach_from_strategy()  # it did not run before this hook: this hook goes on reading the loss
        self._see_loss(loss)

    def _training_step(self, *args: Any, **kwargs: Any) -> Any:
        """Set as the strategy's ``training_step`` during fit on the lean path. Reading the loss as it
        is returned spares Lightning's call of ``on_before_backward``, which costs about as much as a
        quiet step's own work, and comes before ``zero_grad``: the previous step's gradients are still
        on the parameters, for the lookback, with no hook of our own in the optimizer's step."""
        output = self._wrapped_training_step(*args, **kwargs)
        if self._wrapped_strategy is not None and self._lean:
            try:
                loss = output if type(output) is torch.Tensor else _loss_of(output)
                if loss is not None:
                    self._see_loss(loss)
            except Exception as err:  # noqa: BLE001 - as _safely: the run goes on, watching stops
                self._disable("watch", err)
        return output

    def _attach_to_strategy(self, strategy: Any) -> None:
        """Wrap ``strategy.training_step`` with ``_training_step`` (until ``_detach_from_strategy``)."""
        self._detach_from_strategy()
        current = getattr(strategy, "training_step", None)
        if not callable(current) or not hasattr(strategy, "__dict__"):
            return
        self._wrapped_training_step, self._strategy_had_own = current, "training_step" in vars(strategy)
        self._wrapped_strategy = strategy
        strategy.training_step = self._training_step

    def _detach_from_strategy(self) -> None:
        """Give the strategy its own ``training_step`` back. If something wrapped it again after us,
        ours stays inside that wrapper, only passing the call on, until that wrapper is removed: a
        second SpikeWatch (detached after the first) then unwinds both."""
        strategy, self._wrapped_strategy = self._wrapped_strategy, None
        if strategy is None or vars(strategy).get("training_step") != self._training_step:
            return
        watch = self
        while True:
            below, had_own = watch._wrapped_training_step, watch._strategy_had_own
            watch._wrapped_training_step = None
            under = getattr(below, "__self__", None)
            passes_through = isinstance(under, _SpikeWatchHooks) and under._wrapped_strategy is None
            if not (had_own and passes_through and below == under._training_step):
                break
            watch = under  # a detached SpikeWatch's wrapper, left inside ours: unwind it too
        if had_own:
            strategy.training_step = below
        else:
            del strategy.training_step

    def _see_loss(self, loss: torch.Tensor) -> None:
        """The lean path's look at a step's loss, before backward: on the CPU a loss under the quiet
        bound settles the step here; else the step is scored at its optimizer step."""
        # The optimizer step, not the batch: the epoch's batch counter is 1 at every step of a
        # one-batch epoch (full-batch training), while a closure run again (LBFGS) keeps the step.
        step = self._step_counter.completed
        if step == self._open_step:
            return  # the same step's closure run again: its first loss decided
        self._open_step = step
        if self._batch_end_at is not None and self._epoch_loop._batches_that_stepped >= self._batch_end_at:
            self._batch_end_at = None  # a logging step: Lightning calls batch end again
            self.__dict__.pop("on_train_batch_end", None)
        source = self._loop_batch
        if source is None:  # the batch start hook runs and holds the batch
            batch, batch_idx = self._held_batch, self._held_idx
        else:  # read the batch and its index where Lightning keeps them during the step
            results, progress = source
            batch, batch_idx = results.batch, progress.ready - 1
        if not self._backward_only:  # on an accelerator the read would stall the queue: it waits for the step
            self._held_batch, self._held_idx, self._held_loss = batch, batch_idx, loss
            return
        try:
            host_loss = loss.item()  # the step's one device-to-host transfer; on the CPU it waits for nothing
            if not self._quiet_left and self._settled and self.steps_watched % self._every:
                # The bound's horizon has passed, with no read due: observe the settled steps and plan
                # the next bound here, without the general path's optimizer step hook.
                self._hold_previous_grads(step)
                self._catch_up()
                self._plan_quiet_steps()
            if _NEG_INF < host_loss < self._quiet_below:
                # Cannot be a spike: no attribution will need the previous step's gradients, which
                # zero_grad lets go next, so the lookback never holds two sets at once on such steps.
                self._held_grads = self._lookback = None
                if self._quiet_left:
                    self._settle_quietly(host_loss, batch, batch_idx, step)
                    if not self._step_hook_skipped and self._may_skip_step_hook:
                        self.on_before_optimizer_step = None  # settled: Lightning need not call it for this step
                        self._step_hook_skipped = True
                    return
            elif self._settled:
                self._hold_previous_grads(step)  # this step may spike: its catch-up makes them the lookback
        except Exception as err:  # noqa: BLE001 - as _safely: the run goes on, watching stops
            self._disable("watch", err)
            return
        self._expect_general_step(loss, host_loss, batch, batch_idx)

    def _hold_previous_grads(self, step: int) -> None:
        """Keep the gradients on the parameters by reference, if the last settled step, the one before
        ``step``, left them there: the wrapped ``training_step`` runs before ``zero_grad`` lets them go
        (``on_before_backward``, after it, finds none)."""
        if (
            self._looks_back
            and self._held_grads is None
            and self._wrapped_strategy is not None
            and self._settled[-1][0] == step - 1
        ):
            self._held_grads = list(map(_GRAD_OF, self._grads.params))

    def _expect_general_step(self, loss: torch.Tensor, host_loss: float, batch: Any, batch_idx: int) -> None:
        """A CPU step the quiet bound did not settle (a read is due, or its loss may be a spike):
        scored at its optimizer step."""
        self._held_batch, self._held_idx = batch, batch_idx
        self._held_loss, self._held_host_loss = loss, host_loss
        if self._step_hook_skipped:
            del self.on_before_optimizer_step  # the class's hook runs again from this step on
            self._step_hook_skipped = False

    @_safely("watch")
    def _keep_loss(self, loss: torch.Tensor) -> None:
        if self._records and self._records[-1].loss is None:
            # Kept as is (detached in the one stack later): scaled under fp16, divided under accumulation.
            self._records[-1].loss = loss.detach()

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        if not self._lean:
            self._evaluate_step(trainer, pl_module, optimizer)
            return
        loss, self._held_loss = self._held_loss, None
        host_loss, self._held_host_loss = self._held_host_loss, None
        if loss is None:
            return  # nothing held: the step was settled at backward, seen already, or had no backward
        if self._quiet_left and not self._backward_only:  # no read due: the loss alone may settle the step
            try:
                host_loss = loss.item()  # the one device-to-host transfer
                if _NEG_INF < host_loss < self._quiet_below:
                    self._settle_quietly(host_loss, self._held_batch, self._held_idx, self._step_counter.completed)
                    return
            except Exception as err:  # noqa: BLE001 - as _safely: the run goes on, watching stops
                self._disable("watch", err)
                return
        self._lean_general_step(trainer, pl_module, optimizer, loss, host_loss)

    @_safely("watch")
    def _lean_general_step(
        self, trainer: Any, pl_module: Any, optimizer: Any, loss: torch.Tensor, host_loss: float | None
    ) -> None:
        """A lean-path step that the quiet bound did not settle: scored (and read) as any other."""
        step = self._step_counter.completed
        self._records = [_Batch(self._held_batch, self._held_idx, step, loss=loss.detach(), host_loss=host_loss)]
        self._catch_up()  # the settled steps come first, in order
        self._evaluate_step(trainer, pl_module, optimizer)
        self._plan_quiet_steps()

    @_safely("watch")
    def _evaluate_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        """The optimizer step's work on the general path: learning rate, scoring, reading, actions."""
        self._record_lr(trainer.global_step, optimizer)
        if self._manual:
            # The detector runs at batch end, when the loss is known; one gradient read per batch.
            record = self._records[-1] if self._records else None
            if record is not None and record.layer_norms is None and "grad_norms" not in self._disabled:
                grads, record.grad_positions = self._grads.grads()
                record.layer_norms = self._attempt("grad_norms", fused_norms, grads)
            return
        records = [r for r in self._records if r.loss is not None]
        self._records = []
        if records:
            self._evaluate(trainer, pl_module, records, optimizer)
            # Cheap flags first: with no action and nothing flagged (the usual step) nothing else runs.
            # Under DDP with an action, every rank joins _act every step to agree on the step's action.
            in_step = self._pending or self._repeat_this_step or self._skip_list
            if (in_step or self._policy is not None) and (
                self._acts_every_step(trainer) or (in_step and trainer.world_size < 2)
            ):
                self._attempt("action", self._act, trainer, optimizer, records)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._end_batch(trainer, pl_module, outputs, batch)
        self._skip_batch_end_if_idle(trainer)

    @_safely("watch")
    def _end_batch(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any) -> None:
        waiting = self._records or self._pending  # batches that per-sample losses could belong to
        if waiting and (type(outputs) is dict or isinstance(outputs, Mapping)) and "per_sample_loss" in outputs:
            per_sample = outputs["per_sample_loss"]
            if isinstance(per_sample, torch.Tensor):
                for item in (*self._records, *(p.record for p in self._pending)):
                    if item.batch is batch:
                        item.per_sample_loss = per_sample.detach()
        if self._manual and self._records:
            record = self._records.pop()
            if record.loss is None and isinstance(outputs, Mapping) and isinstance(outputs.get("loss"), torch.Tensor):
                record.loss = outputs["loss"].detach()
            if record.loss is not None:
                optimizer = trainer.optimizers[0] if trainer.optimizers else None
                self._evaluate(trainer, pl_module, [record], optimizer)
        if self._pending:
            for pending in self._pending:
                self._attempt("attribution", self._finish_spike, trainer, pending)
            self._pending = []
        if self._stop_entry is not None:
            self._attempt("action", self._stop_fit, trainer)
        if trainer.loggers and trainer.is_global_zero:
            self._attempt("loggers", self._log_scalars, trainer)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self._flush_epoch(trainer)
        # Not under the "watch" guard: a collective must run on every rank or on none.
        self._attempt("distributed", self._gather, trainer)

    def _flush_epoch(self, trainer: Any) -> None:
        self._attempt("watch", self._catch_up_between_steps)
        if self._log is not None:  # also after watching failed: what was seen until then is kept
            self._attempt("export", self._log.flush_trace)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self._attempt("distributed", self._gather, trainer)
        # Not under the "watch" guard: after a failure the summary still tells what was seen until
        # then (and that watching stopped), and the files are closed.
        self._attempt("summary", self._finish, trainer)

    def _gather(self, trainer: Any) -> None:
        """Hand the events of the other ranks to rank zero: one collective per epoch, never per step."""
        if trainer.world_size < 2 or not torch.distributed.is_available() or not torch.distributed.is_initialized():
            return
        try:
            payload = [event.to_dict() for event in self._unshared]
        except Exception:  # noqa: BLE001 - the collective must still happen, with nothing to share
            payload = []
        self._unshared = []
        gathered: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, payload)
        if not trainer.is_global_zero:
            return
        known = {event.key for event in self.spikes}
        for rank_payload in gathered[1:]:
            for data in rank_payload or []:
                event = SpikeEvent.from_dict(data)
                if event.key in known:
                    continue
                known.add(event.key)
                self.spikes.append(event)
                if self._log is not None:
                    self._attempt("export", self._log.write_spike, event)
                if self.print_spikes:
                    self._attempt("console", self._announce, trainer, report.spike_line(event))
        self.spikes.sort(key=lambda event: (event.step, event.rank, event.batch_idx))

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._attempt("summary", self._finish, trainer)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._restore_hooks()  # after fit (also a failed one) every hook is the class's again

    # ------------------------------------------------------------------ per step

    def _record_lr(self, step: int, optimizer: Any, lrs: list[Any] | None = None) -> None:
        """Keep the learning rates only when they change: no per-step allocation. ``lrs``: every
        group's rate, as the quiet step has just read them (read here when not given)."""
        groups = optimizer.param_groups
        changes = self._lr_changes.get(id(optimizer))
        # The usual cases first, kept short: float rates. A per-step schedule (warm-up, cosine)
        # changes them at every step, quiet ones included, so this runs every step then.
        if changes and len(groups) == 1 and type(lr := groups[0]["lr"]) is float:
            last = changes[-1][1]
            if len(last) != 1 or last[0] != lr:
                changes.append((step, [lr]))
            self._lr_seen = self._trace_lr = lr
            self._lrs_seen = None  # one group: the quiet step compares _lr_seen
            return
        if lrs is None:
            lrs = [group["lr"] for group in groups]
        if changes and all(type(lr) is float for lr in lrs):  # several groups, e.g. with and without weight decay
            if changes[-1][1] != lrs:
                changes.append((step, lrs))
            self._lr_seen, self._lrs_seen, self._trace_lr = math.nan, lrs, lrs[0]
            return
        if any(isinstance(lr, torch.Tensor) for lr in lrs):
            if any(lr.device.type != "cpu" for lr in lrs if isinstance(lr, torch.Tensor)):
                return  # reading a learning rate kept on the GPU would cost a sync every step
            lrs = [float(lr) for lr in lrs]
        if changes is None:
            changes = self._lr_changes[id(optimizer)] = deque(maxlen=LR_LOOKBACK + 2)
        if not changes or changes[-1][1] != lrs:
            changes.append((step, [float(lr) for lr in lrs]))
        # What the quiet step compares with (NaN: always call here) and writes in its trace row.
        all_floats = all(type(group["lr"]) is float for group in groups)
        self._lr_seen = lrs[0] if len(lrs) == 1 and all_floats else math.nan
        self._lrs_seen = lrs if all_floats else None
        self._trace_lr = changes[-1][1][0] if changes[-1][1] else math.nan

    def _lr_history(self, optimizer: Any, step: int) -> list[list[float]]:
        """Per param group, the learning rate of each of the last steps up to ``step``, oldest first."""
        changes = self._lr_changes.get(id(optimizer))
        if not changes:
            return []
        per_step = []
        for s in range(step - LR_LOOKBACK, step + 1):
            earlier = [lrs for at, lrs in changes if at <= s]
            per_step.append(earlier[-1] if earlier else changes[0][1])
        return [list(values) for values in zip(*per_step)]

    def _loss_scale(self, trainer: Any) -> torch.Tensor | None:
        """The fp16 GradScaler's scale, which the loss in ``on_before_backward`` is multiplied by."""
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is None or not scaler.is_enabled():
            return None
        scale = getattr(scaler, "_scale", None)
        return scale.reshape(()) if isinstance(scale, torch.Tensor) else None

    def _read_step(self, trainer: Any, records: list[_Batch]) -> _StepNumbers:
        """One fused norm over gradients and inputs, and one transfer to the host with the losses."""
        inputs: list[torch.Tensor] = []
        for record in records:
            self._read_batch(trainer, record)
            inputs += record.inputs
        stepping, factors = records[-1], None
        if self._manual:
            grads, positions = [], stepping.grad_positions
        elif self._grads is not None and "grad_norms" not in self._disabled:
            grads, positions = self._grads.grads()
            grads, factors = self._grads.views(grads)
        else:
            grads, positions = [], None
        norms = fused_norms(grads + inputs)
        layer_norms = stepping.layer_norms if self._manual and stepping.layer_norms is not None else norms[: len(grads)]
        scale = self._loss_scale(trainer)
        scalars = [*layer_norms, *norms[len(grads) :], *(r.loss for r in records)]
        if scale is not None:
            scalars.append(scale)
        prints: list[list[torch.Tensor]] = []
        listed = self._skip_list and (trainer.world_size < 2 or self._acts_every_step(trainer))
        if listed and not self._manual and "action" not in self._disabled:
            # Batches set aside by a stop are recognised by content: a few sums ride the same transfer.
            prints = self._attempt("action", lambda: [fingerprint_tensors(tensor_leaves(r.batch)) for r in records])
            prints = prints or []
        host = to_host(scalars + [t for group in prints for t in group])  # the one device-to-host transfer
        if prints:
            host = self._take_fingerprints(records, prints, host)
        layers, rest = host[: len(layer_norms)], host[len(layer_norms) :]
        if factors is not None:  # sampled on the CPU: scale each estimate up to the full tensor
            layers = [norm * factor for norm, factor in zip(layers, factors)]
        divisor = rest.pop() if scale is not None else 1.0  # undo fp16 loss scaling ...
        factor = 1 if self._manual else self._accumulate  # ... and Lightning's division by accumulation
        losses = [loss * factor / divisor for loss in rest[len(inputs) :]]
        return _StepNumbers(layers, positions, rest[: len(inputs)], losses, scale is not None)

    @staticmethod
    def _take_fingerprints(records: list[_Batch], prints: list[list[torch.Tensor]], host: list[float]) -> list[float]:
        """Split the fingerprint sums off the end of the step's host values onto their records."""
        end = len(host) - sum(len(group) for group in prints)
        start = end
        for record, group in zip(records, prints):
            record.fingerprint = (float(record.size or -1), *host[start : start + len(group)])
            start += len(group)
        return host[:end]

    def _evaluate(self, trainer: Any, pl_module: Any, records: list[_Batch], optimizer: Any) -> None:
        """Score the step's losses; read gradient and input norms too when due or on a spike."""
        if self._reads_everything(trainer):
            self._evaluate_read(trainer, pl_module, records, optimizer, self._read_step(trainer, records))
            self._lookback = None
            return
        losses = self._read_losses(trainer, records)  # the one device-to-host transfer
        for position, (record, loss) in enumerate(zip(records, losses)):
            self._read_batch(trainer, record)
            self.batches_watched += 1
            loss_z = self.detector.observe_quietly(loss, None, None)
            if loss_z is None:  # a spike or a non-finite loss: read the rest of the step after all
                self.batches_watched -= 1
                numbers = self._read_step(trainer, records)
                self._evaluate_read(trainer, pl_module, records, optimizer, numbers, first=position)
                self._lookback = None
                return
            self._settle(record, StepSignals(loss), loss_z, optimizer, False, self.batches_watched)
        self.steps_watched += 1
        self._step_grad_norm = None
        if self._looks_back and self._grads is not None and "grad_norms" not in self._disabled:
            grads, positions = self._grads.grads()  # references: no device work unless the next step spikes
            self._lookback = _Lookback(records[-1], losses[-1], grads, positions)

    def _settle_quietly(self, loss: float, batch: Any, batch_idx: int, step: int) -> None:
        """The usual step, kept to one comparison: a loss under the detector's quiet bound cannot
        be a spike, whatever the few losses before it, so it is settled now and observed (scored,
        traced) when the bound is next planned (within ``QUIET_HORIZON`` steps), in order, with the
        same result. Only what cannot be found later is read here: the step, the batch size, a
        change of learning rate."""
        groups = self._optimizer.param_groups
        if len(groups) == 1:
            if groups[0]["lr"] != self._lr_seen:
                self._record_lr(step, self._optimizer)
        elif (lrs := [group["lr"] for group in groups]) != self._lrs_seen:  # e.g. with and without weight decay
            self._record_lr(step, self._optimizer, lrs)
        if self._first_dim_is_size and type(batch) in _SEQUENCES and batch and type(batch[0]) is torch.Tensor:
            shape = batch[0].shape  # the usual (x, y) batch, read without a call
            size = shape[0] if shape and 0 not in shape else None  # None for a scalar or an empty tensor
        else:
            size = self._size_of(batch, batch_idx)  # a flat dict batch, too, without the general walk
        self.steps_watched += 1
        self.batches_watched += 1
        self._quiet_left -= 1
        self._settled.append((step, batch_idx, size, loss, self._trace_lr))
        if self._looks_back:  # its gradients are kept at the next step if that one may spike
            self._settled_batch = batch

    def _plan_quiet_steps(self) -> None:
        """After a general step or a stretch of settled ones: how many of the next steps the quiet
        bound may settle (once warmed up, up to ``QUIET_HORIZON`` and not past the next gradient read),
        and the bound that holds for all of them and for the step after them (scored after at most
        ``left`` pushes): a loss under it cannot spike."""
        watched = self.steps_watched
        warm = watched >= self.warmup
        left = min(-watched % self._every, QUIET_HORIZON) if warm else 0
        self._quiet_left = left
        self._quiet_below = self.detector.quiet_bound(left) if warm else _NEG_INF

    def _catch_up(self) -> None:
        """Observe the steps settled by the quiet bound, in order: the detector's windows, the
        trace and the batch sizes are then as if each had been scored at once."""
        if not self._settled:
            return
        self._quiet_below = _NEG_INF  # the windows move: no bound holds until planned again
        settled, self._settled = self._settled, []
        grads, self._held_grads = self._held_grads, None  # the last settled step's: the one before this
        batch, self._settled_batch = self._settled_batch, None
        if grads is None:
            self._lookback = None
        else:
            step, batch_idx, size, loss, _ = settled[-1]
            self._lookback = _Lookback(_Batch(batch, batch_idx, step, self._epoch, size), loss, grads, None)
        first = self.batches_watched - len(settled) + 1  # the batch number of the first settled row
        traced_every = self.trace_every if self._log is not None else 0
        scored = _scored_positions(first, len(settled), traced_every)
        zscores = self.detector.observe_settled([row[3] for row in settled], scored)
        self._non_finite_streak = False
        self._last_loss_z = zscores[-1]
        self._step_grad_norm = None
        if traced_every:
            self._attempt_trace(self._log.write_settled, self._epoch, settled, zscores, first, traced_every)
        last_size = settled[-1][2]
        if last_size is None or self._nominal_batch_size is None:  # rare: look at every row
            sizes = [row[2] for row in settled if row[2] is not None]
            if sizes and self._nominal_batch_size is None:
                self._sizes.update(sizes)
            last_size = sizes[-1] if sizes else None
        if last_size is not None:
            self._previous_batch_size = last_size

    def _catch_up_between_steps(self) -> None:
        """Observe the settled steps at an epoch end or a logging step, then plan the quiet bound
        again, as after the catch-ups within a step: else the next step would take the general path.
        The last step's gradients stay on the parameters until the next ``zero_grad``: they are kept
        for the lookback, so a spike at the next step can still be pinned on this one."""
        if self._settled:
            if self._lean:
                self._hold_previous_grads(self._step_counter.completed)
            self._catch_up()
            if self._lean:
                self._plan_quiet_steps()

    def _reads_everything(self, trainer: Any) -> bool:
        """Whether this step reads gradient and input norms whatever its loss."""
        every = self._every
        if every == 1 or self._manual or self.steps_watched < self.warmup or self.steps_watched % every == 0:
            return True
        return bool(self._skip_list)  # listed batches are recognised by content, read every step

    def _read_losses(self, trainer: Any, records: list[_Batch]) -> list[float]:
        """The batches' losses on the host, unscaled and undivided, in one transfer."""
        scale = self._loss_scale(trainer)
        if scale is None and len(records) == 1:
            host = records[0].host_loss
            values = [records[0].loss.item() if host is None else host]
        else:
            values = to_host([r.loss for r in records] + ([scale] if scale is not None else []))
        divisor = values.pop() if scale is not None else 1.0
        return [value * self._accumulate / divisor for value in values]

    def _evaluate_read(
        self, trainer: Any, pl_module: Any, records: list[_Batch], optimizer: Any, numbers: _StepNumbers, first: int = 0
    ) -> None:
        """Keep the layer history, then run the detector on each batch from ``first`` on."""
        stepping, layers = records[-1], numbers.layers
        grad_norm = math.hypot(*layers) if layers else None
        if grad_norm is not None and numbers.amp_scaled and not math.isfinite(grad_norm):
            if all(math.isfinite(v) for v in numbers.losses):
                # fp16: the GradScaler skips this step and lowers its scale; routine, not a spike.
                self.amp_skipped_steps += 1
                grad_norm = None
        self._step_grad_norm = grad_norm
        if grad_norm is not None and math.isfinite(grad_norm):
            if self._layer_history is None:
                self._layer_history = VectorHistory(self._baseline_rows())
            positions = numbers.grad_positions
            self._layer_history.record(layers if positions is None else self._grads.spread(layers, positions))
            self._layer_steps.append(stepping.step)
        self.steps_watched += 1
        offset = sum(len(record.inputs) for record in records[:first])
        for record, loss in zip(records[first:], numbers.losses[first:]):
            count = len(record.inputs)
            input_rms = None
            if record.input_numel:
                squares = math.fsum(v * v for v in numbers.input_norms[offset : offset + count])
                input_rms = math.sqrt(squares / record.input_numel)
            offset += count
            if self._lookback is not None and not math.isfinite(loss):
                self._attempt("attribution", self._blame_previous_update, trainer, pl_module, optimizer)
            signals = StepSignals(loss, grad_norm if record is stepping else None, input_rms)
            self._observe(trainer, pl_module, record, signals, optimizer, record is stepping)

    def _lookback_norms(self, lookback: _Lookback) -> list[float] | None:
        """Exact per-layer norms of the gradients kept from the step before (read once, on a spike)."""
        if lookback.norms is None and self._grads is not None:
            grads, positions = lookback.grads, lookback.positions
            if positions is None and any(g is None for g in grads):  # some parameters had no gradient
                positions = [i for i, g in enumerate(grads) if g is not None]
                grads = [grads[i] for i in positions]
            params = self._grads.params
            if positions is not None:
                params = [params[i] for i in positions]
            if any(p.grad is g for p, g in zip(params, grads)):
                return None  # zeroed in place and filled again: they hold this step's gradient now
            lookback.norms = self._grads.spread(to_host(fused_norms(grads)), positions)
        return lookback.norms

    def _previous_layers(self, step: int) -> list[float] | None:
        """Per-layer gradient norms of optimizer step ``step - 1``, when they were read or kept."""
        lookback, history, steps = self._lookback, self._layer_history, self._layer_steps
        if lookback is not None and lookback.record.step == step - 1:
            return self._lookback_norms(lookback)
        if history is None:
            return None
        for back in range(min(2, len(steps))):  # rows and their steps line up from the newest
            if steps[-1 - back] == step - 1:
                return history.latest(back)
        if not steps and self._every == 1:  # rows restored from a checkpoint carry no step
            return history.latest(1)
        return None

    def _blame_previous_update(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        """A non-finite loss right after an unread step: if that step's gradients were non-finite,
        its update broke the weights. Report that step (as an every-step read would have) and let
        this loss count as its repeat."""
        lookback, self._lookback = self._lookback, None
        norms = self._lookback_norms(lookback)
        if norms is None or all(math.isfinite(norm) for norm in norms):
            return
        loss_z, loss_median, loss_spread = self.detector.windows["loss"].score(lookback.loss)
        verdict = Verdict(True, {"loss": loss_z}, {"loss": loss_median}, loss_spread, (), ("grad_norm",))
        signals = StepSignals(lookback.loss, math.nan, None)
        self._start_spike(trainer, pl_module, lookback.record, verdict, signals, optimizer, True, lookback)
        self._non_finite_streak = True

    def _observe(
        self, trainer: Any, pl_module: Any, record: _Batch, signals: StepSignals, optimizer: Any, stepping: bool
    ) -> None:
        """The detector on one batch; the quiet case allocates nothing and returns at once."""
        self.batches_watched += 1
        loss_z = self.detector.observe_quietly(signals.loss, signals.grad_norm, signals.input_rms)
        is_spike = False
        if loss_z is None:  # a spike, or a non-finite value: the full verdict
            verdict = self.detector.observe(signals)
            loss_z, is_spike = verdict.loss_z, verdict.is_spike
            if is_spike:
                self._on_flagged(trainer, pl_module, record, verdict, signals, optimizer, stepping)
        self._settle(record, signals, loss_z, optimizer, is_spike, self.batches_watched)

    def _settle(
        self,
        record: _Batch,
        signals: StepSignals,
        loss_z: float,
        optimizer: Any,
        is_spike: bool,
        number: int,
    ) -> None:
        """Bookkeeping after the detector's decision on the ``number``-th batch: streaks, the trace, batch sizes."""
        if not is_spike:
            self._non_finite_streak = False
        self._last_loss_z = loss_z
        if self._log is not None and self.trace_every:
            # Spikes always; and, where the gradient norm is read only every few steps (the CPU),
            # each step that read it, so that the trace's gradient-norm curve is not thinned twice.
            if number % self.trace_every == 0 or is_spike or (signals.grad_norm is not None and self._every > 1):
                self._trace(record, signals, loss_z, optimizer, is_spike)
        if record.size is not None:
            if self._nominal_batch_size is None:
                self._sizes[record.size] += 1
            self._previous_batch_size = record.size

    def _trace(self, record: _Batch, signals: StepSignals, loss_z: float, optimizer: Any, is_spike: bool) -> None:
        lr = None
        for at, lrs in reversed(self._lr_changes.get(id(optimizer), ())):  # the rate in force at the row's step
            if at <= record.step:
                lr = lrs[0] if lrs else None
                break
        numbers = (signals.loss, loss_z, signals.grad_norm, signals.input_rms)
        self._attempt_trace(
            self._log.write_step, record.step, record.epoch, record.batch_idx, *numbers, record.size, lr, is_spike
        )

    def _attempt_trace(self, write: Callable, *args: Any) -> None:
        try:
            write(*args)
        except Exception as err:  # noqa: BLE001 - a full disk stops the files, not the run
            self._disable("export", err)
            self._log = None

    def _on_flagged(
        self,
        trainer: Any,
        pl_module: Any,
        record: _Batch,
        verdict: Verdict,
        signals: StepSignals,
        optimizer: Any,
        is_stepping: bool,
    ) -> None:
        repeat = bool(verdict.non_finite) and self._non_finite_streak
        self._non_finite_streak = bool(verdict.non_finite)
        if repeat:
            # Once weights are NaN every later loss is too: report the first, count the rest.
            self.non_finite_repeats += 1
            self._repeat_this_step = True
        else:
            args = (trainer, pl_module, record, verdict, signals, optimizer, is_stepping)
            self._attempt("attribution", self._start_spike, *args)

    # ------------------------------------------------------------------ opt-in actions

    def _act(self, trainer: Any, optimizer: Any, records: list[_Batch]) -> None:
        """Decide and apply this step's action before the optimizer uses the gradients.

        The decision needs nothing new from the device: the step's numbers are on the host
        already. Under DDP every rank must do the same, so the strongest wish is all-reduced.
        """
        repeat, self._repeat_this_step = self._repeat_this_step, False
        taken: ActionTaken | None = None
        listed_records = []
        for record in records:
            entry = self._skip_list.match(record.fingerprint) if record.fingerprint and self._skip_list else None
            if entry is not None:
                listed_records.append(record)
                reason = f"listed in the skip file by the stop at step {entry.step}"
                taken = stronger(taken, ActionTaken(Action.SKIP, reason))
                self.actions_taken["skip_listed"] += 1
                if self.print_spikes and trainer.is_global_zero:
                    self._announce(trainer, report.listed_skip_line(record.step, entry.to_dict()))
        step_pending = [p for p in self._pending if any(p.record is r for r in records)]
        # A listed batch is skipped as listed: its spike must not stop the resumed fit all over again.
        to_decide = [p for p in step_pending if not any(p.record is r for r in listed_records)]
        policy = self._policy if "action" not in self._disabled else None
        if policy is not None and isinstance(optimizer, torch.optim.LBFGS):
            self._disabled.add("action")
            warnings.warn(
                "SpikeWatch: actions are off for LBFGS, which re-evaluates the batch many times per step.",
                stacklevel=2,
            )
            policy = None
        bound = self.detector.grad_norm_bound() if policy is not None else None
        wished = None
        for pending in to_decide if policy is not None else ():
            ranked = rank_causes(pending.context)
            cause = ranked[0].cause if ranked else Cause.MINIBATCH_NOISE
            grad_norm, layers = self._step_grad_norm, pending.context.layers
            if grad_norm is not None and math.isfinite(grad_norm) and layers is not None:
                grad_norm = math.hypot(*layers.current)  # exact, where the per-step norm was sampled
            decided = policy.decide(cause, grad_norm, bound)
            if decided is not None and decided.action is Action.STOP and self._stop_entry is None:
                self._stop_entry = self._skip_entry(trainer, pending.record, cause)
            wished = stronger(wished, decided)
        if repeat and policy is not None:
            wished = stronger(wished, policy.decide(Cause.NON_FINITE, math.nan, bound))
        listed = taken
        taken = self._agree_across_ranks(trainer, stronger(taken, wished))
        if taken is None:
            return
        if taken.action is Action.CLIP and bound is not None:
            clip_gradients(optimizer, bound)
        elif taken.action is not Action.CLIP:
            drop_update(optimizer, self._can_remove_gradients(trainer, optimizer))
        if taken.action is Action.STOP and self._stop_entry is None:
            self._stop_entry = self._skip_entry(trainer, records[-1], None)
        if taken is not listed:  # a listed skip is counted as such above
            self.actions_taken[taken.action.value] += 1
        for pending in step_pending:
            pending.action = taken

    def _acts_every_step(self, trainer: Any) -> bool:
        """Under DDP with an action, every rank joins one tiny all-reduce per step in ``_act``.

        Decided from settings that every rank shares, so that all ranks join or none does. Without
        an action, a DDP run only watches (batches listed to skip are then left alone).
        """
        if self._policy is None or "action" in self._disabled or trainer.world_size < 2:
            return False
        return torch.distributed.is_available() and torch.distributed.is_initialized()

    def _agree_across_ranks(self, trainer: Any, taken: ActionTaken | None) -> ActionTaken | None:
        """Under DDP, the strongest action any rank wants, so that the replicas stay identical."""
        if not self._acts_every_step(trainer):
            return taken
        codes = {strength: action for action, strength in STRENGTH.items()}
        mine = STRENGTH[taken.action] if taken is not None else 0
        wish = torch.tensor([mine], dtype=torch.int32, device=trainer.strategy.root_device)
        torch.distributed.all_reduce(wish, op=torch.distributed.ReduceOp.MAX)
        agreed = int(wish.item())  # a sync only with an action enabled under DDP
        if agreed == mine:
            return taken
        return ActionTaken(codes[agreed], "taken on every rank because another rank's batch asked for it")

    def _can_remove_gradients(self, trainer: Any, optimizer: Any) -> bool:
        """Whether dropping the update may set the gradients to None (an exact skip)."""
        if not drops_missing_gradients(optimizer):
            return False
        # A fused optimizer under an fp16 GradScaler unscales inside step() and needs gradients there.
        return self._loss_scale(trainer) is None or not getattr(optimizer, "_step_supports_amp_scaling", False)

    def _skip_entry(self, trainer: Any, record: _Batch, cause: Cause | None) -> SkipEntry:
        leaves = tensor_leaves(record.batch)
        fingerprint = record.fingerprint or (float(record.size or -1), *to_host(fingerprint_tensors(leaves) or []))
        indices = dataset_indices(record.batch, self.index_keys, record.size) if record.size else None
        return SkipEntry(
            step=record.step,
            epoch=record.epoch,
            batch_idx=record.batch_idx,
            fingerprint=tuple(fingerprint),
            rank=trainer.global_rank,
            indices=indices,
            cause=cause.value if cause is not None else None,
        )

    def _stop_fit(self, trainer: Any) -> None:
        """End the fit after a stop: list the batch, save a checkpoint without its update, stop."""
        entry, self._stop_entry = self._stop_entry, None
        self._skip_list.add([entry])  # kept in the checkpoint: a resume from it skips the batch again
        skip_file = self._log.write_skip(entry.to_dict()) if self._log is not None else None
        directory = self._resolved_log_dir or Path(trainer.default_root_dir)
        checkpoint = directory / f"stop_step{entry.step}.ckpt"
        trainer.save_checkpoint(checkpoint)  # on every rank: DDP writes once, after a barrier
        trainer.should_stop = True
        self.stopped = {"step": entry.step, "cause": entry.cause, "checkpoint": str(checkpoint)}
        if skip_file is not None:
            self.stopped["skip_file"] = str(skip_file)
        if trainer.is_global_zero and (self.print_spikes or self.print_summary):
            self._announce(trainer, report.stop_line(self.stopped))

    # ------------------------------------------------------------------ on a spike

    def _start_spike(
        self,
        trainer: Any,
        pl_module: Any,
        record: _Batch,
        verdict: Verdict,
        observed: StepSignals,
        optimizer: Any,
        is_stepping_batch: bool,
        lookback: _Lookback | None = None,
    ) -> None:
        """Gather the evidence that must be read before the optimizer steps (weights, Adam state).

        With ``lookback`` the spike is the step before this one, found late: its gradients were
        kept, but the weights and Adam state have moved on, so neither is read nor replayed.
        """
        input_z = verdict.zscores.get("input_rms")
        leaves = tensor_leaves(record.batch)
        is_last = is_stepping_batch and lookback is None
        is_last = is_last and bool(trainer.fit_loop.epoch_loop.batch_progress.is_last_batch)
        nominal = self._nominal_batch_size or self._observed_mode_size()
        indices = dataset_indices(record.batch, self.index_keys, record.size) if record.size else None
        context = SpikeContext(
            loss=observed.loss,
            loss_median=verdict.medians.get("loss", math.nan),
            loss_z=verdict.loss_z,
            loss_spread=verdict.loss_spread,
            z_threshold=self.z_threshold,
            batch_size=record.size,
            nominal_batch_size=nominal,
            previous_batch_size=self._previous_batch_size,
            is_last_batch=is_last,
            dataset_size=self._dataset_size,
            input_rms=observed.input_rms,
            input_rms_median=verdict.medians.get("input_rms"),
            input_rms_z=input_z,
            non_finite=verdict.non_finite,
        )
        if input_z is not None and input_z >= self.z_threshold and record.size:
            position = self._attempt("inputs", largest_input_position, record.inputs, record.size)
            if position is not None:
                context.input_rms_sample = indices[position] if indices else position
        if optimizer is not None:
            context.lr_history = self._lr_history(optimizer, record.step)
            if is_stepping_batch and not self._manual and lookback is None:
                context.adam = self._attempt("adam", adam_layers, optimizer, self._grads.name_of if self._grads else {})
        history = self._layer_history
        if lookback is not None and history is not None and history.count and self._grads is not None:
            current = self._lookback_norms(lookback)
            if current is not None:
                context.layers = LayerGradients(self._grads.names, current, history.typical(), None)
        elif is_stepping_batch and history is not None and history.count >= 2 and self._grads is not None:
            steps = self._layer_steps
            current = history.latest(0) if steps and steps[-1] == record.step else None
            previous = self._previous_layers(record.step)
            if current is None or self._grads.sampled:  # this step's exact norms (estimates stay in the history)
                grads, positions = self._grads.grads()
                current = self._grads.spread(to_host(fused_norms(grads)), positions)
            context.layers = LayerGradients(self._grads.names, current, history.typical(), previous)
        if record.size:
            index_tensor = index_value(record.batch, self.index_keys)
            index_tensor = index_tensor if isinstance(index_tensor, torch.Tensor) else None
            exclude = [index_tensor] if index_tensor is not None else []
            context.class_counts = self._attempt("inputs", class_counts, leaves, record.size, exclude)
            context.has_integer_targets = any(
                not leaf.is_floating_point()
                and leaf.ndim > 0
                and leaf.shape[0] == record.size
                and leaf is not index_tensor
                for leaf in leaves
            )
        if record.per_sample_loss is None and lookback is None and self._can_replay(trainer, record):
            context.samples = self._attempt("replay", self._replay, trainer, pl_module, record, context.loss, indices)
        signals = list(verdict.outliers) + [
            f"non_finite:{name}" for name in verdict.non_finite if name not in verdict.outliers
        ]
        self._pending.append(_PendingSpike(record, context, signals, self._layer_snapshot(context, record.step)))
        self.__dict__.pop("on_train_batch_end", None)  # the event is completed there, with the step's outputs

    def _layer_snapshot(
        self, context: SpikeContext, step: int, rows: int = LAYER_SNAPSHOT_ROWS
    ) -> dict[str, Any] | None:
        """The per-layer norms read up to the spiking step (every step, or every n-th and the last two)."""
        history = self._layer_history
        if history is None or self._grads is None or not history.count:
            return None
        kept = min(rows, history.count)
        norms = [history.latest(back) for back in range(kept - 1, -1, -1)]
        steps = list(self._layer_steps)[-kept:]
        steps = [None] * (kept - len(steps)) + steps  # rows restored from a checkpoint carry no step
        layers = context.layers
        if layers is not None:  # exact norms of the spiking step replace its estimate
            if steps[-1] == step or (steps[-1] is None and self._every == 1):
                norms[-1] = list(layers.current)
            else:  # found from the previous step's kept gradients: not in the history
                steps.append(step)
                norms.append(list(layers.current))
            if layers.previous is not None and step - 1 not in steps:
                steps.insert(-1, step - 1)
                norms.insert(-1, list(layers.previous))
            steps, norms = steps[-rows:], norms[-rows:]
        return {"names": self._grads.names, "steps": steps, "norms": norms}

    def _finish_spike(self, trainer: Any, pending: _PendingSpike) -> None:
        """Complete the evidence with per-sample losses from the outputs, rank the causes, report."""
        record, context = pending.record, pending.context
        if record.per_sample_loss is not None and record.size:
            context.samples = self._attempt("attribution", _samples_from_losses, record, self.index_keys)
        causes = rank_causes(context)
        event = SpikeEvent(
            step=record.step,
            epoch=record.epoch,
            batch_idx=record.batch_idx,
            loss=context.loss,
            zscore=context.loss_z,
            signals=pending.signals,
            causes=causes,
            rank=trainer.global_rank,
            action=pending.action.to_dict() if pending.action is not None else None,
        )
        if event.key in {e.key for e in self.spikes[-16:]}:
            return  # found again after resuming from a checkpoint taken before it
        self.spikes.append(event)
        if not trainer.is_global_zero:
            self._unshared.append(event)  # handed to rank zero at the end of the epoch
        if self._log is not None:
            self._attempt("export", self._log.write_spike, event)
            if pending.layers is not None:
                self._attempt(
                    "export", self._log.write_layers, {"step": event.step, "rank": event.rank, **pending.layers}
                )
        if self.print_spikes and trainer.is_global_zero:
            self._attempt("console", self._announce, trainer, report.spike_line(event))

    def _can_replay(self, trainer: Any, record: _Batch) -> bool:
        if not self.replay or self.max_replays < 2 or self._manual or not record.size or record.size < 2:
            return False
        if trainer.world_size > 1 and any(
            "SyncBatchNorm" in type(m).__name__ for m in trainer.lightning_module.modules()
        ):
            return False  # a replay on one rank would wait forever on SyncBatchNorm's collective
        return True

    def _replay(
        self, trainer: Any, pl_module: Any, record: _Batch, loss: float, indices: list[int] | None
    ) -> SampleLosses:
        size = record.size
        takes_batch_idx = training_step_takes_batch_idx(pl_module)

        def loss_sum_of(positions: Sequence[int]) -> float | None:
            sub_batch = slice_batch(record.batch, positions, size)
            try:
                with trainer.precision_plugin.train_step_context():
                    args = (sub_batch, record.batch_idx) if takes_batch_idx else (sub_batch,)
                    sub_loss = loss_from_output(pl_module.training_step(*args))
            except Exception:  # noqa: BLE001 - a sub-batch the model cannot take means "cannot split further"
                return None
            return None if sub_loss is None else float(sub_loss.float().mean()) * len(positions)

        with preserved_training_state(pl_module):
            found = find_dominant_samples(loss_sum_of, size, loss * size, TOP_SAMPLES, self.max_replays)
        top = [
            SampleLoss(
                position=group.positions[0],
                loss=group.loss_sum / len(group.positions),
                index=indices[group.positions[0]] if indices and len(group.positions) == 1 else None,
                size=len(group.positions),
            )
            for group in found.groups
        ]
        return SampleLosses(size, loss * size, top, "replay", found.note)

    def _announce(self, trainer: Any, line: Text) -> None:
        bar = trainer.progress_bar_callback
        if bar is not None and type(bar).__name__ != "RichProgressBar":
            bar.print(line.plain)  # tqdm.write keeps the bar intact
        else:
            self._console.print(line, soft_wrap=True)  # one line in a log file, however wide

    def _log_scalars(self, trainer: Any) -> None:
        if not trainer.loggers or not trainer._logger_connector.should_update_logs:
            return
        self._catch_up_between_steps()  # the loss z logged is the latest one
        step = getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", trainer.global_step)
        metrics = {"spikewatch/spikes": float(len(self.spikes))}
        if math.isfinite(self._last_loss_z):
            metrics["spikewatch/loss_z"] = self._last_loss_z
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    # ------------------------------------------------------------------ end of fit

    def summary(self) -> dict[str, Any]:
        """Counts and settings of this run, as written to summary.json."""
        self._attempt("watch", self._catch_up)
        return {
            "steps_watched": self.steps_watched,
            "batches_watched": self.batches_watched,
            "spikes": len(self.spikes),
            "causes": dict(Counter(event.cause for event in self.spikes).most_common()),
            "amp_skipped_steps": self.amp_skipped_steps,
            "non_finite_repeats": self.non_finite_repeats,
            "actions": dict(self.actions_taken),
            "stopped": self.stopped,
            "disabled": sorted(self._disabled),
            "settings": {
                "window": self.window,
                "warmup": self.warmup,
                "z_threshold": self.z_threshold,
                "min_rel_spread": self.min_rel_spread,
                "replay": self.replay,
                "max_replays": self.max_replays,
                "baseline_every": self._every,
                "action": self.action,
                "act_on": list(self.act_on) if self.act_on is not None else None,
            },
            "worst": [e.to_dict() for e in sorted(self.spikes, key=_severity, reverse=True)[:10]],
        }

    def _finish(self, trainer: Any) -> None:
        if self._finished:
            return
        self._finished = True
        summary = self.summary()
        if self._log is not None:
            self._attempt("export", self._log.write_summary, summary)
            self._attempt("export", self._log.close)
        if not trainer.is_global_zero:
            return
        if self.print_summary:
            self._attempt("console", report.print_summary, summary, self.spikes, self._console)
        figure = self._attempt("plot", self._plot) if self.plot else None
        if trainer.loggers:
            self._attempt("loggers", self._log_results, trainer, summary, figure)

    def _plot(self) -> Any:
        from lightning_spikewatch.logdir import load
        from lightning_spikewatch.plot import MISSING_MATPLOTLIB, draw, matplotlib_available

        if not matplotlib_available():
            warnings.warn(f"SpikeWatch: plot=True but {MISSING_MATPLOTLIB}; no plot was drawn.", stacklevel=2)
            return None
        if self._resolved_log_dir is None or self.trace_every == 0:
            return None
        return draw(load(self._resolved_log_dir), self._resolved_log_dir / PLOT_FILE)

    def _log_results(self, trainer: Any, summary: dict[str, Any], figure: Any) -> None:
        """Spike counts per cause as scalars, the table as text, and the figure, where users already look."""
        counts = {f"spikewatch/cause/{cause}": float(n) for cause, n in summary["causes"].items()}
        counts["spikewatch/spikes_total"] = float(summary["spikes"])
        counts.update({f"spikewatch/action/{kind}": float(n) for kind, n in summary["actions"].items()})
        table = report.markdown_table(self.spikes)
        for logger in trainer.loggers:
            logger.log_metrics(counts, step=trainer.global_step)
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_text"):  # TensorBoard
                experiment.add_text("spikewatch/spikes", table, global_step=trainer.global_step)
                if figure is not None and hasattr(experiment, "add_figure"):
                    experiment.add_figure("spikewatch/spikes", figure, global_step=trainer.global_step)
            elif type(logger).__name__ == "CSVLogger" and logger.log_dir:
                (Path(logger.log_dir) / "spikewatch_spikes.md").write_text(table + "\n", encoding="utf-8")
            logger.save()

    def _observed_mode_size(self) -> int | None:
        if sum(self._sizes.values()) < self.warmup:
            return None
        return self._sizes.most_common(1)[0][0]

    @property
    def resolved_log_dir(self) -> Path | None:
        """The folder the exports went to in the last fit (None before fit or on non-zero ranks)."""
        return self._resolved_log_dir


SHARDED_STRATEGIES = ("FSDPStrategy", "ModelParallelStrategy", "DeepSpeedStrategy", "XLAFSDPStrategy")


def _optimizer_step_counter(trainer: Any) -> Any:
    """The progress record whose ``completed`` is ``trainer.global_step`` under automatic
    optimization, so the quiet step reads one attribute instead of a chain of properties; None
    where this Lightning version keeps it elsewhere (the lean path is then not taken)."""
    try:
        counter = trainer.fit_loop.epoch_loop.automatic_optimization.optim_progress.optimizer.step.total
        return counter if counter.completed == trainer.global_step else None
    except AttributeError:
        return None


def _loss_of(output: Any) -> torch.Tensor | None:
    """The loss in a ``training_step`` output that is not a bare tensor: a mapping's ``"loss"``, as
    Lightning takes it; None for anything else (``None`` skips the step)."""
    if isinstance(output, Mapping):
        loss = output.get("loss")
        return loss if isinstance(loss, torch.Tensor) else None
    return output if isinstance(output, torch.Tensor) else None


def _loop_batch_source(trainer: Any) -> tuple[Any, Any] | None:
    """Where Lightning keeps the current training batch (``trainer._results.batch``, set at batch
    start for logging and cleared at batch end) and the count whose ``ready - 1`` is its index; None
    where this Lightning version keeps them elsewhere."""
    try:
        results = trainer.fit_loop._results
        progress = trainer.fit_loop.epoch_loop.batch_progress.current
        return (results, progress) if results is trainer._results and hasattr(results, "batch") else None
    except AttributeError:
        return None


def sharded_reason(trainer: Any, pl_module: Any) -> str | None:
    """Why gradients and optimizer state are sharded across ranks in this run, or None."""
    name = type(trainer.strategy).__name__
    if name in SHARDED_STRATEGIES:
        return f"the {name} shards parameters across ranks"
    if any(type(p).__name__ == "DTensor" for p in pl_module.parameters()):
        return "parameters are sharded DTensors"
    return None


def rank_zero_info(message: str) -> None:
    logging.getLogger("lightning_spikewatch").warning(message)


def _severity(event: SpikeEvent) -> float:
    return math.inf if math.isnan(event.zscore) else event.zscore


def _samples_from_losses(record: _Batch, index_keys: Sequence[str]) -> SampleLosses | None:
    losses = record.per_sample_loss.float().flatten()
    if losses.numel() != record.size:
        return None
    k = min(TOP_SAMPLES, losses.numel())
    values, positions = torch.topk(torch.nan_to_num(losses, nan=math.inf), k)
    host = torch.cat([values, positions.float(), losses.sum().reshape(1)]).tolist()
    indices = dataset_indices(record.batch, index_keys, record.size)
    top = [
        SampleLoss(position=int(p), loss=v, index=indices[int(p)] if indices else None)
        for v, p in zip(host[:k], host[k : 2 * k])
    ]
    return SampleLosses(record.size, host[-1], top, "per_sample_loss")


def _scored_positions(first: int, count: int, every: int) -> set[int] | None:
    """Which of ``count`` settled rows, the first being batch number ``first``, need their loss z:
    the rows the trace keeps (every ``every``-th batch; 0: no trace) and the last, which is the
    current z. None: all of them."""
    if every == 1:
        return None
    positions = set(kept_rows(first, count, every)) if every else set()
    positions.add(count - 1)
    return positions


def _dataset_length(loader: Any) -> int | None:
    for source in (getattr(getattr(loader, "batch_sampler", None), "sampler", None), getattr(loader, "sampler", None)):
        try:
            if source is not None:
                return len(source)
        except TypeError:
            pass
    try:
        return len(loader.dataset)
    except (TypeError, AttributeError):
        return None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check(ok: bool, name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ValueError(f"SpikeWatch: `{name}={value!r}` is not valid; expected {allowed}.")


def _callback_bases() -> tuple[type, ...]:
    """The Lightning ``Callback`` classes installed: one SpikeWatch class serves both namespaces."""
    bases = []
    for module in ("lightning.pytorch", "pytorch_lightning"):
        try:
            bases.append(importlib.import_module(module).Callback)
        except ImportError:
            continue
    if not bases:
        raise ImportError("SpikeWatch needs `lightning` or `pytorch-lightning`: pip install pytorch-lightning")
    return tuple(bases)


_CALLBACK_BASES = _callback_bases()


class SpikeWatch(_SpikeWatchHooks, *_CALLBACK_BASES):
    __doc__ = _SpikeWatchHooks.__doc__
