"""The detector on synthetic series: planted spikes found, clean and trending series quiet."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_spikewatch.detector import SpikeDetector, StepSignals


def run(series, threshold=6.0, **kwargs):
    detector = SpikeDetector(z_threshold=threshold, **kwargs)
    return [i for i, v in enumerate(series) if detector.observe(StepSignals(loss=float(v))).is_spike]


@pytest.mark.parametrize("seed", range(5))
def test_planted_spikes_are_found_and_nothing_else(seed):
    rng = np.random.default_rng(seed)
    series = 1.0 + 0.05 * rng.standard_normal(2000)
    planted = [300, 901, 1500]
    for i in planted:
        series[i] *= 3.0
    assert run(series) == planted


@pytest.mark.parametrize("seed", range(5))
def test_noisy_decreasing_loss_curve_is_quiet(seed):
    rng = np.random.default_rng(seed)
    steps = np.arange(5000)
    curve = 2.0 * np.exp(-steps / 800) + 0.1
    series = curve * np.exp(0.1 * rng.standard_normal(len(steps)))  # multiplicative noise, like batch losses
    assert run(series) == []


def test_upward_trend_without_jumps_is_quiet():
    series = np.linspace(1.0, 3.0, 3000) + 0.01 * np.sin(np.arange(3000))
    assert run(series) == []


def test_dips_are_never_spikes():
    series = np.ones(500)
    series[200] = 0.01
    assert run(series) == []


def test_nothing_is_flagged_during_warmup_except_non_finite():
    series = [1.0, 1.0, 1.0, 50.0, 1.0, math.nan]
    assert run(series, warmup=10) == [5]


def test_non_finite_losses_stay_out_of_the_window():
    detector = SpikeDetector(warmup=3)
    for v in [1.0, 1.0, math.inf, 1.0, math.nan]:
        verdict = detector.observe(StepSignals(loss=v))
    assert verdict.non_finite == ("loss",)
    assert detector.windows["loss"].values() == [1.0, 1.0, 1.0]


def test_other_signals_are_listed_when_they_are_outliers_too():
    detector = SpikeDetector(warmup=5)
    for i in range(50):
        detector.observe(StepSignals(loss=1.0 + 0.01 * (i % 3), grad_norm=0.5 + 0.01 * (i % 5), input_rms=3.0))
    verdict = detector.observe(StepSignals(loss=5.0, grad_norm=50.0, input_rms=3.0))
    assert verdict.is_spike and verdict.outliers == ("loss", "grad_norm")
    verdict = detector.observe(StepSignals(loss=1.0, grad_norm=50.0, input_rms=3.0))
    assert not verdict.is_spike  # a gradient outlier alone is not a loss spike


def test_memory_is_bounded_by_the_window():
    detector = SpikeDetector(window=64)
    for i in range(10_000):
        detector.observe(StepSignals(loss=1.0 + (i % 7) * 0.01, grad_norm=1.0, input_rms=1.0))
    assert all(len(w) == 64 for w in detector.windows.values())


def test_state_round_trip_continues_without_second_warmup():
    detector = SpikeDetector(warmup=20)
    for _ in range(30):
        detector.observe(StepSignals(loss=1.0))
    resumed = SpikeDetector(warmup=20)
    resumed.load_state_dict(detector.state_dict())
    assert resumed.observe(StepSignals(loss=10.0)).is_spike


def reference_spikes(series, window=128, warmup=20, threshold=6.0, min_rel_spread=0.02):
    """Straightforward numpy reference: exact median and MAD over the last `window` finite values."""
    history, spikes = [], []
    for i, x in enumerate(series):
        if not math.isfinite(x):
            spikes.append(i)
            continue
        if len(history) >= warmup:
            past = np.array(history[-window:])
            median = np.median(past)
            spread = max(np.median(np.abs(past - median)), min_rel_spread * abs(median), 1e-12)
            if (x - median) / (1.4826 * spread) >= threshold:
                spikes.append(i)
        history.append(x)
    return spikes


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.floats(min_value=0.01, max_value=100.0), min_size=30, max_size=400),
    st.floats(min_value=1.5, max_value=8.0),
)
def test_cached_mad_gives_exactly_the_reference_decisions(series, threshold):
    assert run(series, threshold=threshold) == reference_spikes(series, threshold=threshold)


@pytest.mark.parametrize("quietly", [False, True], ids=["observe", "observe_quietly"])
def test_gradient_norm_outlier_is_a_spike_only_when_watched(quietly):
    rng = np.random.default_rng(0)
    losses, norms = 1.0 + 0.05 * rng.standard_normal(200), 2.0 + 0.1 * rng.standard_normal(200)
    norms[150] = 200.0  # the gradient blew up; the loss has not moved yet
    for watched in (False, True):
        detector = SpikeDetector(watch_grad_norm=watched)
        flagged = []
        for i, (loss, norm) in enumerate(zip(losses, norms)):
            if quietly and detector.observe_quietly(float(loss), float(norm), None) is not None:
                continue
            verdict = detector.observe(StepSignals(float(loss), float(norm)))
            if verdict.is_spike:
                flagged.append((i, verdict.outliers))
        assert flagged == ([(150, ("grad_norm",))] if watched else [])


def test_gradient_norm_bound_is_the_largest_norm_that_is_not_an_outlier():
    detector = SpikeDetector(watch_grad_norm=True, z_threshold=6.0)
    assert detector.grad_norm_bound() is None  # before warm-up
    for i in range(100):
        detector.observe(StepSignals(1.0, 2.0 + 0.01 * (i % 11 - 5)))
    bound = detector.grad_norm_bound()
    window = detector.windows["grad_norm"]
    assert window.zscore(bound) == pytest.approx(6.0)
    assert window.zscore(bound * 1.001) > 6.0


def test_baseline_window_bounds_the_signals_read_every_few_steps_but_not_the_loss():
    detector = SpikeDetector(window=64, warmup=5, baseline_window=10)
    for i in range(100):
        detector.observe(StepSignals(1.0 + 0.01 * (i % 3), 2.0, 3.0 + i))
    assert len(detector.windows["loss"]) == 64
    assert len(detector.windows["grad_norm"]) == len(detector.windows["input_rms"]) == 10
    assert detector.windows["input_rms"].values() == [3.0 + i for i in range(90, 100)]  # the newest kept
    watched = SpikeDetector(window=64, warmup=5, watch_grad_norm=True, baseline_window=10)
    assert watched.windows["grad_norm"].size == 64  # scored every step: a full window


def deferred_run(series, every, window=64, threshold=6.0):
    """The callback's lean protocol: a loss under the quiet bound is settled at once and observed
    later, in order; any other loss first observes the deferred ones, then is observed itself."""
    detector, deferred, bound = SpikeDetector(window=window, z_threshold=threshold), [], None
    zscores, spikes, settled_early = [], [], 0

    def catch_up():
        nonlocal bound
        settled_z = detector.observe_settled(list(deferred))
        assert all(z < threshold for z in settled_z)  # the bound promised each was quiet
        zscores.extend(settled_z)
        deferred.clear()
        bound = None

    for i, loss in enumerate(map(float, series)):
        if bound is None:
            bound = detector.quiet_bound(every)
        if i % every and len(deferred) < every and -math.inf < loss < bound:
            deferred.append(loss)
            settled_early += 1
            continue
        catch_up()
        verdict = detector.observe(StepSignals(loss))
        zscores.append(verdict.loss_z)
        if verdict.is_spike:
            spikes.append(i)
    catch_up()
    return spikes, zscores, settled_early


@pytest.mark.parametrize("seed", range(4))
def test_settling_quiet_losses_early_changes_no_decision_and_no_score(seed):
    rng = np.random.default_rng(seed)
    series = 2.0 * np.exp(-np.arange(3000) / 1500) + 0.1 * rng.standard_normal(3000)  # falling, noisy
    series[1800] = math.nan
    plain, verdicts = SpikeDetector(window=64), []
    for i in range(len(series)):
        if i in (400, 1201, 2500):  # planted just over the threshold: the hardest case for the bound
            _, median, spread = plain.windows["loss"].score(0.0)
            series[i] = median + 6.0 * spread * (1 + 1e-6)
        verdicts.append(plain.observe(StepSignals(float(series[i]))))
    spikes, zscores, settled_early = deferred_run(series, every=8)
    assert spikes == [i for i, v in enumerate(verdicts) if v.is_spike] == [400, 1201, 1800, 2500]
    np.testing.assert_array_equal(zscores, [v.loss_z for v in verdicts])  # the same z, bit for bit
    assert settled_early > 0.8 * 3000 * 7 / 8  # and most quiet steps were settled with one comparison


def test_no_quiet_bound_while_the_gradient_norm_is_watched():
    detector = SpikeDetector(window=16, watch_grad_norm=True)
    for i in range(40):
        detector.observe(StepSignals(1.0 + 0.01 * (i % 5), 2.0))
    assert detector.quiet_bound(4) == -math.inf
