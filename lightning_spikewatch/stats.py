"""Rolling robust statistics (median, MAD, robust z) over a bounded window.

Pure Python, no framework: the detector feeds one float per step, so each update must cost
microseconds and memory must stay fixed however long the run is.
"""

from __future__ import annotations

import math
from bisect import bisect_left, insort
from collections import deque
from collections.abc import Iterable, Sequence

MAD_TO_SIGMA = 1.4826  # scales the MAD to a standard deviation for normally distributed data


def median_of_sorted(values: Sequence[float]) -> float:
    """Median of an already sorted, non-empty sequence."""
    n = len(values)
    mid = n // 2
    if n % 2:
        return values[mid]
    return 0.5 * (values[mid - 1] + values[mid])


def _kth_distance(values: Sequence[float], center: float, split: int, k: int) -> float:
    """k-th smallest (0-based) of |x - center| over sorted ``values``, in O(log n).

    The distances form two sorted runs: ``center - values[split-1::-1]`` (left of the center,
    growing outwards) and ``values[split:] - center`` (right of it). The k-th smallest of two
    sorted runs is found by binary search on how many elements the left run contributes.
    """
    n_left, n_right = split, len(values) - split

    def left(i: int) -> float:  # i-th smallest distance on the left
        return center - values[split - 1 - i]

    def right(j: int) -> float:
        return values[split + j] - center

    lo, hi = max(0, k + 1 - n_right), min(k + 1, n_left)
    while lo < hi:
        take_left = (lo + hi) // 2
        take_right = k + 1 - take_left
        # Too few from the left if the next left element is smaller than the last right one taken.
        if take_right > 0 and take_left < n_left and left(take_left) < right(take_right - 1):
            lo = take_left + 1
        else:
            hi = take_left
    take_left = lo
    take_right = k + 1 - take_left
    last_left = left(take_left - 1) if take_left > 0 else -math.inf
    last_right = right(take_right - 1) if take_right > 0 else -math.inf
    return max(last_left, last_right)


def mad_of_sorted(values: Sequence[float], center: float | None = None) -> float:
    """Median absolute deviation of a sorted, non-empty sequence around its median."""
    n = len(values)
    if center is None:
        center = median_of_sorted(values)
    split = bisect_left(values, center)
    mid = n // 2
    if n % 2:
        return _kth_distance(values, center, split, mid)
    return 0.5 * (_kth_distance(values, center, split, mid - 1) + _kth_distance(values, center, split, mid))


def robust_z(value: float, median: float, mad: float, min_rel_spread: float, min_abs_spread: float) -> float:
    """Robust z-score ``(value - median) / (1.4826 * MAD)``, with a floor on the spread.

    The floor (a fraction of ``|median|``, and an absolute minimum) stops a flat history from
    turning every wiggle into a spike.
    """
    spread = max(mad, min_rel_spread * abs(median), min_abs_spread)
    return (value - median) / (MAD_TO_SIGMA * spread)


class RobustWindow:
    """The last ``size`` finite values of one signal, with their median and MAD on demand.

    Keeps a FIFO of insertion order and a sorted copy, so a push is an O(log n) search plus a
    short memmove, the median is O(1) and the MAD O(log n). Non-finite values are never stored.
    """

    def __init__(self, size: int, min_rel_spread: float = 0.02, min_abs_spread: float = 1e-12) -> None:
        if size < 3:
            raise ValueError(f"window size must be at least 3, got {size}")
        self.size = size
        self.min_rel_spread = min_rel_spread
        self.min_abs_spread = min_abs_spread
        self._fifo: deque[float] = deque()
        self._sorted: list[float] = []

    def __len__(self) -> int:
        return len(self._fifo)

    def push(self, value: float) -> None:
        """Add a value (ignored when not finite), dropping the oldest once the window is full."""
        if not math.isfinite(value):
            return
        if len(self._fifo) == self.size:
            oldest = self._fifo.popleft()
            del self._sorted[bisect_left(self._sorted, oldest)]
        self._fifo.append(value)
        insort(self._sorted, value)

    def extend(self, values: Iterable[float]) -> None:
        for value in values:
            self.push(value)

    def median(self) -> float:
        return median_of_sorted(self._sorted) if self._sorted else math.nan

    def mad(self) -> float:
        return mad_of_sorted(self._sorted) if self._sorted else math.nan

    def zscore(self, value: float) -> float:
        """Robust z of ``value`` against the window (NaN when the window is empty or value is NaN)."""
        if not self._sorted or math.isnan(value):
            return math.nan
        median = median_of_sorted(self._sorted)
        return robust_z(value, median, mad_of_sorted(self._sorted, median), self.min_rel_spread, self.min_abs_spread)

    def values(self) -> list[float]:
        """The stored values, oldest first."""
        return list(self._fifo)

    def state_dict(self) -> dict:
        return {"size": self.size, "values": self.values()}

    def load_state_dict(self, state: dict) -> None:
        self._fifo.clear()
        self._sorted.clear()
        self.extend(state["values"][-self.size :])
