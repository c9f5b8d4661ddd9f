"""Robust statistics: exact median/MAD against a reference, the spread floor, bounded windows."""

import math

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from lightning_spikewatch.stats import MAD_TO_SIGMA, RobustWindow, mad_of_sorted, median_of_sorted, robust_z

finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)


@given(st.lists(finite, min_size=1, max_size=60))
def test_median_and_mad_match_numpy(values):
    ordered = sorted(values)
    median = float(np.median(ordered))
    assert median_of_sorted(ordered) == pytest.approx(median, rel=1e-12, abs=1e-9)
    assert mad_of_sorted(ordered) == pytest.approx(
        float(np.median(np.abs(np.array(ordered) - median))), rel=1e-9, abs=1e-9
    )


@settings(max_examples=50)
@given(st.lists(st.one_of(finite, st.just(math.nan), st.just(math.inf)), min_size=1, max_size=300), st.integers(3, 40))
def test_window_keeps_the_last_finite_values_and_scores_like_a_reference(values, size):
    window = RobustWindow(size, min_rel_spread=0.02)
    for value in values:
        window.push(value)
    kept = [v for v in values if math.isfinite(v)][-size:]
    assert window.values() == kept
    assert len(window) <= size
    if kept:
        median = float(np.median(kept))
        mad = float(np.median(np.abs(np.array(kept) - median)))
        spread = max(mad, 0.02 * abs(median), window.min_abs_spread)
        expected = (median + 5.0 - median) / (MAD_TO_SIGMA * spread)
        z = window.zscore(median + 5.0)
        assert not math.isnan(z)
        assert z == pytest.approx(expected, rel=1e-6)


def test_flat_history_does_not_make_every_wiggle_a_spike():
    window = RobustWindow(64, min_rel_spread=0.02)
    window.extend([1.0] * 64)  # MAD is exactly 0
    assert window.mad() == 0.0
    assert window.zscore(1.05) < 6  # 5% above a flat loss is not a spike
    assert window.zscore(1.5) > 6  # 50% above it is


def test_robust_z_is_one_sided_in_sign():
    assert robust_z(0.0, 1.0, 0.1, 0.0, 1e-12) < 0
    assert robust_z(2.0, 1.0, 0.1, 0.0, 1e-12) == pytest.approx(1.0 / (MAD_TO_SIGMA * 0.1))


def test_window_rejects_tiny_sizes():
    with pytest.raises(ValueError, match="at least 3"):
        RobustWindow(2)


def test_state_round_trip():
    window = RobustWindow(8)
    window.extend(range(20))
    clone = RobustWindow(8)
    clone.load_state_dict(window.state_dict())
    assert clone.values() == window.values() and clone.mad() == window.mad()


clustered = st.one_of(finite, st.integers(0, 4).map(lambda k: 10.0 * k))  # ties move medians in jumps


@settings(max_examples=800, deadline=None)
@example([0.0] * 4 + [5.0] + [10.0] * 4, [10.0], 1, 6.0, 0.02, 0)  # one push moves the median from 5 to 10
@example([0.0] * 4 + [10.0] * 4, [10.0] * 3, 3, 6.0, 0.02, 2)  # pushes that grow the window, then pop
@example([-10.0] * 3 + [3.9, 4.0] + [20.0] * 4, [20.0], 1, 6.0, 0.02, 0)  # the median jumps up across a gap
@given(
    st.lists(clustered, min_size=8, max_size=40),
    st.lists(clustered, max_size=10),
    st.integers(0, 10),
    st.floats(0.5, 10.0),
    st.floats(0.0, 0.5),
    st.integers(0, 6),
)
def test_values_below_the_quiet_bound_score_quietly_after_any_pushes(history, pushes, allowed, threshold, rel, room):
    """The bound holds for every window reachable with up to ``allowed`` pushes of any values,
    full or still filling (``room`` more values fit before the oldest is popped)."""
    window = RobustWindow(len(history) + room, min_rel_spread=rel)
    window.extend(history)
    bound = window.quiet_bound(allowed, threshold)
    if bound == -math.inf:
        return
    for value in pushes[:allowed] + [None]:
        # Exact MAD and the cached one (the detector's path) both stay under the threshold.
        assert window.zscore(bound) < threshold
        assert window.score(bound, threshold)[0] < threshold
        if value is not None:
            window.push(value)


def test_quiet_bound_lets_ordinary_noise_through_once_the_window_has_enough_values():
    rng = np.random.default_rng(0)
    noisy = (2.0 + 0.1 * rng.standard_normal(128)).tolist()
    window = RobustWindow(128, min_rel_spread=0.02)
    window.extend(noisy[:12])
    assert window.quiet_bound(8, 6.0) == -math.inf  # too few values for eight pushes: nothing is certain
    window.extend(noisy[12:64])
    assert max(noisy[:64]) < window.quiet_bound(8, 6.0)  # still filling: a bound already
    window.extend(noisy[64:])
    bound = window.quiet_bound(8, 6.0)
    assert max(noisy) < bound < window.median() + 6.0 * window.score(2.0)[2]
    assert window.quiet_bound(70, 6.0) == -math.inf  # more pushes than half the window: no bound


@settings(max_examples=60)
@given(
    st.lists(finite, min_size=0, max_size=80),
    st.lists(st.one_of(finite, st.just(math.nan), st.just(math.inf)), min_size=1, max_size=40),
    st.integers(3, 24),
    st.floats(0.5, 8.0),
    st.booleans(),
    st.one_of(st.none(), st.sets(st.integers(0, 39))),
)
@example(
    history=[1.0] * 20, values=[1.0, 1.0 + 1e-9, 50.0, math.nan, 1.0], size=16, threshold=6.0, keep=True, scored=None
)
@example(  # quiet values whose MAD moves with every push: only the cached MAD's age tells them apart
    history=[1 + (-1) ** i * (i % 7) * 0.02 for i in range(30)],
    values=[1 + (-1) ** i * (i % 5) * 0.02 for i in range(40)],
    size=8,
    threshold=6.0,
    keep=True,
    scored=None,
)
@example(  # only some scored, as the thinned trace asks: the skipped ones must not refresh the MAD
    history=[1 + (-1) ** i * (i % 7) * 0.02 for i in range(30)],
    values=[1 + (-1) ** i * (i % 5) * 0.02 for i in range(40)],
    size=8,
    threshold=6.0,
    keep=True,
    scored={9, 19, 29, 39},
)
def test_score_and_push_is_score_then_push_bit_for_bit(history, values, size, threshold, keep, scored):
    one_by_one = RobustWindow(size, min_rel_spread=0.02, keep_sorted=keep)
    batched = RobustWindow(size, min_rel_spread=0.02, keep_sorted=keep)
    for value in history:
        one_by_one.push(value)
        batched.push(value)
        one_by_one.score(value, threshold)  # the cached MAD's age must match too
        batched.score(value, threshold)
    expected = []
    for position, value in enumerate(values):  # positions left out of ``scored`` are pushed, not scored
        expected.append(one_by_one.score(value, threshold)[0] if scored is None or position in scored else math.nan)
        one_by_one.push(value)
    got = batched.score_and_push(values, threshold, scored)
    assert [repr(z) for z in got] == [repr(z) for z in expected]  # repr: NaN equals NaN, and every bit counts
    assert batched.values() == one_by_one.values()
    assert repr(batched.score(1.5, threshold)) == repr(one_by_one.score(1.5, threshold))  # the same cached MAD
