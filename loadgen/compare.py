"""`kold loadgen compare RUN_A RUN_B ...`: the headline figures of several runs side by side.

The point of the generator is comparison (kold against what people run today, one setting against
another), so this reads only what every run folder has, summary.json (and requests.jsonl for the
overlaid CDFs), and prints the figures as text that pastes cleanly into an issue or a terminal.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from kold.loadgen.records import RequestRecord, read_jsonl
from kold.loadgen.summary import read_summary

CDF_FILE = "compare_cdf.png"
TABLE_FILE = "compare.txt"

Getter = Callable[[Mapping[str, Any]], Any]


def _at(*keys: str) -> Getter:
    def get(summary: Mapping[str, Any]) -> Any:
        value: Any = summary
        for key in keys:
            value = value.get(key) if isinstance(value, Mapping) else None
        return value

    return get


def _ms(value: Any) -> str:
    return "-" if value is None else f"{float(value) * 1000:.4g}"


def _plain(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


# (row label, where the figure is in summary.json, how it is shown)
ROWS: tuple[tuple[str, Getter, Callable[[Any], str]], ...] = (
    ("mode", _at("settings", "mode"), _plain),
    ("pattern", _at("settings", "pattern"), _plain),
    ("requests", _at("requests"), _plain),
    ("failed", _at("failed"), _plain),
    ("duration (s)", _at("duration_s"), _plain),
    ("sent (req/s)", _at("request_rate_rps"), _plain),
    ("throughput (req/s)", _at("throughput_rps"), _plain),
    ("output tokens/s", _at("output_tokens_per_s"), _plain),
    ("TTFT p50 (ms)", _at("ttft_s", "p50"), _ms),
    ("TTFT p90 (ms)", _at("ttft_s", "p90"), _ms),
    ("TTFT p99 (ms)", _at("ttft_s", "p99"), _ms),
    ("TTFT p99 from schedule (ms)", _at("ttft_sched_s", "p99"), _ms),
    ("latency p50 (ms)", _at("latency_s", "p50"), _ms),
    ("latency p99 (ms)", _at("latency_s", "p99"), _ms),
    ("ITL p50 (ms)", _at("itl_s", "p50"), _ms),
    ("ITL p99 (ms)", _at("itl_s", "p99"), _ms),
    ("TPOT p50 (ms)", _at("tpot_s", "p50"), _ms),
    ("lag p99 (ms)", _at("lag_s", "p99"), _ms),
    ("behind schedule", _at("behind_schedule"), _plain),
    ("cold starts", _at("cold_starts"), _plain),
    ("cold-start rate", _at("cold_start_rate"), _plain),
    ("cold TTFT p50 (ms)", _at("cold_ttft_s", "p50"), _ms),
    ("warm TTFT p50 (ms)", _at("warm_ttft_s", "p50"), _ms),
    ("goodput share", _at("goodput", "share"), _plain),
    ("goodput (req/s)", _at("goodput", "rps"), _plain),
)


def _names(runs: Sequence[Path]) -> list[str]:
    """Column names: each folder's name, or its whole path where two runs share a name."""
    names = [run.name or str(run) for run in runs]
    return [str(run) if names.count(name) > 1 else name for run, name in zip(runs, names, strict=True)]


def table(names: Sequence[str], summaries: Sequence[Mapping[str, Any]]) -> str:
    """The side-by-side text table: a row per figure, a right-aligned column per run."""
    rows = [[label, *(show(get(s)) for s in summaries)] for label, get, show in ROWS]
    header = ["", *names]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(cells)).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)]) + "\n"


def compare(runs: Sequence[Path], out: Path | None) -> str:
    """The table of `runs` (run folders written by `kold loadgen run --out`); with `out`, also writes
    compare.txt and compare_cdf.png (overlaid TTFT and latency CDFs from each run's requests.jsonl) there.
    A folder that is not a run is a ValueError naming it."""
    if not runs:
        raise ValueError("compare needs at least one run folder")
    summaries = [read_summary(run) for run in runs]
    names = _names(runs)
    text = table(names, summaries)
    if out is not None:
        from kold.loadgen.plots import plot_compare_cdf  # matplotlib only when a picture is asked for

        out.mkdir(parents=True, exist_ok=True)
        records: list[tuple[str, list[RequestRecord]]] = []
        missing = []
        for name, run in zip(names, runs, strict=True):
            if (run / "requests.jsonl").is_file():
                records.append((name, read_jsonl(run / "requests.jsonl")))
            else:
                missing.append(name)
        if missing:
            text += f"(no requests.jsonl, left out of the CDFs: {', '.join(missing)})\n"
        (out / TABLE_FILE).write_text(text, encoding="utf-8")
        written = plot_compare_cdf(out / CDF_FILE, records)
        text += f"table: {out / TABLE_FILE}\n" + (
            f"CDFs: {written}\n" if written else "CDFs: none (no succeeded requests)\n"
        )
    return text


__all__ = ["CDF_FILE", "ROWS", "TABLE_FILE", "compare", "table"]
