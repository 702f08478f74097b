"""A run's PNG plots: the pictures that show a cold start where a table shows only a p99.

matplotlib's object API (Figure + its Agg canvas), never pyplot: no global figure state, no backend
switch, nothing that could open a window or leak figures across runs in one process. Every figure is
1200 px wide (12 in at 100 dpi) with labelled axes and units, so it reads well in report.html.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from kold.loadgen.records import RequestRecord
from kold.loadgen.stats import ecdf

DPI = 100
WIDTH_IN = 12.0
COLD, WARM, UNKNOWN, ERROR = "#d62728", "#1f77b4", "#7f7f7f", "#000000"
STATE_COLOURS = {"starting": "#ff7f0e", "ready": "#2ca02c", "draining": "#9467bd"}
MAX_FUNCTION_PANELS = 4  # more functions than this are summed into one panel

# The files plot_all may write, by what they show (the report orders and captions them by this).
PLOT_FILES = {
    "latency_cdf.png": "TTFT and end-to-end latency CDFs, cold and warm requests apart",
    "ttft_over_time.png": "TTFT of each request over the run, cold starts marked",
    "instances.png": "The target's instances by state over the run",
    "sweep.png": "Throughput and latency by offered rate (sweep)",
}


def _figure(panels: int = 1, height_in: float = 5.0) -> tuple[Figure, list[Axes]]:
    fig = Figure(figsize=(WIDTH_IN, height_in), dpi=DPI, layout="constrained")
    axes = fig.subplots(1, panels, squeeze=False)[0]
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.tick_params(labelsize=11)
    return fig, list(axes)


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, format="png", dpi=DPI)
    return path


def _log_if_spread(ax: Axes, values: Sequence[float], axis: str) -> None:
    """A log scale when the values span more than 50x (a 3 s cold start beside 30 ms warm requests
    would flatten the warm ones into one line on a linear axis)."""
    positive = [v for v in values if v > 0]
    if positive and len(positive) == len(values) and max(positive) / min(positive) > 50:
        (ax.set_xscale if axis == "x" else ax.set_yscale)("log")


def _split(records: Sequence[RequestRecord]) -> list[tuple[str, str, list[RequestRecord]]]:
    """Succeeded requests by cold/warm/unknown, only the groups that have any."""
    ok = [r for r in records if r.error is None]
    groups = [
        ("cold", COLD, [r for r in ok if r.cold is True]),
        ("warm", WARM, [r for r in ok if r.cold is False]),
        ("unknown (no x-kold headers)", UNKNOWN, [r for r in ok if r.cold is None]),
    ]
    return [g for g in groups if g[2]]


_CDF_PANELS = (("ttft_s", "Time to first token"), ("latency_s", "End-to-end latency"))


def _cdf_panel(ax: Axes, title: str, lines: Sequence[tuple[str, str | None, list[float]]]) -> None:
    """One CDF panel: a step line per (label, colour or None for the cycle, values), log x when spread."""
    every: list[float] = []
    for label, colour, values in lines:
        if values:
            xs, ys = ecdf(values)
            xs, ys = [xs[0], *xs], [0.0, *ys]  # the step starts from 0 at the fastest request
            ax.step(xs, ys, where="post", color=colour, linewidth=2, label=f"{label} (n={len(values)})")
            every.extend(values)
    _log_if_spread(ax, every, "x")
    ax.set_title(title, fontsize=13)
    ax.set_xlabel(f"{title} (s)", fontsize=12)
    ax.set_ylabel("Share of requests (CDF)", fontsize=12)
    ax.set_ylim(0, 1.02)
    if every:
        ax.legend(fontsize=11, loc="lower right")


def _measured(records: Sequence[RequestRecord], field: str) -> list[float]:
    return [float(getattr(r, field)) for r in records if getattr(r, field) is not None]


def plot_latency_cdf(path: Path, records: Sequence[RequestRecord]) -> Path | None:
    """TTFT and end-to-end latency CDFs, one line per group (cold, warm, unknown)."""
    groups = _split(records)
    if not groups:
        return None
    fig, axes = _figure(2)
    for ax, (field, title) in zip(axes, _CDF_PANELS, strict=True):
        _cdf_panel(ax, title, [(label, colour, _measured(rs, field)) for label, colour, rs in groups])
    return _save(fig, path)


def plot_ttft_over_time(path: Path, records: Sequence[RequestRecord]) -> Path | None:
    """Each request's TTFT at its send time; cold starts as red crosses, failures as ticks on the
    time axis (they have no TTFT)."""
    if not records:
        return None
    fig, (ax,) = _figure(1)
    shown: list[float] = []
    for label, colour, rs in _split(records):
        points = [(r.sent_s, r.ttft_s) for r in rs if r.ttft_s is not None]
        if not points:
            continue
        marker, size = ("X", 70) if colour == COLD else ("o", 14)
        ax.scatter(
            [p[0] for p in points], [p[1] for p in points], s=size, c=colour, marker=marker, label=label, zorder=3
        )
        shown.extend(p[1] for p in points)
    errors = [r.sent_s for r in records if r.error is not None]
    if errors:
        # at the bottom edge of the plot, whatever the y scale: x in data units, y in axes units
        ax.scatter(errors, [0.0] * len(errors), transform=ax.get_xaxis_transform(), marker="|", s=200, c=ERROR)
        ax.scatter([], [], marker="|", s=200, c=ERROR, label=f"failed (n={len(errors)})")
    _log_if_spread(ax, shown, "y")
    ax.set_title("TTFT over the run", fontsize=13)
    ax.set_xlabel("Send time since the run's start (s)", fontsize=12)
    ax.set_ylabel("Time to first token (s)", fontsize=12)
    ax.legend(fontsize=11, loc="best")
    return _save(fig, path)


def plot_instances(path: Path, instances: Sequence[Mapping[str, Any]]) -> Path | None:
    """Instances by state over time, from the samples the runner took of a kold target: one panel per
    function (up to four), else one panel of all functions summed."""
    samples = [s for s in instances if isinstance(s.get("t_s"), int | float)]
    if not samples:
        return None
    functions = sorted({str(s.get("function", "")) for s in samples})
    panels = functions if len(functions) <= MAX_FUNCTION_PANELS else ["all functions"]
    fig, axes = _figure(len(panels), height_in=4.5)
    for ax, function in zip(axes, panels, strict=True):
        mine = (
            samples if function == "all functions" else [s for s in samples if str(s.get("function", "")) == function]
        )
        by_time: dict[float, dict[str, int]] = {}
        for sample in mine:  # functions sampled at the same instant are summed
            counts = by_time.setdefault(float(sample["t_s"]), dict.fromkeys(STATE_COLOURS, 0))
            for state in STATE_COLOURS:
                counts[state] += int(sample.get(state) or 0)
        times = sorted(by_time)
        highest = 1
        for state, colour in STATE_COLOURS.items():
            series = [by_time[t][state] for t in times]
            highest = max(highest, *series)
            ax.step(times, series, where="post", color=colour, linewidth=2, label=state)
        ax.set_ylim(-0.05 * highest, highest * 1.15 + 0.2)
        ax.set_title(f"Instances: {function}" if function else "Instances", fontsize=13)
        ax.set_xlabel("Time since the run's start (s)", fontsize=12)
        ax.set_ylabel("Instances", fontsize=12)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=11, loc="best")
    return _save(fig, path)


def plot_sweep(path: Path, stages: Sequence[Mapping[str, Any]]) -> Path | None:
    """A sweep's throughput and latency against the offered rate (the sent rate when the offered one
    is not known): where the throughput leaves the diagonal and the latency turns up, the target
    saturated."""
    points = []
    for s in stages:
        x = s.get("rate_rps") if s.get("rate_rps") is not None else s.get("sent_rps")
        if isinstance(x, int | float):
            points.append((float(x), s))
    if not points:
        return None
    points.sort(key=lambda p: p[0])
    xs = [p[0] for p in points]
    fig, (tp_ax, lat_ax) = _figure(2)
    tp = [p[1].get("throughput_rps") for p in points]
    tp_ax.plot(xs, [math.nan if v is None else v for v in tp], "o-", color=WARM, linewidth=2, label="throughput")
    tp_ax.plot([0, max(xs)], [0, max(xs)], "--", color=UNKNOWN, label="offered = served")
    tp_ax.set_title("Throughput by rate", fontsize=13)
    tp_ax.set_xlabel("Offered rate (requests/s)", fontsize=12)
    tp_ax.set_ylabel("Succeeded requests/s", fontsize=12)
    tp_ax.legend(fontsize=11, loc="upper left")
    every: list[float] = []
    for field, name, colour in (("ttft_s", "TTFT", COLD), ("latency_s", "latency", WARM)):
        for stat, style in (("p50", "o-"), ("p99", "s--")):
            ys = [(p[1].get(field) or {}).get(stat) for p in points]
            every.extend(y for y in ys if y is not None)
            lat_ax.plot(
                xs, [math.nan if y is None else y for y in ys], style, color=colour, linewidth=2, label=f"{name} {stat}"
            )
    _log_if_spread(lat_ax, every, "y")
    lat_ax.set_title("Latency by rate", fontsize=13)
    lat_ax.set_xlabel("Offered rate (requests/s)", fontsize=12)
    lat_ax.set_ylabel("Seconds", fontsize=12)
    lat_ax.legend(fontsize=11, loc="upper left")
    return _save(fig, path)


def plot_compare_cdf(path: Path, runs: Sequence[tuple[str, Sequence[RequestRecord]]]) -> Path | None:
    """Several runs' TTFT and end-to-end latency CDFs overlaid (succeeded requests), for compare."""
    if not any(r.error is None for _, records in runs for r in records):
        return None
    fig, axes = _figure(2)
    for ax, (field, title) in zip(axes, _CDF_PANELS, strict=True):
        lines = [(name, None, _measured([r for r in records if r.error is None], field)) for name, records in runs]
        _cdf_panel(ax, title, lines)
    return _save(fig, path)


def plot_all(
    out: Path,
    records: Sequence[RequestRecord],
    summary: Mapping[str, Any],
    instances: Sequence[Mapping[str, Any]] | None,
) -> list[Path]:
    """Write every plot that has data into the run's folder `out`; the paths written, in report order."""
    out.mkdir(parents=True, exist_ok=True)
    written = [
        plot_latency_cdf(out / "latency_cdf.png", records),
        plot_ttft_over_time(out / "ttft_over_time.png", records),
        plot_instances(out / "instances.png", instances or []),
        plot_sweep(out / "sweep.png", summary.get("stages") or []),
    ]
    return [p for p in written if p is not None]


__all__ = [
    "PLOT_FILES",
    "plot_all",
    "plot_compare_cdf",
    "plot_instances",
    "plot_latency_cdf",
    "plot_sweep",
    "plot_ttft_over_time",
]
