"""The pre-warm policies by name, and the spec text that picks one: "name" or "name:knob=value[,knob=value]".

The same text is `kold deploy --prewarm`, the function spec's `prewarm` field and `kold sim --policy`,
so a bad one is refused with a message that names the problem wherever it was typed.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

from kold.controller.policies.base import Policy
from kold.controller.policies.fixed_keepalive import FixedKeepalive
from kold.controller.policies.forecast import Forecast
from kold.controller.policies.hybrid_histogram import HybridHistogram
from kold.controller.policies.knative_default import KnativeDefault

POLICIES: dict[str, type] = {cls.name: cls for cls in (KnativeDefault, FixedKeepalive, HybridHistogram, Forecast)}
DEFAULT_POLICY = "forecast"


def parameters(cls: type) -> tuple[str, ...]:
    """The keyword parameters a policy class takes (its knobs)."""
    return tuple(p for p in inspect.signature(cls).parameters if p != "self")


def parse_policy(text: str) -> tuple[str, dict[str, float]]:
    """Split and check a policy spec; ValueError naming the problem. The values are also checked by
    constructing the policy once, so that a spec accepted here (at deploy) never fails later."""
    if not isinstance(text, str):
        raise ValueError(f"prewarm policy must be a string like 'fixed-keepalive:minutes=5', not {text!r}")
    name, sep, rest = text.strip().partition(":")
    name = name.strip()
    cls = POLICIES.get(name)
    if cls is None:
        known = ", ".join(sorted(POLICIES))
        raise ValueError(f"unknown prewarm policy {name!r} in {text!r}: known policies are {known}")
    params: dict[str, float] = {}
    allowed = parameters(cls)
    if sep:
        if not rest.strip():
            raise ValueError(f"prewarm policy {text!r}: nothing after ':' (expected knob=value, e.g. {_example(cls)})")
        for item in rest.split(","):
            key, eq, value = (s.strip() for s in item.partition("="))
            if not eq or not key:
                raise ValueError(f"prewarm policy {text!r}: {item.strip()!r} is not knob=value (e.g. {_example(cls)})")
            if key not in allowed:
                raise ValueError(
                    f"prewarm policy {text!r}: {name} has no parameter {key!r} (it takes: {', '.join(allowed) or 'none'})"
                )
            if key in params:
                raise ValueError(f"prewarm policy {text!r}: {key!r} is given twice")
            try:
                number = float(value)
            except ValueError:
                raise ValueError(f"prewarm policy {text!r}: {key}={value!r} is not a number") from None
            if not math.isfinite(number):
                raise ValueError(f"prewarm policy {text!r}: {key}={value} is not a finite number")
            if number < 0:
                raise ValueError(f"prewarm policy {text!r}: {key} must not be negative, not {value}")
            params[key] = number
    try:
        cls(**params)
    except ValueError as exc:
        raise ValueError(f"prewarm policy {text!r}: {exc}") from None
    return name, params


def make_policy(text: str) -> Policy:
    """The policy object a spec names, with its knobs set."""
    name, params = parse_policy(text)
    policy: Policy = POLICIES[name](**params)
    return policy


def policy_spec(name: str, **params: float) -> str:
    """The spec text for a policy and its knobs (parse_policy's inverse), checked the same way:
    policy_spec("fixed-keepalive", minutes=5) -> "fixed-keepalive:minutes=5"."""
    text = name if not params else name + ":" + ",".join(f"{k}={_number(v)}" for k, v in params.items())
    parse_policy(text)
    return text


def _number(value: float) -> str:
    """Shortest exact text of a knob value: 5 rather than 5.0, 99.5 as is."""
    number = float(value)
    return str(int(number)) if number.is_integer() else repr(number)


def _example(cls: Any) -> str:
    return f"{cls.name}:{cls.knob}={_number(cls.knob_values[0])}"
