"""Request shapes: the text forms parse to what they say, draws are seeded, bad forms are clear errors."""

from __future__ import annotations

import random
import statistics

import pytest

from kold.loadgen.shapes import Fixed, LogNormal, Normal, Uniform, parse_shape


def test_fixed_is_always_the_count() -> None:
    shape = parse_shape("256")
    assert shape == Fixed(256)
    rng = random.Random(0)
    assert {shape.draw(rng) for _ in range(100)} == {256}
    assert str(shape) == "256"


def test_uniform_covers_its_inclusive_range() -> None:
    shape = parse_shape("uniform:64:70")
    assert shape == Uniform(64, 70)
    rng = random.Random(1)
    assert {shape.draw(rng) for _ in range(2000)} == set(range(64, 71))
    assert str(shape) == "uniform:64:70"


def test_lognormal_has_the_mean_asked_for() -> None:
    shape = parse_shape("lognormal:300:0.6")
    assert shape == LogNormal(300, 0.6)
    rng = random.Random(2)
    draws = [shape.draw(rng) for _ in range(40_000)]
    assert statistics.fmean(draws) == pytest.approx(300, rel=0.02)
    assert min(draws) >= 1
    assert statistics.stdev(draws) > 100  # a real spread, not the mean every time


def test_normal_is_rounded_and_clipped_at_one() -> None:
    shape = parse_shape("normal:5:10")
    assert shape == Normal(5, 10)
    rng = random.Random(3)
    draws = [shape.draw(rng) for _ in range(5000)]
    assert min(draws) == 1
    assert all(isinstance(d, int) for d in draws)
    big = parse_shape("normal:1000:50")
    assert statistics.fmean(big.draw(rng) for _ in range(5000)) == pytest.approx(1000, rel=0.01)


def test_the_same_seed_draws_the_same_counts() -> None:
    shape = parse_shape("uniform:1:1000000")
    assert [shape.draw(random.Random(7)) for _ in range(3)] == [shape.draw(random.Random(7)) for _ in range(3)]
    a, b = random.Random(7), random.Random(8)
    assert [shape.draw(a) for _ in range(5)] != [shape.draw(b) for _ in range(5)]


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("0", "at least 1"),
        ("-5", "at least 1"),
        ("abc", "not a whole number"),
        ("12.5", "not a whole number"),
        ("zipf:1:2", "unknown distribution 'zipf'"),
        ("uniform:64", "takes two numbers"),
        ("uniform:64:512:3", "takes two numbers"),
        ("uniform:512:64", "1 <= LO <= HI"),
        ("uniform:0:64", "1 <= LO <= HI"),
        ("uniform:a:64", "LO 'a' is not a whole number"),
        ("lognormal:x:0.5", "MEAN 'x' is not a number"),
        ("lognormal:300:-1", "SIGMA must not be negative"),
        ("normal:0:5", "MEAN must be at least 1"),
        ("normal:100:nan", "must be finite"),
    ],
)
def test_bad_shapes_are_clear_errors(text: str, problem: str) -> None:
    with pytest.raises(ValueError, match="bad token shape") as caught:
        parse_shape(text)
    assert repr(text) in str(caught.value)
    assert problem in str(caught.value)
