"""The run's plots: written when there is data, 1200 px wide, and showing what they claim to."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.image import imread
from results_records import failed, mixed_run, rec

from kold.loadgen.plots import COLD, plot_all, plot_ttft_over_time
from kold.loadgen.summary import summarize


def pixels_of(path: Path, colour: str) -> int:
    """How many pixels of the PNG are (nearly) the given #rrggbb colour."""
    image = imread(path)[:, :, :3]
    rgb = np.array([int(colour[i : i + 2], 16) / 255 for i in (1, 3, 5)])
    return int((np.abs(image - rgb).max(axis=2) < 0.02).sum())


def sweep_summary() -> tuple[list, dict]:
    records = [
        rec(scheduled_s=stage * 5 + i / rate, ttft_s=0.05 * (1 + stage), latency_s=0.5 * (1 + stage), stage=stage)
        for stage, rate in enumerate([1, 2, 4])
        for i in range(5 * rate)
    ]
    return records, summarize(records, duration_s=15.0, settings={"pattern": "sweep", "rates": [1, 2, 4], "stage_s": 5})


def test_every_plot_is_written_for_a_kold_sweep(tmp_path: Path) -> None:
    records, summary = sweep_summary()
    records += mixed_run()
    instances = [
        {"t_s": float(t), "function": "f", "starting": int(t == 2), "ready": int(t > 2), "draining": 0}
        for t in range(10)
    ]
    paths = plot_all(tmp_path / "run", records, summary, instances)
    assert [p.name for p in paths] == ["latency_cdf.png", "ttft_over_time.png", "instances.png", "sweep.png"]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        height, width, _ = imread(path).shape
        assert width == 1200 and 400 <= height <= 600  # readable at 1200 px
        assert pixels_of(path, "#ffffff") < height * width * 0.97  # something is drawn


def test_plots_without_data_are_left_out(tmp_path: Path) -> None:
    only_failures = [failed("connection_refused"), failed("connection_refused", scheduled_s=1.0)]
    summary = summarize(only_failures, duration_s=1.0, settings={})
    paths = plot_all(tmp_path, only_failures, summary, None)
    assert [p.name for p in paths] == ["ttft_over_time.png"]  # the failures, on the time axis
    assert plot_all(tmp_path / "empty", [], summarize([], duration_s=0.0, settings={}), []) == []


def test_cold_starts_are_marked_in_the_ttft_plot(tmp_path: Path) -> None:
    warm_only = [rec(scheduled_s=float(i), ttft_s=0.05) for i in range(10)]
    with_cold = [*warm_only, rec(scheduled_s=3.5, ttft_s=2.0, cold=True)]
    cold_path = plot_ttft_over_time(tmp_path / "cold.png", with_cold)
    warm_path = plot_ttft_over_time(tmp_path / "warm.png", warm_only)
    assert cold_path is not None and warm_path is not None
    assert pixels_of(cold_path, COLD) > 50
    assert pixels_of(warm_path, COLD) == 0
