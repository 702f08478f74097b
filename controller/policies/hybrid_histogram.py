"""The `hybrid-histogram` policy: "Serverless in the Wild" (Shahrad et al., ATC'20), on the function's
idle-time histogram (DemandHistory: 1-minute bins up to 4 hours, and a count of longer idle times).

- pre-warm window = the head (5th percentile) of the idle times, shrunk 10%: the instance is unloaded
  right after a request and loaded again that long after it;
- keep-alive = until the tail (99th percentile, the knob) of the idle times, grown 10%, after the request;
- a head of 0 (more than 5% of gaps under a minute): no unloading, keep the instance until the tail;
- a histogram that is not representative (fewer than 10 idle times, or more of them beyond 4 hours than
  inside) falls back to a plain 4-hour keep-alive, as the paper's policy does before it has learned.

Bins are whole minutes, bin k holding idle times in [k, k+1) min. The head uses the bin's lower edge
(pre-warming early is the safe side) and the tail its upper edge (keeping until the bin's end is the safe
side; a tail in bin 0 would otherwise mean no keep-alive at all for gaps of up to a minute).

The knob is the tail percentile: it sweeps the policy's cost (a lower tail releases instances sooner
and misses the rarer long gaps), while the head percentile and the margins stay the paper's.
The pre-warm does not allow for the function's start time, as the paper's does not: the 10% margin is
all the slack it has (the `forecast` policy is the one that plans for the restore time).
"""

from __future__ import annotations

from typing import ClassVar

from kold.controller.history import IDLE_BINS, DemandHistory
from kold.controller.policies.base import Plan
from kold.controller.scaling import Floor, Spec

HEAD_PERCENTILE = 5.0
MARGIN = 0.10
MIN_IDLE_TIMES = 10  # fewer: the histogram is not representative yet
FALLBACK_KEEPALIVE_S = IDLE_BINS * 60.0  # the histogram's range: 4 hours
# ATC unloads the instance as soon as the request is done. 1 s rather than 0: the decider stops it on
# the next pass after it has answered (the reaper runs every second or so), but a request that comes
# back within the second (a client's follow-up, a retry) is not sent to an instance being drained.
UNLOAD_IDLE_S = 1.0


class HybridHistogram:
    """Pre-warm at the head of the function's idle times and keep the instance until their tail."""

    name: ClassVar[str] = "hybrid-histogram"
    knob: ClassVar[str] = "tail"
    knob_values: ClassVar[tuple[float, ...]] = (75, 90, 95, 99, 99.9)

    def __init__(self, tail: float = 99.0) -> None:
        if not HEAD_PERCENTILE < tail <= 100:  # also rejects NaN
            raise ValueError(
                f"hybrid-histogram: tail must be a percentile above {HEAD_PERCENTILE:g} and at most 100, not {tail}"
            )
        self.tail = float(tail)

    def plan(self, function: str, history: DemandHistory, spec: Spec, now: float) -> Plan:
        last = history.last_arrival
        if last is None:
            return Plan(Floor(0, now, f"{self.name}: no request yet"))
        total = history.idle_times
        inside = total - history.idle_over
        if total < MIN_IDLE_TIMES or history.idle_over > inside:
            if total < MIN_IDLE_TIMES:
                why = f"{total} idle times, fewer than {MIN_IDLE_TIMES}"
            else:
                why = f"{history.idle_over} of {total} idle times beyond {_duration(FALLBACK_KEEPALIVE_S)}"
            return self._keep(
                last, last + FALLBACK_KEEPALIVE_S, now, f"{_duration(FALLBACK_KEEPALIVE_S)} keep-alive ({why})"
            )
        head_bin = history.idle_percentile(HEAD_PERCENTILE)
        tail_bin = history.idle_percentile(self.tail)
        assert head_bin is not None and tail_bin is not None  # total > 0
        prewarm_s = head_bin * 60 * (1 - MARGIN)
        keep_s = min(tail_bin + 1, IDLE_BINS) * 60 * (1 + MARGIN)
        tail_text = f"p{self.tail:g} of {total} idle times"
        if head_bin == 0:
            return self._keep(
                last,
                last + keep_s,
                now,
                f"keep {_duration(keep_s)} after the last request ({tail_text}; no pre-warm: p5 under a minute)",
            )
        prewarm_at = last + prewarm_s
        what = f"pre-warm {_duration(prewarm_s)} after the last request (p5 of {total} idle times), keep until {_duration(keep_s)} ({tail_text})"
        if now < prewarm_at:
            floor = Floor(0, prewarm_at, f"{self.name}: unloaded; {what}", idle_timeout_s=UNLOAD_IDLE_S)
            return Plan(floor, recheck_at=prewarm_at)
        return self._keep(last, last + keep_s, now, what)

    def _keep(self, last: float, until: float, now: float, what: str) -> Plan:
        if now >= until:
            return Plan(Floor(0, now, f"{self.name}: idle {_duration(now - last)}, past: {what}"))
        return Plan(Floor(1, until, f"{self.name}: {what}"), recheck_at=until)


def _duration(seconds: float) -> str:
    """A duration the way `kold describe` reads best: 54 s, 12 min, 4 h, 4.4 h."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.3g} min"
    return f"{seconds / 3600:.3g} h"
