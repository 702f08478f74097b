"""The simulator's arrivals, read with the load generator's own readers (the same trace formats and the
same synthetic patterns as `kold loadgen run`), as `records.Arrival`s.

- azure-functions per-minute CSV: one function per row, named by its HashFunction (a repeated name gets
  `#row` appended); each minute's count is spread over the minute by the reader, seeded. The trace has no
  durations: the simulator's service time applies. Its span is all its minutes, the silent last ones too.
- azure-llm CSV and mooncake JSONL: one function (named after the file), each request's token counts kept,
  so its service time comes from the prefill and decode rates.
- synthetic patterns (loadgen/schedule.py), functions dealt round-robin; token counts only when shapes are
  given, else the service time applies. Their span is the pattern's duration.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kold.controller.records import Arrival
from kold.loadgen.schedule import PatternSpec, plan
from kold.loadgen.shapes import Fixed, Shape
from kold.loadgen.traces import TraceError, read_trace

_ONE = Fixed(1)  # the reader sizes requests of token-less traces; the simulator ignores those sizes


@dataclass(frozen=True)
class Workload:
    """Arrivals sorted by time, from 0, and the span they cover (None: up to the last arrival)."""

    arrivals: list[Arrival]
    end_s: float | None
    source: str


def from_trace(
    path: Path,
    *,
    fmt: str | None = None,
    seed: int = 0,
    speedup: float = 1.0,
    limit: int | None = None,
    start_s: float = 0.0,
) -> Workload:
    """A trace file as a workload. TraceError (file:line: problem) for a bad file, ValueError for a bad option."""
    header = _header(path)
    if fmt == "azure-functions" or (fmt is None and "hashfunction" in header):
        names = _function_names(path, header)
        planned = read_trace(
            path,
            fmt="azure-functions",
            speedup=speedup,
            limit=limit,
            start_s=start_s,
            functions=names,
            seed=seed,
            prompt=_ONE,
            output=_ONE,
        )
        minutes = sum(1 for name in header if name.isdigit())
        end = max(0.0, minutes * 60.0 - start_s) / speedup if limit is None else None
        return Workload([r.arrival(sized=False) for r in planned], end, f"{path} (azure-functions)")
    name = path.stem or "function"
    planned = read_trace(path, fmt=fmt, speedup=speedup, limit=limit, start_s=start_s, functions=[name], seed=seed)
    return Workload([r.arrival() for r in planned], None, f"{path} (one function)")


def from_pattern(
    spec: PatternSpec,
    functions: Sequence[str],
    *,
    seed: int = 0,
    prompt: Shape | None = None,
    output: Shape | None = None,
) -> Workload:
    """A synthetic pattern as a workload; with `prompt` and `output` shapes each request has token counts."""
    names = list(functions) or ["function"]
    sized = prompt is not None or output is not None
    planned = plan(spec, names, prompt or _ONE, output or _ONE, seed)
    arrivals = [r.arrival(sized) for r in planned]
    return Workload(arrivals, spec.duration_s, f"{spec.pattern} pattern")


def _header(path: Path) -> list[str]:
    """The first non-empty line's fields, lowercased (what tells the formats apart); [] if unreadable
    (the reader then reports the problem itself)."""
    try:
        with path.open(encoding="utf-8-sig", newline="") as f:
            for line in f:
                if line.strip():
                    return [name.strip().lower() for name in next(csv.reader([line]))]
    except FileNotFoundError:
        raise TraceError(path, None, "no such file") from None
    except (OSError, UnicodeDecodeError, csv.Error):
        return []
    return []


def _function_names(path: Path, header: list[str]) -> list[str]:
    """Each data row's HashFunction, in file order, made unique; the rows the reader skips (blank) skipped."""
    if "hashfunction" not in header:
        return []  # the reader reports the missing column, naming the line
    column = header.index("hashfunction")
    names: list[str] = []
    seen: set[str] = set()
    try:
        with path.open(encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f)
            next((row for row in reader if row), None)  # the header
            for row in reader:
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue
                name = row[column].strip() if column < len(row) else ""
                name = name or f"row{len(names) + 1}"
                if name in seen:
                    name = f"{name}#{len(names) + 1}"
                seen.add(name)
                names.append(name)
    except (OSError, UnicodeDecodeError, csv.Error):
        return names  # the reader reports it, naming the line
    return names
