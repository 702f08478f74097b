"""Percentiles and CDFs: known answers, and agreement with numpy's default definition."""

from __future__ import annotations

import random

import numpy as np
import pytest

from kold.loadgen.stats import ecdf, percentiles, quantile


def test_percentiles_of_1_to_100_are_the_interpolated_ranks() -> None:
    values = [float(v) for v in range(100, 0, -1)]  # unsorted on purpose
    assert percentiles(values) == pytest.approx({"p50": 50.5, "p90": 90.1, "p99": 99.01, "max": 100.0, "mean": 50.5})


def test_percentiles_of_nothing_are_null_and_of_one_value_are_that_value() -> None:
    assert percentiles([]) == {"p50": None, "p90": None, "p99": None, "max": None, "mean": None}
    assert percentiles([0.25]) == {"p50": 0.25, "p90": 0.25, "p99": 0.25, "max": 0.25, "mean": 0.25}


def test_percentiles_agree_with_numpy_default() -> None:
    rng = random.Random(7)
    values = [rng.lognormvariate(0, 1) for _ in range(1001)]
    got = percentiles(values)
    for key, q in (("p50", 50), ("p90", 90), ("p99", 99)):
        assert got[key] == pytest.approx(float(np.percentile(values, q)), rel=1e-12)
    assert got["mean"] == pytest.approx(float(np.mean(values)), rel=1e-12)


def test_non_finite_values_are_refused() -> None:
    with pytest.raises(ValueError, match="non-finite"):
        percentiles([1.0, float("nan")])
    with pytest.raises(ValueError, match="within"):
        quantile([1.0], 1.5)


def test_ecdf_is_a_step_to_one() -> None:
    xs, ys = ecdf([3.0, 1.0, 2.0, 2.0])
    assert xs == [1.0, 2.0, 2.0, 3.0]
    assert ys == [0.25, 0.5, 0.75, 1.0]
