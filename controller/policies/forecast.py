"""The `forecast` policy: predict each function's near-future demand and pay idle time only where it buys
fewer cold starts than its price.

The one trade it makes everywhere: `budget` is how many idle instance-seconds one avoided cold start is
worth. From the function's own history it predicts, in this order:
- periodicity (timers): when the recent gaps between firings agree, the next one is due at the last
  firing + period, give or take their spread (for a per-minute trace: somewhere in the minute it
  lands in). The instance is released between firings and pre-warmed the measured cold start and a
  margin before the window opens; when the gap is too short for that, it is held through;
- while the history is young (under 10 gaps), an instance is held `budget` seconds after each call;
- time-of-day seasonality and trend: the arrival rate expected in the next minutes is the larger of
  the last RECENT_MINUTES' rate and the rate at the same time on the previous days. While that rate
  makes an arrival expected within `budget` seconds, an instance is held (Poisson arrivals are
  memoryless: holding pays off exactly when the expected gap is below the budget);
- bursts and irregular gaps: the keep-alive after an arrival is the one that maximises, over the
  idle-time histogram, (share of gaps caught warm) - (idle seconds it costs) / budget;
- concurrency: while this minute's concurrency peak is at the instances' capacity and above the last
  minute's, or the same minutes of the previous day peaked higher, the next instance is held a
  request ahead, so a busy function scales out before its requests queue for a start, not after.

Pure: everything comes from the arguments. Derived values (the period, the best keep-alive) are cached
per function and recomputed when enough new arrivals came in, which keeps a plan call in the
microseconds the simulator needs.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from statistics import median
from typing import ClassVar

from kold.controller.history import IDLE_BINS, DemandHistory
from kold.controller.policies.base import Plan
from kold.controller.scaling import Floor, Spec

DEFAULT_COLD_START_S = 5.0  # until a start of the function was measured: the local platform's cold TTFT order
RELEASE_S = 2.0  # the keep-alive of an instance the forecast does not want: long enough to finish its answer
MIN_GAPS = 4  # recent gaps needed before a period is believed
MIN_IDLE_TIMES = 10  # below this many gaps the history predicts nothing: the spec's idle timeout rules
GRID_SLACK_S = 2.0  # a minute-resolution timer's window reaches this far past its minute
CLUSTER_S = 60.0  # arrivals closer than this belong to one firing (a timer's calls spread over its minute)
PERIOD_SPREAD = 0.3  # a period is believed when the gaps stay within this share of it
RECENT_MINUTES = 15  # the window of the trend rate
SEASON_DAYS = 3  # previous days looked at for the same time of day
SEASON_SPAN = 5  # minutes either side of the same time of day
REFRESH_ARRIVALS = 32  # recompute the cached keep-alive and period after this many new arrivals
# the capacity held for a predicted concurrency is re-planned this often, and what it held beyond the
# prediction goes after this much idle: the prediction moves minute by minute, so holding longer only
# adds instance-seconds
CONCURRENCY_HOLD_S = 20.0
CONCURRENCY_IDLE_S = 30.0
RATE_RECHECK_S = 60.0
RATE_MIN_ARRIVALS = (
    4  # arrivals in the window before the recent rate is believed  # how often a rate-held floor is re-evaluated
)


@dataclass
class _Derived:
    """What the policy derived from one function's history, and when."""

    arrivals: int = -1
    period: float | None = None  # between the starts of firings
    spread: float = 0.0
    cluster_s: float = 0.0  # how long a firing's calls keep coming after its first
    # a timer seen at minute resolution (a per-minute trace), whose calls land anywhere in their minute:
    # the fewest and most whole minutes between firings (0, 0: not one)
    grid: tuple[int, int] = (0, 0)
    keepalive_s: float = 0.0
    season_peak_rate: float = 0.0  # the highest same-time-of-day rate seen on previous days (per s)
    rate_minute: int = -1  # the minute `season_rate` and `rate_counts` were computed for
    season_rate: float = 0.0  # the rate at that time of day on the previous days (per s)
    rate_counts: int = 0  # arrivals in the RECENT_MINUTES whole minutes before it


class Forecast:
    name: ClassVar[str] = "forecast"
    knob: ClassVar[str] = "budget"
    knob_values: ClassVar[tuple[float, ...]] = (
        15.0,
        30.0,
        60.0,
        120.0,
        300.0,
        600.0,
        1200.0,
        2400.0,
        4800.0,
        9600.0,
        19200.0,
    )

    def __init__(self, budget: float = 120.0, default_cold_start_s: float = DEFAULT_COLD_START_S) -> None:
        if not budget > 0:
            raise ValueError(f"budget must be > 0 idle seconds per avoided cold start, not {budget}")
        if not default_cold_start_s >= 0:
            raise ValueError(f"default_cold_start_s must be >= 0, not {default_cold_start_s}")
        self.budget = float(budget)
        self.default_cold_start_s = float(default_cold_start_s)
        self._derived: dict[str, _Derived] = {}

    def plan(self, function: str, history: DemandHistory, spec: Spec, now: float) -> Plan:
        last = history.last_arrival
        if last is None:
            return Plan(Floor(0, now, "forecast: no demand seen yet"))
        d = self._derive(function, history, now)
        cold = history.cold_start_s if history.cold_start_s is not None else self.default_cold_start_s
        lead = 1.2 * cold + 1.0  # start this long before an expected arrival: the restore, with a margin

        conc, conc_why = self._concurrency(history, spec, now)
        keep, until, recheck, why = self._single(d, history, now, last, lead)
        if conc > keep:
            return Plan(
                Floor(conc, now + CONCURRENCY_HOLD_S, f"forecast: {conc_why}", idle_timeout_s=CONCURRENCY_IDLE_S),
                now + CONCURRENCY_HOLD_S / 2,
            )
        idle = None if keep else RELEASE_S
        return Plan(Floor(keep, until, f"forecast: {why}", idle_timeout_s=idle), recheck)

    # -- one instance: periodic pre-warm, seasonal rate, keep-alive ------------------------------------

    def _single(
        self, d: _Derived, h: DemandHistory, now: float, last: float, lead: float
    ) -> tuple[int, float, float | None, str]:
        """(instances 0 or 1, until, recheck_at, why) for holding the function's first instance."""
        if d.period is not None:
            beat = self._beat(d, h, now, last, lead)
            if beat is not None:
                return beat
        rate = self._rate(d, h, now + lead)
        if rate * self.budget >= 1.0:
            return 1, now + RATE_RECHECK_S, now + RATE_RECHECK_S, f"{rate * 60:.1f} arrivals/min expected"
        if h.idle_times < MIN_IDLE_TIMES:  # too little history to predict: hold what one cold start is worth
            end = last + self.budget
            if now < end:
                return 1, end, end, f"learning ({h.idle_times} gaps seen): held {self.budget:g} s after each call"
        elif d.keepalive_s > 0 and now < last + d.keepalive_s:
            end = last + d.keepalive_s
            why = f"kept {d.keepalive_s:.0f} s after each call (idle-time histogram, budget {self.budget:g} s)"
            return 1, end, end, why
        # only functions whose previous days had a rate worth holding for are re-checked on a timer for
        # a seasonal rise; the others wait for their next arrival
        recheck = now + RATE_RECHECK_S if d.season_peak_rate * self.budget >= 1.0 else None
        return 0, now + RATE_RECHECK_S, recheck, "no call expected soon"

    @staticmethod
    def _beat(
        d: _Derived, h: DemandHistory, now: float, last: float, lead: float
    ) -> tuple[int, float, float | None, str] | None:
        """A timer's plan: held through a firing, released between firings, pre-warmed `lead` before
        the next one's window. None once the next beat has passed without a call (the period is off)."""
        assert d.period is not None
        period, spread = d.period, d.spread
        if now < last + d.cluster_s:  # the firing's other calls are still coming
            end = last + d.cluster_s
            return 1, end, end, f"every {period:.0f} s: held through the firing"
        start = _firing_start(h)
        if d.grid[1]:
            # a per-minute trace: the call comes somewhere in its minute, so the window is that minute
            minute = int(start // 60)
            opens = (minute + d.grid[0]) * 60 - lead - GRID_SLACK_S
            closes = (minute + d.grid[1] + 1) * 60 + GRID_SLACK_S
        else:
            nxt = start + period
            opens, closes = nxt - spread - lead, nxt + spread + 1.0
        if now > closes:
            return None
        if opens - last <= RELEASE_S + lead:  # too short to release and start again: hold through it
            return 1, closes, closes, f"every {period:.0f} s: held between calls"
        if now >= opens:
            return 1, closes, closes, f"every {period:.0f} s: pre-warmed for the call due by +{closes - last:.0f} s"
        return 0, opens, opens, f"every {period:.0f} s: next pre-warm in {opens - now:.0f} s"

    # -- rates and concurrency ---------------------------------------------------------------------------

    def _rate(self, d: _Derived, h: DemandHistory, at: float) -> float:
        """Arrivals per second expected around `at`: the larger of the recent rate (trend, bursts: the
        last RECENT_MINUTES whole minutes and the current one so far) and the rate at the same time on
        the previous days (seasonality). The whole minutes' part is cached for the minute."""
        minute = int(at // 60)
        if d.rate_minute != minute:
            d.rate_minute = minute
            d.rate_counts = sum(h.counts.get(m, 0) for m in range(minute - RECENT_MINUTES, minute))
            d.season_rate = self._season_rate(h, minute)
        arrivals = d.rate_counts + h.counts.get(minute, 0)
        if arrivals < RATE_MIN_ARRIVALS or h.first_arrival is None or h.last_arrival is None:
            return d.season_rate  # a rate from a few calls is noise: the learning keep-alive covers them
        # the window runs back RECENT_MINUTES whole minutes, or to the first arrival when the history is
        # younger, and ends at the last arrival: the answer then changes with arrivals, not with the
        # moment it is asked (the simulator and the controller plan at different moments)
        start = max(60.0 * (minute - RECENT_MINUTES), h.first_arrival)
        span = max(60.0, h.last_arrival - start)
        return max(arrivals / span, d.season_rate)

    @staticmethod
    def _season_rate(h: DemandHistory, minute: int) -> float:
        if h.first_arrival is None:
            return 0.0
        first = int(h.first_arrival // 60)
        days = 0
        total = 0
        for day in range(1, SEASON_DAYS + 1):
            centre = minute - 1440 * day
            if centre + SEASON_SPAN < first:  # before the history began: not a day seen
                break
            days += 1
            total += sum(h.counts.get(m, 0) for m in range(centre - SEASON_SPAN, centre + SEASON_SPAN + 1))
        return total / (days * (2 * SEASON_SPAN + 1) * 60) if days else 0.0

    @staticmethod
    def _concurrency(h: DemandHistory, spec: Spec, now: float) -> tuple[int, str]:
        """Instances a rising concurrency will need: while this minute's peak is at the instances'
        capacity and above the last one's, room for one request more than the peak (the next instance starts a request ahead of the
        reactive rule, which starts it when that request is already waiting); or the peak of the next
        minutes at this time of day on the previous day. 0 while demand is flat or falling: reactive
        scaling then has what it needs. (Holding the rise's full slope, or the last minutes' peaks,
        cost 13-30% more instance-seconds than knative-default in the simulator for the same waits.)"""
        minute = int(now // 60)
        current, previous = h.peak(minute), h.peak(minute - 1)
        # a rise while busy: at the instances' capacity, and above a minute that had calls (the first
        # call after a quiet minute is not a rise in concurrency)
        rising = current + 1 if current >= spec.target_concurrency and current > previous > 0 else 0
        season = max((h.peak(minute - 1440 + k) for k in range(0, 3)), default=0)
        peak = max(rising, season)
        need = math.ceil(peak / spec.target_concurrency) if peak > spec.target_concurrency else 0
        need = min(need, spec.max_instances)
        return need, f"concurrency peak {peak} expected ({spec.target_concurrency} per instance)"

    # -- derived values, cached per function ----------------------------------------------------------

    def _derive(self, function: str, h: DemandHistory, now: float) -> _Derived:
        d = self._derived.get(function)
        if d is None:
            d = self._derived[function] = _Derived()
        elif h.arrivals - d.arrivals < min(REFRESH_ARRIVALS, max(1, d.arrivals // 4)) and not self._broken(d, h):
            return d  # derived often while the history is young (a period shows after a few calls), then every 32
        d.arrivals = h.arrivals
        d.period, d.spread, d.cluster_s, d.grid = _period(list(h.recent))
        d.keepalive_s = self._keepalive(h)
        d.season_peak_rate = 0.0
        if h.first_arrival is not None and now - h.first_arrival >= 86400 - SEASON_SPAN * 60:
            d.season_peak_rate = max(self._season_rate(h, m) for m in range(int(now // 60), int(now // 60) + 1440, 30))
        return d

    @staticmethod
    def _broken(d: _Derived, h: DemandHistory) -> bool:
        """The believed period no longer fits the last gap: derive again at once, not 32 arrivals later."""
        if d.period is None or len(h.recent) < 2:
            return False
        gap = h.recent[-1] - h.recent[-2]
        return abs(gap - d.period) > d.spread + 1.0

    def _keepalive(self, h: DemandHistory) -> float:
        """The keep-alive (seconds after an arrival) maximising caught - idle / budget over the idle-time
        histogram; 0 when no keep-alive pays for itself."""
        total = h.idle_times
        if total == 0:
            return 0.0
        best_t, best_j = 0, 0.0
        caught = 0  # gaps shorter than t minutes
        idle_caught = 0.0  # idle seconds those gaps cost (mid-bin; the first bin from the recent gaps)
        short = [b - a for a, b in itertools.pairwise(h.recent) if b - a < 60]
        first_bin_s = sum(short) / len(short) if short else 30.0
        for t in range(1, IDLE_BINS + 1):
            n = h.idle_bins[t - 1]
            caught += n
            idle_caught += n * (first_bin_s if t == 1 else (t - 0.5) * 60)
            idle = idle_caught + (total - caught) * t * 60  # the others cost the whole keep-alive
            j = (caught - idle / self.budget) / total
            if j > best_j:
                best_t, best_j = t, j
        return best_t * 60.0


def _period(times: list[float]) -> tuple[float | None, float, float, tuple[int, int]]:
    """(period, spread, cluster, grid) of a timer: the gaps between firings (arrivals after a gap of
    CLUSTER_S or more) agree within PERIOD_SPREAD of their median; `cluster` is how long a firing's calls
    kept coming after its first; `grid` the fewest and most whole minutes between firings when the
    calls look placed anywhere in their minute (a per-minute trace), else (0, 0). None when the
    arrivals are not periodic."""
    starts: list[float] = []
    cluster = 0.0
    prev = -math.inf
    for t in times:
        if t - prev >= CLUSTER_S:
            starts.append(t)
        else:
            cluster = max(cluster, t - starts[-1])
        prev = t
    starts = starts[-17:]
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    if len(gaps) < MIN_GAPS:
        return None, 0.0, 0.0, (0, 0)
    p = median(gaps)
    spread = max(abs(g - p) for g in gaps)
    grid = (0, 0)
    if p >= 120 and spread >= 5 and abs(p / 60 - round(p / 60)) < 0.1:
        # whole minutes apart, give or take the one a firing near a minute's edge slips into
        minutes = [int(b // 60) - int(a // 60) for a, b in itertools.pairwise(starts)]
        if max(abs(m - round(p / 60)) for m in minutes) <= 1:
            grid = (min(minutes), max(minutes))
    if not grid[1] and spread > PERIOD_SPREAD * p:
        return None, 0.0, 0.0, (0, 0)
    return p, spread, min(cluster + 1.0, CLUSTER_S) if cluster else 0.0, grid


def _firing_start(h: DemandHistory) -> float:
    """The first arrival of the latest firing (arrivals less than CLUSTER_S apart are one firing)."""
    recent = h.recent
    start = recent[-1]
    for i in range(len(recent) - 2, -1, -1):
        if start - recent[i] >= CLUSTER_S:
            break
        start = recent[i]
    return start
