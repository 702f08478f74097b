"""Trace replay: production arrival times (and token counts, where the trace has them) as a plan.

Three formats, told apart by their first line when `fmt` is None:

- `azure-llm`: Azure's LLM inference traces, CSV `TIMESTAMP,ContextTokens,GeneratedTokens`. TIMESTAMP is an
  ISO date-time (`2023-11-16 18:15:46.6805900`, naive ones read as UTC) or a number of seconds. The prompt
  length is ContextTokens; `max_tokens` is GeneratedTokens with `ignore_eos`, so that output lengths are
  reproduced.
- `azure-functions`: Azure Functions' per-minute invocation counts, CSV
  `HashOwner,HashApp,HashFunction,Trigger,1,2,...,1440` (minute columns from 1 up, however many there are).
  Each row is a function, named by its HashFunction. Each minute's count is spread uniformly at random over
  that minute (a Poisson process given its count), from an rng derived from `seed`, the row and the minute:
  the same file and seed give the same times whatever `start_s` and `limit` are. The trace has no token
  counts, so the `prompt` and `output` shapes size the requests (and `ignore_eos` stays off).
- `mooncake`: Mooncake-style JSONL, one object a line with `timestamp` (milliseconds, as Mooncake's traces),
  `input_length` and `output_length` (used as azure-llm's token columns are); other keys are ignored.

Times are kept relative to the trace's start (its first row; minute 1's start for azure-functions),
divided by `speedup`. `start_s` skips the trace's first seconds (trace time, before the speedup) and the
replay begins at that point; `limit` keeps the first `limit` requests after it. Token counts of 0 are sent
as 1 (an OpenAI server accepts neither an empty prompt nor `max_tokens` 0).

Timestamps that go backwards are rejected, not sorted: a replay promises the trace's order and its
times both, and a file out of order is usually not the trace it seems (two files concatenated, the wrong
column); sort it first if that is what you mean.

`functions` maps trace functions to the target's functions:
- None (or empty): every request goes to "" (the target's one model);
- a list: azure-functions rows are dealt to it round-robin in file order (several rows may share a target
  function); the traces without functions (azure-llm, mooncake) deal their requests round-robin instead, as
  synthetic patterns do;
- a dict (azure-functions only): HashFunction -> target function; the rows it does not name are left out,
  so a dict also picks a few functions out of a large trace.
Malformed input raises TraceError naming the file, the line and the problem.
"""

from __future__ import annotations

import csv
import io
import json
import math
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .schedule import MAX_REQUESTS, PlannedRequest
from .shapes import Shape

FORMATS = ("azure-llm", "azure-functions", "mooncake")
_LLM_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
_FUNCTION_COLUMNS = ("HashOwner", "HashApp", "HashFunction", "Trigger")
_MOONCAKE_KEYS = ("timestamp", "input_length", "output_length")


class TraceError(ValueError):
    """A trace that cannot be replayed: the file, the line (None for the whole file) and the problem."""

    def __init__(self, path: Path, line: int | None, problem: str) -> None:
        self.path = path
        self.line = line
        self.problem = problem
        super().__init__(f"{path}:{line}: {problem}" if line is not None else f"{path}: {problem}")


@dataclass(frozen=True)
class _Row:
    t_s: float  # seconds from the trace's start
    prompt_tokens: int
    output_tokens: int


def read_trace(
    path: Path,
    *,
    fmt: str | None = None,
    speedup: float = 1.0,
    limit: int | None = None,
    start_s: float = 0.0,
    functions: Mapping[str, str] | Sequence[str] | None = None,
    seed: int = 0,
    prompt: Shape | None = None,
    output: Shape | None = None,
) -> list[PlannedRequest]:
    """The trace at `path` as a plan sorted by `at_s` (see the module docstring for the formats and options).

    `prompt` and `output` size the requests of formats without token counts (azure-functions), where they
    are required; the others ignore them. ValueError for a bad option, TraceError for a bad file."""
    if fmt is not None and fmt not in FORMATS:
        raise ValueError(f"trace format: unknown format {fmt!r} (one of {', '.join(FORMATS)})")
    if not (isinstance(speedup, int | float) and math.isfinite(speedup) and speedup > 0):
        raise ValueError(f"speedup: must be a number above 0 (got {speedup!r})")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit: must be a whole number of at least 1 (got {limit!r})")
    if not (isinstance(start_s, int | float) and math.isfinite(start_s) and start_s >= 0):
        raise ValueError(f"start_s: must be a number of seconds, 0 or more (got {start_s!r})")
    if isinstance(functions, str):
        raise ValueError("functions: give a list or a dict of function names, not one string")

    text = _read_text(path)
    fmt = fmt or _detect(path, text)
    if fmt == "azure-functions":
        if prompt is None or output is None:
            raise ValueError("azure-functions traces have no token counts: give the prompt and output shapes")
        return _replay_functions(path, text, speedup, limit, start_s, functions, seed, prompt, output)
    if isinstance(functions, Mapping):
        raise ValueError(f"functions: a {fmt} trace has no function names to map; give a list (dealt round-robin)")
    rows = _llm_rows(path, text) if fmt == "azure-llm" else _mooncake_rows(path, text)
    names = list(functions or []) or [""]
    out: list[PlannedRequest] = []
    for row in rows:
        if row.t_s < start_s:
            continue
        if limit is not None and len(out) >= limit:
            break
        if len(out) >= MAX_REQUESTS:
            raise TraceError(path, None, f"more than {MAX_REQUESTS:,} requests to replay: give a limit")
        out.append(
            PlannedRequest(
                at_s=(row.t_s - start_s) / speedup,
                function=names[len(out) % len(names)],
                prompt_tokens=max(1, row.prompt_tokens),
                max_tokens=max(1, row.output_tokens),
                ignore_eos=True,
            )
        )
    if not out:
        raise TraceError(path, None, f"no requests to replay (start_s={start_s:g})")
    return out


def parse_functions(text: str) -> list[str] | dict[str, str]:
    """A function mapping from its command-line form: `a,b,c` (a list), or the path of a small JSON or
    YAML file holding a list of names or a {trace function: target function} object."""
    candidate = Path(text)
    if candidate.suffix.lower() in (".json", ".yaml", ".yml"):
        try:
            raw = candidate.read_text(encoding="utf-8")
        except OSError as e:
            raise ValueError(f"functions: cannot read {candidate}: {e.strerror or e}") from None
        data: Any
        if candidate.suffix.lower() == ".json":
            try:
                data = json.loads(raw)
            except ValueError as e:
                raise ValueError(f"functions: {candidate} is not valid JSON: {e}") from None
        else:
            import yaml

            try:
                data = yaml.safe_load(raw)
            except yaml.YAMLError as e:
                raise ValueError(f"functions: {candidate} is not valid YAML: {e}") from None
        if isinstance(data, list) and data and all(isinstance(x, str) and x for x in data):
            return list(data)
        if (
            isinstance(data, dict)
            and data
            and all(isinstance(k, str) and isinstance(v, str) and v for k, v in data.items())
        ):
            return dict(data)
        raise ValueError(f"functions: {candidate} must hold a list of names or an object of name -> name")
    names = [part.strip() for part in text.split(",")]
    if not text.strip() or not all(names):
        raise ValueError(f"functions: {text!r} is not a comma-separated list of names")
    return names


# -- reading ------------------------------------------------------------------------------------------


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise TraceError(path, None, f"not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise TraceError(path, None, f"cannot read: {e.strerror or e}") from None


def _detect(path: Path, text: str) -> str:
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            return "mooncake"
        header = {name.strip().lower() for name in next(csv.reader([line]))}
        # one known column is enough: a missing one is then reported as missing, not as an unknown format
        if header & {c.lower() for c in _LLM_COLUMNS}:
            return "azure-llm"
        if header & {c.lower() for c in _FUNCTION_COLUMNS}:
            return "azure-functions"
        raise TraceError(
            path,
            number,
            f"unknown trace format (header {line[:80]!r}): expected azure-llm ({','.join(_LLM_COLUMNS)}), "
            f"azure-functions ({','.join(_FUNCTION_COLUMNS)},1..1440) or mooncake JSONL ({', '.join(_MOONCAKE_KEYS)})",
        )
    raise TraceError(path, None, "empty file")


def _csv(path: Path, text: str, required: Sequence[str]) -> tuple[dict[str, int], int, Iterator[tuple[int, list[str]]]]:
    """The header's column positions (by lowercased name), its line and the data rows with their line numbers."""
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(row for row in reader if row)
    except StopIteration:
        raise TraceError(path, None, "empty file") from None
    except csv.Error as e:
        raise TraceError(path, reader.line_num, f"bad CSV: {e}") from None
    header_line = reader.line_num
    columns = {name.strip().lower(): i for i, name in enumerate(header)}
    for name in required:
        if name.lower() not in columns:
            raise TraceError(path, header_line, f"missing column {name} (header: {','.join(header)[:120]})")

    def rows() -> Iterator[tuple[int, list[str]]]:
        try:
            for row in reader:
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue
                if len(row) != len(header):
                    raise TraceError(path, reader.line_num, f"expected {len(header)} fields, got {len(row)}")
                yield reader.line_num, row
        except csv.Error as e:
            raise TraceError(path, reader.line_num, f"bad CSV: {e}") from None

    return columns, header_line, rows()


def _count(path: Path, line: int, column: str, value: object) -> int:
    """A token or invocation count: a whole number, 0 or more."""
    if isinstance(value, str):
        try:
            number = int(value.strip())
        except ValueError:
            raise TraceError(path, line, f"{column}: {value!r} is not a whole number") from None
    elif isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, float) and value.is_integer():
        number = int(value)
    else:
        raise TraceError(path, line, f"{column}: {value!r} is not a whole number")
    if number < 0:
        raise TraceError(path, line, f"{column}: {number} is negative")
    return number


def _check_order(path: Path, line: int, t_s: float, previous: float | None) -> None:
    if previous is not None and t_s < previous:
        raise TraceError(
            path, line, f"timestamp goes backwards ({t_s:.6f} s after the start, the line before was {previous:.6f} s)"
        )


def _llm_rows(path: Path, text: str) -> Iterator[_Row]:
    columns, _, rows = _csv(path, text, _LLM_COLUMNS)
    ts, ctx, gen = (columns[c.lower()] for c in _LLM_COLUMNS)
    origin: datetime | float | None = None
    previous: float | None = None
    for line, row in rows:
        stamp = _timestamp(path, line, row[ts])
        if origin is None:
            origin = stamp
        if isinstance(origin, datetime) and isinstance(stamp, datetime):
            t_s = (stamp - origin).total_seconds()
        elif isinstance(origin, float) and isinstance(stamp, float):
            t_s = stamp - origin
        else:
            raise TraceError(path, line, f"TIMESTAMP: {row[ts]!r} mixes numbers and date-times")
        _check_order(path, line, t_s, previous)
        previous = t_s
        yield _Row(t_s, _count(path, line, "ContextTokens", row[ctx]), _count(path, line, "GeneratedTokens", row[gen]))


def _timestamp(path: Path, line: int, text: str) -> datetime | float:
    text = text.strip()
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        if not math.isfinite(seconds):
            raise TraceError(path, line, f"TIMESTAMP: {text!r} is not a time")
        return seconds
    try:
        stamp = datetime.fromisoformat(text)
    except ValueError:
        raise TraceError(path, line, f"TIMESTAMP: {text!r} is not a date-time nor a number of seconds") from None
    return stamp if stamp.tzinfo is not None else stamp.replace(tzinfo=UTC)


def _mooncake_rows(path: Path, text: str) -> Iterator[_Row]:
    origin: float | None = None
    previous: float | None = None
    for line, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except ValueError as e:
            raise TraceError(path, line, f"not a JSON object: {e}") from None
        if not isinstance(obj, dict):
            raise TraceError(path, line, "not a JSON object")
        for key in _MOONCAKE_KEYS:
            if key not in obj:
                raise TraceError(path, line, f"missing key {key}")
        stamp = obj["timestamp"]
        if isinstance(stamp, bool) or not isinstance(stamp, int | float) or not math.isfinite(stamp):
            raise TraceError(path, line, f"timestamp: {stamp!r} is not a number of milliseconds")
        if origin is None:
            origin = float(stamp)
        t_s = (stamp - origin) / 1000.0
        _check_order(path, line, t_s, previous)
        previous = t_s
        yield _Row(
            t_s,
            _count(path, line, "input_length", obj["input_length"]),
            _count(path, line, "output_length", obj["output_length"]),
        )


# -- azure-functions ----------------------------------------------------------------------------------


@dataclass
class _FunctionRow:
    index: int  # the row's position among the data rows: part of its rng seed
    target: str
    minutes: list[tuple[int, int]]  # (minute from 0, count) for the minutes with a count


def _replay_functions(
    path: Path,
    text: str,
    speedup: float,
    limit: int | None,
    start_s: float,
    functions: Mapping[str, str] | Sequence[str] | None,
    seed: int,
    prompt: Shape,
    output: Shape,
) -> list[PlannedRequest]:
    columns, header_line, rows = _csv(path, text, (*_FUNCTION_COLUMNS, "1"))
    minute_columns: list[int] = []
    while str(len(minute_columns) + 1) in columns:
        minute_columns.append(columns[str(len(minute_columns) + 1)])
    stray = sorted(name for name in columns if name.isdigit() and not 1 <= int(name) <= len(minute_columns))
    if stray:
        raise TraceError(
            path, header_line, f"minute columns must run 1, 2, 3, ... without a gap: column {stray[0]} follows a gap"
        )
    name_column = columns["hashfunction"]
    names = list(functions) if isinstance(functions, Sequence) else []
    first_minute = math.floor(start_s / 60)

    selected: list[_FunctionRow] = []
    for index, (line, row) in enumerate(rows):
        counts = [_count(path, line, f"minute {m + 1}", row[col]) for m, col in enumerate(minute_columns)]
        if isinstance(functions, Mapping):
            target = functions.get(row[name_column].strip())
            if target is None:
                continue
        else:
            target = names[index % len(names)] if names else ""
        selected.append(_FunctionRow(index, target, [(m, n) for m, n in enumerate(counts) if n and m >= first_minute]))
    if not selected:
        raise TraceError(
            path, None, "no functions to replay" + (" (the mapping names none of them)" if functions else "")
        )

    total = sum(n for fn in selected for _, n in fn.minutes)
    if min(total, limit or total) > MAX_REQUESTS:
        raise TraceError(
            path, None, f"{total:,} requests to replay, more than {MAX_REQUESTS:,}: give a limit or map fewer functions"
        )
    by_minute: dict[int, list[tuple[_FunctionRow, int]]] = {}
    for fn in selected:
        for minute, n in fn.minutes:
            by_minute.setdefault(minute, []).append((fn, n))

    prompt_rng = random.Random(f"{seed}/prompt")
    output_rng = random.Random(f"{seed}/output")
    out: list[PlannedRequest] = []
    for minute in sorted(by_minute):
        arrivals: list[tuple[float, int, str]] = []
        for fn, n in by_minute[minute]:
            rng = random.Random(f"{seed}/{fn.index}/{minute}")
            arrivals.extend((60.0 * (minute + rng.random()), fn.index, fn.target) for _ in range(n))
        arrivals.sort()
        for t_s, _, target in arrivals:
            if t_s < start_s:
                continue
            if limit is not None and len(out) >= limit:
                return out
            out.append(
                PlannedRequest(
                    at_s=(t_s - start_s) / speedup,
                    function=target,
                    prompt_tokens=prompt.draw(prompt_rng),
                    max_tokens=output.draw(output_rng),
                )
            )
    if not out:
        raise TraceError(path, None, f"no requests to replay (start_s={start_s:g})")
    return out
