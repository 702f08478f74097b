"""Synthetic schedules are what they claim, checked statistically with fixed seeds.

Each check has the power to fail: the KS test that accepts the Poisson gaps rejects gamma gaps of the same
mean, and the rate checks compare counts per window against the rate integrated over that window, with a
chi-square over all windows (a wrong rate function fails it by hundreds of standard deviations)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import pytest
from scipy import stats

from kold.loadgen.schedule import MAX_REQUESTS, PatternSpec, PlannedRequest, plan
from kold.loadgen.shapes import Fixed, Uniform, parse_shape


def make(spec: PatternSpec, seed: int = 0, functions: Sequence[str] = ()) -> list[PlannedRequest]:
    return plan(spec, functions, Fixed(128), Fixed(32), seed)


def gaps(times: Sequence[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(times)]


def window_counts(times: Sequence[float], width: float, duration: float) -> list[int]:
    counts = [0] * math.ceil(duration / width)
    for t in times:
        counts[int(t // width)] += 1
    return counts


def chi_square_p(observed: Sequence[int], expected: Sequence[float]) -> float:
    """p-value of counts in windows against their expectations (independent Poisson counts)."""
    statistic = sum((o - e) ** 2 / e for o, e in zip(observed, expected, strict=True))
    return float(stats.chi2.sf(statistic, df=len(observed)))


def integral(rate_at: Callable[[float], float], a: float, b: float, steps: int = 200) -> float:
    h = (b - a) / steps
    return sum(rate_at(a + (i + 0.5) * h) for i in range(steps)) * h


# -- poisson and gamma --------------------------------------------------------------------------------


def test_poisson_has_its_rate_and_exponential_gaps() -> None:
    rate, duration = 50.0, 200.0
    times = [r.at_s for r in make(PatternSpec("poisson", rate=rate, duration_s=duration), seed=11)]
    expected = rate * duration
    assert abs(len(times) - expected) < 4 * math.sqrt(expected)
    assert times == sorted(times)
    assert times[0] > 0 and times[-1] < duration
    ks = stats.kstest(gaps(times), "expon", args=(0, 1 / rate))
    assert ks.pvalue > 0.01, ks
    # The test can tell: gamma gaps of the same mean are not exponential.
    bursty = [r.at_s for r in make(PatternSpec("gamma", rate=rate, burstiness=0.5, duration_s=duration), seed=11)]
    assert stats.kstest(gaps(bursty), "expon", args=(0, 1 / rate)).pvalue < 1e-6


@pytest.mark.parametrize("burstiness", [0.25, 0.5, 1.0, 4.0])
def test_gamma_coefficient_of_variation_is_one_over_sqrt_burstiness(burstiness: float) -> None:
    rate = 20.0
    times = [r.at_s for r in make(PatternSpec("gamma", rate=rate, burstiness=burstiness, count=20_000), seed=5)]
    assert len(times) == 20_000
    g = gaps(times)
    mean = sum(g) / len(g)
    cv = math.sqrt(sum((x - mean) ** 2 for x in g) / (len(g) - 1)) / mean
    assert mean == pytest.approx(1 / rate, rel=0.05)  # the mean rate does not depend on the burstiness
    assert cv == pytest.approx(1 / math.sqrt(burstiness), rel=0.05)
    ks = stats.kstest(g, "gamma", args=(burstiness, 0, 1 / (rate * burstiness)))
    assert ks.pvalue > 0.01, ks


# -- constant, onoff ----------------------------------------------------------------------------------


def test_constant_is_exactly_spaced_from_zero() -> None:
    requests = make(PatternSpec("constant", rate=8, duration_s=2.0))
    assert [r.at_s for r in requests] == [k / 8 for k in range(16)]
    assert [r.at_s for r in make(PatternSpec("constant", rate=3, count=5))] == [k / 3 for k in range(5)]


def test_onoff_sends_only_during_bursts_at_the_burst_rate() -> None:
    rate, on, off, duration = 40.0, 2.0, 3.0, 500.0
    times = [r.at_s for r in make(PatternSpec("onoff", rate=rate, on_s=on, off_s=off, duration_s=duration), seed=3)]
    phases = [t % (on + off) for t in times]
    assert all(p < on for p in phases)  # nothing in the silences
    expected = rate * on * duration / (on + off)  # 100 bursts of 2 s at 40/s
    assert abs(len(times) - expected) < 4 * math.sqrt(expected)
    # within bursts the arrivals are Poisson: uniform over the burst
    assert stats.kstest([p / on for p in phases], "uniform").pvalue > 0.01


# -- diurnal and ramp: rates in windows ---------------------------------------------------------------


def test_diurnal_follows_its_sinusoid() -> None:
    rate, amplitude, period, duration = 30.0, 0.8, 100.0, 400.0

    def rate_at(t: float) -> float:
        return rate * (1 + amplitude * math.sin(2 * math.pi * t / period))

    spec = PatternSpec("diurnal", rate=rate, amplitude=amplitude, period_s=period, duration_s=duration)
    times = [r.at_s for r in make(spec, seed=21)]
    width = 10.0
    observed = window_counts(times, width, duration)
    expected = [integral(rate_at, i * width, (i + 1) * width) for i in range(len(observed))]
    assert chi_square_p(observed, expected) > 0.001
    # and not the flat rate it averages to
    assert chi_square_p(observed, [rate * width] * len(observed)) < 1e-9
    peak, trough = observed[2], observed[7]  # windows around 25 s (peak) and 75 s (trough)
    assert peak > 4 * trough


def test_ramp_rate_goes_linearly_from_rate_to_rate_to() -> None:
    start, end, duration = 5.0, 60.0, 200.0

    def rate_at(t: float) -> float:
        return start + (end - start) * t / duration

    times = [r.at_s for r in make(PatternSpec("ramp", rate=start, rate_to=end, duration_s=duration), seed=8)]
    width = 10.0
    observed = window_counts(times, width, duration)
    expected = [integral(rate_at, i * width, (i + 1) * width) for i in range(len(observed))]
    assert chi_square_p(observed, expected) > 0.001
    assert chi_square_p(observed, [sum(expected) / len(expected)] * len(observed)) < 1e-9
    # Time-rescaled, an inhomogeneous Poisson process is a unit-rate one: exponential gaps of mean 1.
    rescaled = [start * t + (end - start) * t * t / (2 * duration) for t in times]
    assert stats.kstest(gaps(rescaled), "expon").pvalue > 0.01


def test_ramp_down_to_zero_ends() -> None:
    times = [r.at_s for r in make(PatternSpec("ramp", rate=20, rate_to=0, duration_s=50), seed=2)]
    assert abs(len(times) - 500) < 4 * math.sqrt(500)
    assert sum(t > 40 for t in times) < sum(t < 10 for t in times) / 3


# -- sweep --------------------------------------------------------------------------------------------


def test_sweep_holds_each_rate_for_a_stage() -> None:
    rates, stage_s = (2.0, 10.0, 40.0), 30.0
    requests = make(PatternSpec("sweep", rates=rates, stage_s=stage_s), seed=4)
    assert [r.at_s for r in requests] == sorted(r.at_s for r in requests)
    assert [r.stage for r in requests] == sorted(r.stage for r in requests)
    for stage, rate in enumerate(rates):
        times = [r.at_s for r in requests if r.stage == stage]
        assert all(stage * stage_s <= t < (stage + 1) * stage_s for t in times)
        expected = rate * stage_s
        assert abs(len(times) - expected) < 4 * math.sqrt(expected), (stage, len(times))
    assert requests[-1].at_s < len(rates) * stage_s


def test_sweep_stage_burstiness() -> None:
    requests = make(PatternSpec("sweep", rates=[50.0], stage_s=400, burstiness=0.25), seed=6)
    g = gaps([r.at_s for r in requests])
    mean = sum(g) / len(g)
    cv = math.sqrt(sum((x - mean) ** 2 for x in g) / (len(g) - 1)) / mean
    assert cv == pytest.approx(2.0, rel=0.1)


# -- bounds, functions, seeds -------------------------------------------------------------------------


def test_count_and_duration_bound_a_plan_whichever_comes_first() -> None:
    assert len(make(PatternSpec("poisson", rate=100, count=250))) == 250
    short = make(PatternSpec("poisson", rate=100, count=10_000, duration_s=1.0), seed=1)
    assert 50 < len(short) < 150 and short[-1].at_s < 1.0
    assert len(make(PatternSpec("constant", rate=100, count=5, duration_s=60))) == 5


def test_functions_are_dealt_round_robin_in_time_order() -> None:
    requests = make(PatternSpec("poisson", rate=10, count=7), functions=["a", "b", "c"])
    assert [r.function for r in requests] == ["a", "b", "c", "a", "b", "c", "a"]
    assert {r.function for r in make(PatternSpec("poisson", rate=10, count=3))} == {""}


def test_shapes_size_each_request_and_do_not_move_the_arrivals() -> None:
    spec = PatternSpec("poisson", rate=10, count=500)
    fixed = plan(spec, [], Fixed(100), Fixed(10), seed=9)
    drawn = plan(spec, [], Uniform(50, 60), parse_shape("lognormal:200:0.5"), seed=9)
    assert [r.at_s for r in fixed] == [r.at_s for r in drawn]
    assert {r.prompt_tokens for r in fixed} == {100} and {r.max_tokens for r in fixed} == {10}
    assert {r.prompt_tokens for r in drawn} == set(range(50, 61))
    assert len({r.max_tokens for r in drawn}) > 100
    assert not any(r.ignore_eos for r in drawn)


def test_the_same_seed_gives_the_same_plan() -> None:
    spec = PatternSpec("gamma", rate=10, burstiness=0.5, count=100)
    shapes = (Uniform(1, 1000), Uniform(1, 1000))
    assert plan(spec, ["x"], *shapes, seed=3) == plan(spec, ["x"], *shapes, seed=3)
    assert plan(spec, ["x"], *shapes, seed=3) != plan(spec, ["x"], *shapes, seed=4)


# -- validation ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"pattern": "burst"}, "pattern: unknown pattern 'burst'"),
        ({"pattern": "poisson", "count": 5}, "rate: the poisson pattern needs it"),
        ({"pattern": "poisson", "rate": 0, "count": 5}, "rate: must be above 0"),
        ({"pattern": "poisson", "rate": float("inf"), "count": 5}, "rate: must be a finite number"),
        ({"pattern": "poisson", "rate": 1}, "duration_s, count: poisson needs a duration or a request count"),
        ({"pattern": "poisson", "rate": 1, "duration_s": -2}, "duration_s: must be above 0"),
        ({"pattern": "poisson", "rate": 1, "count": 0}, "count: must be at least 1"),
        ({"pattern": "poisson", "rate": 1, "count": 2.5}, "count: must be a whole number"),
        ({"pattern": "poisson", "rate": 1, "count": 5, "burstiness": 0.5}, "burstiness: does not apply to the poisson"),
        ({"pattern": "constant", "rate": 1, "count": 5, "rate_to": 3}, "rate_to: does not apply to the constant"),
        ({"pattern": "gamma", "rate": 1, "count": 5, "burstiness": 0}, "burstiness: must be above 0"),
        ({"pattern": "onoff", "rate": 1, "count": 5, "off_s": 1}, "on_s: the onoff pattern needs it"),
        ({"pattern": "onoff", "rate": 1, "count": 5, "on_s": 1}, "off_s: the onoff pattern needs it"),
        ({"pattern": "onoff", "rate": 1, "count": 5, "on_s": 1, "off_s": -1}, "off_s: must not be negative"),
        ({"pattern": "diurnal", "rate": 1, "count": 5}, "period_s: the diurnal pattern needs it"),
        (
            {"pattern": "diurnal", "rate": 1, "count": 5, "period_s": 60, "amplitude": 1.5},
            "amplitude: must be between 0 and 1",
        ),
        ({"pattern": "ramp", "rate": 1, "duration_s": 10}, "rate_to: the ramp pattern needs it"),
        ({"pattern": "ramp", "rate": 1, "rate_to": 5, "count": 10}, "duration_s: ramp needs a duration"),
        (
            {"pattern": "ramp", "rate": 0, "rate_to": 0, "duration_s": 10},
            "rate, rate_to: must not be negative, nor both 0",
        ),
        ({"pattern": "sweep", "stage_s": 10}, "rates: sweep needs at least one rate"),
        ({"pattern": "sweep", "rates": (1, -2), "stage_s": 10}, "rates: every rate must be above 0"),
        ({"pattern": "sweep", "rates": (1, 2)}, "stage_s: the sweep pattern needs it"),
        ({"pattern": "sweep", "rates": (1, 2), "stage_s": 10, "count": 100}, "count: does not apply to the sweep"),
        ({"pattern": "sweep", "rates": (1, 2), "stage_s": 10, "rate": 3}, "rate: does not apply to the sweep"),
        ({"pattern": "poisson", "rate": 1e6, "duration_s": 3600}, f"more than {MAX_REQUESTS:,}"),
    ],
)
def test_bad_specs_name_the_field(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError) as caught:
        PatternSpec(**kwargs)  # type: ignore[arg-type]
    assert message in str(caught.value)


def test_a_list_of_rates_is_kept_as_a_tuple() -> None:
    spec = PatternSpec("sweep", rates=[1.0, 2.0], stage_s=5)
    assert spec.rates == (1.0, 2.0)
    hash(spec)
