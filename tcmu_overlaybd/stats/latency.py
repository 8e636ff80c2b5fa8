"""Fixed log-scale latency buckets and the percentiles derived from bucket counts.

A read's latency (ns) falls in the first bucket whose upper bound is >= it
(Prometheus ``le`` semantics); the last bucket (+Inf) takes everything above
``BOUNDS_NS[-1]``.  Bounds step 1, 1.5, 2, 3, 5, 7 per decade from 1 µs to 100 s, so
two neighbours differ by at most 1.67x and a percentile interpolated inside its
bucket is within that factor of the truth (the maximum is tracked exactly).
"""

from __future__ import annotations

import math

_STEPS = (1.0, 1.5, 2.0, 3.0, 5.0, 7.0)

#: upper bounds of the finite buckets, in ns (1 µs .. 100 s)
BOUNDS_NS: tuple[int, ...] = tuple(
    int(round(step * 10 ** exp)) for exp in range(3, 11) for step in _STEPS
) + (100 * 10 ** 9,)
#: number of buckets (the finite ones plus +Inf)
NBUCKETS = len(BOUNDS_NS) + 1


def merge(count_lists) -> list[int]:
    """Element-wise sum of several bucket-count lists (one per recording thread)."""
    total = [0] * NBUCKETS
    for counts in count_lists:
        for i, c in enumerate(counts):
            total[i] += c
    return total


def percentile(counts: list[int], q: float, max_ns: int) -> int:
    """The ``q`` quantile (0 < q <= 1) in ns: the bucket holding rank ceil(q*n), linearly
    interpolated between its bounds and capped by the exact maximum; 0 with no samples."""
    n = sum(counts)
    if n == 0:
        return 0
    rank = max(1, math.ceil(round(q * n, 6)))  # round: 0.9 * 10 must be rank 9, not 10
    seen = 0
    for i, c in enumerate(counts):
        if c and seen + c >= rank:
            lo = BOUNDS_NS[i - 1] if i > 0 else 0
            hi = BOUNDS_NS[i] if i < len(BOUNDS_NS) else max_ns
            hi = min(hi, max_ns)
            lo = min(lo, hi)
            return int(lo + (hi - lo) * (rank - seen) / c)
        seen += c
    return max_ns
