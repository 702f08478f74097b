"""Percentiles and empirical CDFs: the two ways every latency in a run is reported.

One definition for the summary, the plots, the report and compare, so that a p99 means the same thing
everywhere: linear interpolation between the closest ranks (numpy's default, "type 7"), which most
readers' spreadsheets and notebooks also use, so a published figure can be recomputed from
requests.jsonl. Pure standard library: the summary must not need numpy's import time or its NaNs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

# The keys of every percentile object in summary.json, in the order they are shown.
PERCENTILE_KEYS: tuple[str, ...] = ("p50", "p90", "p99", "max", "mean")


def quantile(ordered: Sequence[float], q: float) -> float:
    """The q-quantile (0 <= q <= 1) of already sorted, non-empty values, interpolated linearly between
    the closest ranks."""
    if not ordered:
        raise ValueError("quantile of no values")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile must be within [0, 1], got {q}")
    pos = q * (len(ordered) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def percentiles(values: Sequence[float]) -> dict[str, float | None]:
    """{"p50", "p90", "p99", "max", "mean"} of the values; every entry None when there are none (a
    figure that was not measured is null in summary.json, never 0). Non-finite values are a bug in
    the caller (a time is always finite), so they are refused rather than silently skewing a mean."""
    if any(not math.isfinite(v) for v in values):
        raise ValueError("percentiles of a non-finite value")
    if not values:
        return dict.fromkeys(PERCENTILE_KEYS)
    ordered = sorted(values)
    return {
        "p50": quantile(ordered, 0.50),
        "p90": quantile(ordered, 0.90),
        "p99": quantile(ordered, 0.99),
        "max": ordered[-1],
        "mean": math.fsum(ordered) / len(ordered),
    }


def ecdf(values: Sequence[float]) -> tuple[list[float], list[float]]:
    """The empirical CDF as (sorted values, the share of values <= each): the points of a step plot."""
    ordered = sorted(values)
    n = len(ordered)
    return ordered, [(i + 1) / n for i in range(n)]


__all__ = ["PERCENTILE_KEYS", "ecdf", "percentiles", "quantile"]
