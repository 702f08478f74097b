"""The Azure-Functions-like day generator (controller/sim/generate.py) and reading its output back with
the simulator's input code (controller/sim/inputs.py, the load generator's trace reader underneath)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from kold.controller.sim.generate import KINDS, MINUTES_PER_DAY, generate, write_csv
from kold.controller.sim.inputs import from_trace


def test_the_same_seed_gives_the_same_day_and_another_seed_another() -> None:
    a, b, c = generate(40, seed=1), generate(40, seed=1), generate(40, seed=2)
    assert [(f.name, f.counts.tolist()) for f in a] == [(f.name, f.counts.tolist()) for f in b]
    assert [f.counts.tolist() for f in a] != [f.counts.tolist() for f in c]


def test_adding_functions_leaves_the_first_ones_unchanged() -> None:
    few, more = generate(10, seed=3), generate(30, seed=3)
    assert [(f.name, f.counts.tolist()) for f in few] == [(f.name, f.counts.tolist()) for f in more[:10]]


def test_the_mix_has_every_kind_in_about_its_share() -> None:
    functions = generate(400, seed=0)
    kinds = Counter(f.kind for f in functions)
    assert set(kinds) == set(KINDS)
    assert 0.25 < kinds["timer"] / 400 < 0.45  # MIX: 35%
    rare = [int(f.counts.sum()) for f in functions if f.kind == "rare"]
    assert max(rare) <= 20  # a handful a day
    http = sorted(int(f.counts.sum()) for f in functions if f.kind == "http")
    assert http[-1] > 100 * max(1, http[0])  # rates spread over orders of magnitude


def test_a_timer_fires_once_a_period() -> None:
    timers = [f for f in generate(200, seed=5, days=2) if f.kind == "timer"]
    assert timers
    for fn in timers:
        period = int(fn.name.removeprefix("timer").split("m-")[0])
        expected = 2 * MINUTES_PER_DAY / period
        assert abs(int(fn.counts.sum()) - expected) <= 1, fn.name
        minutes = np.flatnonzero(fn.counts)
        gaps = np.diff(minutes)
        assert set(gaps.tolist()) <= {period - 1, period, period + 1}, fn.name  # jitter moves a call one minute at most


def test_a_bursty_function_is_silent_most_of_the_day() -> None:
    bursty = [f for f in generate(200, seed=6) if f.kind == "bursty"]
    assert bursty
    for fn in bursty:
        assert np.count_nonzero(fn.counts) < 0.5 * MINUTES_PER_DAY


def test_the_csv_reads_back_as_the_same_calls_per_function(tmp_path: Path) -> None:
    functions = generate(25, seed=4, days=2)
    path = tmp_path / "days.csv"
    write_csv(path, functions)
    header = path.read_text().splitlines()[0].split(",")
    assert header[:5] == ["HashOwner", "HashApp", "HashFunction", "Trigger", "1"]
    assert header[-1] == str(2 * MINUTES_PER_DAY)
    workload = from_trace(path, seed=0)
    assert workload.end_s == 2 * MINUTES_PER_DAY * 60.0
    calls = Counter(a.function for a in workload.arrivals)
    assert calls == Counter({f.name: int(f.counts.sum()) for f in functions if f.counts.sum()})
    times = [a.t for a in workload.arrivals]
    assert times == sorted(times)
    assert all(a.service_s is None and a.tokens_in == 0 for a in workload.arrivals)  # the service time applies


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"functions": 0}, "functions"),
        ({"functions": 5, "days": 0}, "days"),
        ({"functions": 5, "seed": -1}, "seed"),
    ],
    ids=["no functions", "no days", "a negative seed"],
)
def test_bad_arguments_are_refused_by_name(kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        generate(**kwargs)
