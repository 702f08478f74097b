"""compare: two synthetic runs side by side, and their CDFs overlaid."""

from __future__ import annotations

from pathlib import Path

import pytest
from matplotlib.image import imread
from results_records import failed, mixed_run, rec
from test_plots import pixels_of

from kold.loadgen.compare import CDF_FILE, TABLE_FILE, compare
from kold.loadgen.records import write_jsonl
from kold.loadgen.summary import summarize, write_summary


def write_run(folder: Path, records: list, settings: dict) -> Path:
    folder.mkdir(parents=True)
    write_jsonl(folder / "requests.jsonl", records)
    write_summary(folder, summarize(records, duration_s=20.0, settings=settings))
    return folder


def two_runs(tmp_path: Path) -> tuple[Path, Path]:
    vllm = [rec(scheduled_s=i * 0.5, ttft_s=0.02, latency_s=0.2, cold=None) for i in range(39)]
    vllm.append(failed("http_500", 500, scheduled_s=19.5))
    kold = write_run(tmp_path / "kold-run", mixed_run(), {"mode": "open", "pattern": "poisson"})
    other = write_run(tmp_path / "vllm-run", vllm, {"mode": "closed", "pattern": "constant"})
    return kold, other


def row(text: str, label: str) -> list[str]:
    line = next(line for line in text.splitlines() if line.startswith(label + "  "))
    return line[len(label) :].split()


def test_side_by_side_table(tmp_path: Path) -> None:
    kold, other = two_runs(tmp_path)
    text = compare([kold, other], None)
    assert text.splitlines()[0].split() == ["kold-run", "vllm-run"]
    assert row(text, "mode") == ["open", "closed"]
    assert row(text, "requests") == ["40", "40"]
    assert row(text, "failed") == ["4", "1"]
    assert row(text, "TTFT p50 (ms)") == ["74", "20"]  # i = 23 and 25 are the middle of the 36
    assert row(text, "TTFT p99 (ms)") == ["3162", "20"]  # 3.0 + 0.65 * 0.25 s
    assert row(text, "cold starts") == ["6", "-"]  # vLLM sends no x-kold headers: unknown, not 0
    assert row(text, "goodput share") == ["-", "-"]
    assert not (tmp_path / TABLE_FILE).exists()  # no out, no files


def test_overlaid_cdfs_are_written(tmp_path: Path) -> None:
    kold, other = two_runs(tmp_path)
    text = compare([kold, other], tmp_path / "cmp")
    assert (tmp_path / "cmp" / TABLE_FILE).read_text() in text
    image = tmp_path / "cmp" / CDF_FILE
    assert f"CDFs: {image}" in text
    assert imread(image).shape[1] == 1200
    assert pixels_of(image, "#1f77b4") > 100 and pixels_of(image, "#ff7f0e") > 100  # both runs drawn


def test_runs_with_the_same_name_and_without_records(tmp_path: Path) -> None:
    a = write_run(tmp_path / "a" / "run", [rec()], {})
    b = write_run(tmp_path / "b" / "run", [rec()], {})
    (b / "requests.jsonl").unlink()
    text = compare([a, b], tmp_path / "cmp")
    assert text.splitlines()[0].split() == [str(a), str(b)]
    assert f"left out of the CDFs: {b}" in text


def test_a_folder_that_is_not_a_run_is_named(tmp_path: Path) -> None:
    kold, _ = two_runs(tmp_path)
    with pytest.raises(ValueError, match=r"nothing-here: no summary\.json"):
        compare([kold, tmp_path / "nothing-here"], None)
    with pytest.raises(ValueError, match="at least one"):
        compare([], None)
