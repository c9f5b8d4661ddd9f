"""Rolling robust statistics (median, MAD, robust z) over a bounded window.

Pure Python, no framework: the detector feeds one float per step, so each update must cost
microseconds and memory must stay fixed however long the run is.
"""

from __future__ import annotations

import math
from bisect import bisect_left, insort
from collections import deque
from collections.abc import Container, Iterable, Sequence

MAD_TO_SIGMA = 1.4826  # scales the MAD to a standard deviation for normally distributed data
MAD_REFRESH = 16  # pushes after which a cached MAD is recomputed (see RobustWindow.score)


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
    lo, hi = max(0, k + 1 - n_right), min(k + 1, n_left)
    while lo < hi:
        take_left = (lo + hi) // 2
        take_right = k + 1 - take_left
        # Too few from the left if the next left distance is below the last right one taken.
        if take_right > 0 and center - values[split - 1 - take_left] < values[split + take_right - 1] - center:
            lo = take_left + 1
        else:
            hi = take_left
    last_left = center - values[split - lo] if lo > 0 else -math.inf
    last_right = values[split + k - lo] - center if k + 1 - lo > 0 else -math.inf
    return last_left if last_left > last_right else last_right


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

    def __init__(
        self, size: int, min_rel_spread: float = 0.02, min_abs_spread: float = 1e-12, keep_sorted: bool = True
    ) -> None:
        if size < 3:
            raise ValueError(f"window size must be at least 3, got {size}")
        self.size = size
        self.keep_sorted = keep_sorted  # False: a push is O(1), and scoring sorts (for rarely scored signals)
        self.min_rel_spread = min_rel_spread
        self.min_abs_spread = min_abs_spread
        self._fifo: deque[float] = deque()
        self._sorted: list[float] = []
        self._mad = 0.0
        self._pushes_since_mad = MAD_REFRESH

    def __len__(self) -> int:
        return len(self._fifo)

    def push(self, value: float) -> None:
        """Add a value (ignored when not finite), dropping the oldest once the window is full."""
        if not math.isfinite(value):
            return
        if not self.keep_sorted:
            if len(self._fifo) == self.size:
                self._fifo.popleft()
            self._fifo.append(value)
            return
        if len(self._fifo) == self.size:
            oldest = self._fifo.popleft()
            del self._sorted[bisect_left(self._sorted, oldest)]
        self._fifo.append(value)
        insort(self._sorted, value)
        self._pushes_since_mad += 1

    def extend(self, values: Iterable[float]) -> None:
        for value in values:
            self.push(value)

    def _ordered(self) -> list[float]:
        return self._sorted if self.keep_sorted else sorted(self._fifo)

    def median(self) -> float:
        ordered = self._ordered()
        return median_of_sorted(ordered) if ordered else math.nan

    def mad(self) -> float:
        ordered = self._ordered()
        return mad_of_sorted(ordered) if ordered else math.nan

    def zscore(self, value: float) -> float:
        """Robust z of ``value`` against the window (NaN when the window is empty or value is NaN)."""
        return self.score(value)[0]

    def score(self, value: float, threshold: float | None = None) -> tuple[float, float, float]:
        """(robust z, median, floored spread) of ``value`` against the window.

        With a ``threshold``, the MAD is recomputed only when needed: every ``MAD_REFRESH`` pushes,
        and whenever ``value`` could reach the threshold. A z below the threshold may then use a MAD
        a few steps old; a z at or above it is always exact.
        """
        if not self.keep_sorted:
            self._sorted = sorted(self._fifo)
            self._pushes_since_mad = MAD_REFRESH
        if not self._sorted or math.isnan(value):
            return math.nan, math.nan, math.nan
        median = median_of_sorted(self._sorted)
        floor = max(self.min_rel_spread * abs(median), self.min_abs_spread)
        stale = threshold is None or self._pushes_since_mad >= MAD_REFRESH
        if not stale and (value - median) / (MAD_TO_SIGMA * floor) >= threshold:
            stale = True  # the floor alone does not rule a spike out: the exact MAD decides
        if stale:
            self._mad = mad_of_sorted(self._sorted, median)
            self._pushes_since_mad = 0
        spread = self._mad if self._mad > floor else floor
        return (value - median) / (MAD_TO_SIGMA * spread), median, MAD_TO_SIGMA * spread

    def score_and_push(
        self, values: Iterable[float], threshold: float, scored: Container[int] | None = None
    ) -> list[float]:
        """``score(value, threshold)[0]`` then ``push(value)`` for each value in order, bit for bit,
        in one loop: the quiet steps' catch-up, which runs for nearly every step. With ``scored``,
        only the values at those positions are scored (the rest get NaN and cost only their push),
        exactly as ``score`` would score them: a skipped value refreshes no MAD, and a scored one's
        MAD is at most ``MAD_REFRESH`` pushes old (exact where it could reach the threshold)."""
        if not self.keep_sorted:
            zscores = []
            for position, value in enumerate(values):
                zscores.append(self.score(value, threshold)[0] if scored is None or position in scored else math.nan)
                self.push(value)
            return zscores
        fifo, ordered, size, isfinite = self._fifo, self._sorted, self.size, math.isfinite
        rel, least, sigma = self.min_rel_spread, self.min_abs_spread, MAD_TO_SIGMA
        mad, since = self._mad, self._pushes_since_mad  # kept in locals, stored back at the end
        zscores = []
        for position, value in enumerate(values):
            if scored is not None and position not in scored:
                zscores.append(math.nan)
            elif ordered and value == value:  # as score(): NaN scores NaN, an empty window too
                n = len(ordered)
                mid = n // 2
                median = ordered[mid] if n % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])
                floor = rel * abs(median)
                if floor < least:
                    floor = least
                if since >= MAD_REFRESH or (value - median) / (sigma * floor) >= threshold:
                    mad = mad_of_sorted(ordered, median)
                    since = 0
                zscores.append((value - median) / (sigma * (mad if mad > floor else floor)))
            else:
                zscores.append(math.nan)
            if isfinite(value):  # as push()
                if len(fifo) == size:
                    del ordered[bisect_left(ordered, fifo.popleft())]
                fifo.append(value)
                insort(ordered, value)
                since += 1
        self._mad, self._pushes_since_mad = mad, since
        return zscores

    def quiet_bound(self, pushes: int, threshold: float) -> float:
        """A value below which ``score`` stays under ``threshold``, now and after up to ``pushes``
        more pushes of any finite values: a caller can then settle such values with one comparison
        and push them later, getting the same decisions as scoring each one at once.

        A push lowers any order statistic by at most one position and the pop of the oldest value
        raises it by at most one (whether or not the window is full yet), so after ``pushes`` of
        them the median lies between two values of today's window, and every distance to it has
        moved by no more than the median did. The bound puts the median and the MAD at their
        lowest reachable values; -inf when nothing is certain (too few values for that many
        pushes, or a window not kept sorted).
        """
        values, n = self._sorted, len(self._fifo)
        low_index, high_index = (n - 1) // 2 - pushes, n // 2 + pushes
        if not self.keep_sorted or low_index < 0 or high_index >= n:
            return -math.inf
        median = median_of_sorted(values)
        low, high = values[low_index], values[high_index]
        shift = max(median - low, high - median)  # how far the median can move
        mad_low = _kth_distance(values, median, bisect_left(values, median), low_index) - shift
        magnitude = low if low > 0 else (-high if high < 0 else 0.0)  # least |median| reachable
        spread = max(mad_low, self.min_rel_spread * magnitude, self.min_abs_spread)
        reach = threshold * MAD_TO_SIGMA * spread
        return low + reach - 1e-9 * (abs(low) + reach)  # a margin far above rounding error

    def values(self) -> list[float]:
        """The stored values, oldest first."""
        return list(self._fifo)

    def state_dict(self) -> dict:
        return {"size": self.size, "values": self.values()}

    def load_state_dict(self, state: dict) -> None:
        self._fifo.clear()
        self._sorted.clear()
        self.extend(state["values"][-self.size :])


class VectorHistory:
    """The last ``size`` vectors of a fixed length (e.g. per-layer gradient norms).

    Recording appends a reference to a list (no copy, no numpy call): it runs every step. The
    medians are computed only when asked, on a spike.
    """

    def __init__(self, size: int):
        self.size = size
        self._rows: deque[Sequence[float]] = deque(maxlen=size)

    @property
    def count(self) -> int:
        return len(self._rows)

    def record(self, values: Sequence[float]) -> None:
        self._rows.append(values)

    def rows(self) -> list[list[float]]:
        """The stored vectors, oldest first (for checkpoints)."""
        return [list(row) for row in self._rows]

    def latest(self, back: int = 0) -> list[float] | None:
        """The vector recorded ``back`` records before the newest one (None if there is none)."""
        if back >= len(self._rows):
            return None
        return list(self._rows[-1 - back])

    def typical(self) -> list[float]:
        """Median of each component over the stored vectors."""
        import numpy as np

        return np.median(np.asarray(self._rows, dtype=float), axis=0).tolist()
