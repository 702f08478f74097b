"""The Pareto sweep: every policy at each value of its knob over one workload, cold starts against idle
instance-seconds, written as points.csv and pareto.png (one line per policy).

A point is one full simulation. With `jobs` > 1 the points run in forked worker processes that inherit
the arrivals (nothing is pickled but the results).
"""

from __future__ import annotations

import csv
import multiprocessing
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kold.controller.policies.registry import POLICIES, make_policy, policy_spec
from kold.controller.records import Arrival
from kold.controller.sim.engine import Progress, SimResult, simulate
from kold.controller.sim.model import SimConfig

COLUMNS = (
    "policy",
    "knob",
    "value",
    "spec",
    "cold_starts",
    "cold_start_rate",
    "wait_p99_s",
    "idle_instance_seconds",
    "instance_seconds",
    "instance_starts",
    "wall_s",
)


@dataclass(frozen=True)
class Point:
    policy: str
    knob: str
    value: float
    result: SimResult

    def row(self) -> dict[str, object]:
        r = self.result.to_dict()
        return {"policy": self.policy, "knob": self.knob, "value": self.value, "spec": r["policy"]} | {
            k: r[k] for k in COLUMNS[4:]
        }


def sweep_specs(policies: Sequence[str] | None = None) -> list[tuple[str, str, float, str]]:
    """(policy, knob, value, spec text) for every point: each policy's knob over its knob_values."""
    names = list(policies) if policies else list(POLICIES)
    out = []
    for name in names:
        cls: Any = POLICIES.get(name)  # a Policy class: its knob and knob_values are class variables
        if cls is None:
            raise ValueError(f"unknown prewarm policy {name!r}: known policies are {', '.join(sorted(POLICIES))}")
        knob: str = cls.knob
        for value in cls.knob_values:
            out.append((name, knob, float(value), policy_spec(name, **{knob: value})))
    return out


_ARRIVALS: Sequence[Arrival] = ()  # a forked worker's view of the workload
_CONFIG = SimConfig()


def _run_one(spec: str) -> SimResult:
    return simulate(_ARRIVALS, make_policy(spec), _CONFIG, label=spec)


def sweep(
    arrivals: Sequence[Arrival],
    config: SimConfig,
    *,
    policies: Sequence[str] | None = None,
    jobs: int = 1,
    on_point: Callable[[int, int, Point], None] | None = None,
    progress: Progress | None = None,
) -> list[Point]:
    """Every point of the sweep, in sweep order. `on_point(k, n, point)` as each one ends; `progress` is
    passed to each simulation when they run one at a time."""
    global _ARRIVALS, _CONFIG
    specs = sweep_specs(policies)
    points: list[Point] = []

    def add(k: int, result: SimResult) -> None:
        name, knob, value, _ = specs[k]
        point = Point(name, knob, value, result)
        points.append(point)
        if on_point is not None:
            on_point(len(points), len(specs), point)

    if jobs <= 1:
        for k, (_, _, _, spec) in enumerate(specs):
            add(k, simulate(arrivals, make_policy(spec), config, label=spec, progress=progress))
        return points
    _ARRIVALS, _CONFIG = arrivals, config
    try:
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
            futures = [pool.submit(_run_one, spec) for _, _, _, spec in specs]
            for k, future in enumerate(futures):
                add(k, future.result())
    finally:
        _ARRIVALS, _CONFIG = (), SimConfig()
    return points


def write_csv(path: Path, points: Sequence[Point]) -> None:
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for point in points:
            writer.writerow(point.row())


def plot(path: Path, points: Sequence[Point], title: str = "") -> None:
    """Cold starts against idle instance-hours, one line per policy through its knob's values (labelled)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    try:
        for name in dict.fromkeys(p.policy for p in points):
            mine = sorted((p for p in points if p.policy == name), key=lambda p: p.result.idle_instance_seconds)
            xs = [p.result.idle_instance_seconds / 3600 for p in mine]
            ys = [p.result.cold_starts for p in mine]
            (line,) = ax.plot(xs, ys, marker="o", label=f"{name} ({mine[0].knob})")
            for p, x, y in zip(mine, xs, ys, strict=True):
                ax.annotate(
                    f"{p.value:g}",
                    (x, y),
                    textcoords="offset points",
                    xytext=(4, 4),
                    fontsize=7,
                    color=line.get_color(),
                )
        ax.set_xlabel("idle instance-hours (alive with nothing in flight, starts and pre-warms included)")
        ax.set_ylabel("cold starts (requests that waited for an instance start)")
        ax.set_yscale("symlog", linthresh=10)  # the points that matter sit in the lowest decades; 0 stays drawable
        ax.set_title(title or "pre-warm policies: cold starts against idle cost")
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
