"""Request shapes: how many prompt tokens and output tokens a synthetic request asks for.

A shape is either one fixed count or a distribution drawn from a seeded `random.Random`, so the same
`--seed` gives the same requests. Every draw is a whole number of at least 1: a zero-token prompt or a
`max_tokens` of 0 is not a request an OpenAI server accepts.

Text forms (`--prompt-tokens`, `--max-tokens`):
- `256`: always 256;
- `uniform:LO:HI`: a whole number from LO to HI, both included;
- `lognormal:MEAN:SIGMA`: a log-normal whose *mean* is MEAN tokens, SIGMA the standard deviation of the
  underlying normal (its shape: 0.5 is a moderate right tail, 1 a heavy one), as prompt and output
  lengths of real chat traffic are;
- `normal:MEAN:SD`: a normal, rounded and clipped at 1.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Protocol

FORMS = "N, uniform:LO:HI, lognormal:MEAN:SIGMA or normal:MEAN:SD"


class Shape(Protocol):
    """A token count: fixed or a distribution, drawn with a seeded rng."""

    def draw(self, rng: random.Random) -> int: ...


@dataclass(frozen=True)
class Fixed:
    tokens: int

    def draw(self, rng: random.Random) -> int:
        return self.tokens

    def __str__(self) -> str:
        return str(self.tokens)


@dataclass(frozen=True)
class Uniform:
    low: int
    high: int

    def draw(self, rng: random.Random) -> int:
        return rng.randint(self.low, self.high)

    def __str__(self) -> str:
        return f"uniform:{self.low}:{self.high}"


@dataclass(frozen=True)
class LogNormal:
    mean: float
    sigma: float

    def draw(self, rng: random.Random) -> int:
        # mu chosen so that E[X] = exp(mu + sigma^2 / 2) is the mean the user asked for
        mu = math.log(self.mean) - self.sigma**2 / 2
        return max(1, round(rng.lognormvariate(mu, self.sigma)))

    def __str__(self) -> str:
        return f"lognormal:{self.mean:g}:{self.sigma:g}"


@dataclass(frozen=True)
class Normal:
    mean: float
    sd: float

    def draw(self, rng: random.Random) -> int:
        return max(1, round(rng.gauss(self.mean, self.sd)))

    def __str__(self) -> str:
        return f"normal:{self.mean:g}:{self.sd:g}"


def _number(text: str, part: str, what: str, *, whole: bool) -> float:
    try:
        value = int(part) if whole else float(part)
    except ValueError:
        kind = "a whole number" if whole else "a number"
        raise ValueError(f"bad token shape {text!r}: {what} {part!r} is not {kind} (forms: {FORMS})") from None
    if not math.isfinite(value):
        raise ValueError(f"bad token shape {text!r}: {what} must be finite")
    return value


def parse_shape(text: str) -> Shape:
    """Parse a shape's text form (see the module docstring); ValueError naming the text when it is bad."""
    parts = text.strip().split(":")
    kind = parts[0].lower()
    if len(parts) == 1:
        tokens = int(_number(text, parts[0], "the token count", whole=True))
        if tokens < 1:
            raise ValueError(f"bad token shape {text!r}: the token count must be at least 1")
        return Fixed(tokens)
    if kind not in ("uniform", "lognormal", "normal"):
        raise ValueError(f"bad token shape {text!r}: unknown distribution {parts[0]!r} (forms: {FORMS})")
    if len(parts) != 3:
        raise ValueError(f"bad token shape {text!r}: {kind} takes two numbers (forms: {FORMS})")
    if kind == "uniform":
        low = int(_number(text, parts[1], "LO", whole=True))
        high = int(_number(text, parts[2], "HI", whole=True))
        if not 1 <= low <= high:
            raise ValueError(f"bad token shape {text!r}: uniform needs 1 <= LO <= HI")
        return Uniform(low, high)
    mean = _number(text, parts[1], "MEAN", whole=False)
    spread = _number(text, parts[2], "SIGMA" if kind == "lognormal" else "SD", whole=False)
    if mean < 1:
        raise ValueError(f"bad token shape {text!r}: MEAN must be at least 1")
    if spread < 0:
        raise ValueError(f"bad token shape {text!r}: {'SIGMA' if kind == 'lognormal' else 'SD'} must not be negative")
    return LogNormal(mean, spread) if kind == "lognormal" else Normal(mean, spread)
