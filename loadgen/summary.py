"""summary.json and summary.csv: a run's records reduced to the figures people publish.

Every figure is computed from requests.jsonl alone (plus the run's length and settings), so anyone can
recompute it. Conventions, also in loadgen/README.md:
- a request *succeeded* when its record has no error; latency figures (TTFT, TTST, latency, ITL,
  TPOT, and their scheduled-time variants) are over succeeded requests only, while the schedule lag
  is over every request (it measures the generator, not the server);
- a figure that was not measured is null, never 0 (no `x-kold-*` headers: `cold_starts` is null);
- the run is *behind schedule* when the lag p99 exceeds 10 ms: the client, not the server, set the
  pace, and every output says so.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kold.loadgen.records import RequestRecord
from kold.loadgen.stats import PERCENTILE_KEYS, percentiles

SCHEMA_VERSION = 1
LAG_LIMIT_S = 0.010  # lag p99 above this marks the run as behind schedule (the fidelity bar), by default
SLO_KEYS = ("ttft", "tpot", "e2e")  # seconds: time to first token, time per output token, end to end

# The percentile objects of summary.json, in the order the report and the csv show them.
DISTRIBUTIONS = (
    "ttft_s",
    "ttst_s",
    "latency_s",
    "itl_s",
    "tpot_s",
    "lag_s",
    "ttft_sched_s",
    "latency_sched_s",
    "cold_ttft_s",
    "warm_ttft_s",
)


def parse_slo(text: str) -> dict[str, float]:
    """`"ttft=2,tpot=0.1,e2e=30"` (seconds) as {"ttft": 2.0, ...}; a ValueError naming the bad part."""
    slo: dict[str, float] = {}
    for part in text.split(","):
        item = part.strip()
        if not item:
            continue
        key, sep, value = item.partition("=")
        key = key.strip().lower()
        if not sep or key not in SLO_KEYS:
            raise ValueError(
                f"bad SLO {item!r} in {text!r}: expected KEY=SECONDS with KEY one of {', '.join(SLO_KEYS)}"
            )
        if key in slo:
            raise ValueError(f"SLO {key!r} given twice in {text!r}")
        try:
            seconds = float(value)
        except ValueError:
            raise ValueError(f"bad SLO {item!r} in {text!r}: {value.strip()!r} is not a number of seconds") from None
        if not (math.isfinite(seconds) and seconds > 0):
            raise ValueError(f"bad SLO {item!r} in {text!r}: the limit must be a positive number of seconds")
        slo[key] = seconds
    if not slo:
        raise ValueError(f"no SLO in {text!r}: expected e.g. ttft=2,tpot=0.1,e2e=30")
    return slo


def meets_slo(record: RequestRecord, slo: Mapping[str, float]) -> bool:
    """Whether one request met every SLO. A failed request meets none. Times count from the actual send
    (the server's share; the scheduled-time figures are reported beside them). A figure that was not
    measured cannot be claimed, with two sound exceptions: without a TTFT (a non-streamed response)
    the latency bounds it from above, and a response of at most one token has no time per token."""
    if record.error is not None:
        return False
    if "ttft" in slo:
        first = record.ttft_s if record.ttft_s is not None else record.latency_s
        if first is None or first > slo["ttft"]:
            return False
    if "e2e" in slo and (record.latency_s is None or record.latency_s > slo["e2e"]):
        return False
    if "tpot" in slo:
        if record.tpot_s is None:
            return record.completion_tokens is not None and record.completion_tokens <= 1
        if record.tpot_s > slo["tpot"]:
            return False
    return True


def _rate(count: float, seconds: float | None) -> float | None:
    return count / seconds if seconds is not None and seconds > 0 else None


def _values(records: Sequence[RequestRecord], field: str) -> list[float]:
    out: list[float] = []
    for r in records:
        v = getattr(r, field)
        if v is not None:
            out.append(float(v))
    return out


def _cold(records: Sequence[RequestRecord]) -> dict[str, Any]:
    """Cold starts, from the records that carried kold's headers (the others say nothing either way)."""
    known = [r for r in records if r.cold is not None]
    cold = [r for r in known if r.cold]
    ok = [r for r in records if r.error is None]
    breakdown: dict[str, dict[str, float | None]] = {}
    for key in sorted({k for r in cold if r.cold_start for k in r.cold_start}):
        breakdown[key] = percentiles([float(r.cold_start[key]) for r in cold if r.cold_start and key in r.cold_start])
    return {
        "cold_starts": len(cold) if known else None,
        "cold_known": len(known),
        "cold_start_rate": len(cold) / len(known) if known else None,
        "cold_ttft_s": percentiles(_values([r for r in ok if r.cold is True], "ttft_s")),
        "warm_ttft_s": percentiles(_values([r for r in ok if r.cold is False], "ttft_s")),
        "cold_start_breakdown_ms": breakdown or None,
    }


def _prompt_error(records: Sequence[RequestRecord]) -> dict[str, Any] | None:
    """How far the prompts were from their target length, by the server's own count (usage)."""
    pairs = [(r.prompt_tokens, r.target_prompt_tokens) for r in records if r.prompt_tokens is not None]
    if not pairs:
        return None
    diffs = [float(got - want) for got, want in pairs]
    rel = [abs(got - want) / want for got, want in pairs if want > 0]
    return {
        "reported": len(pairs),
        "mean_error": math.fsum(diffs) / len(diffs),
        "mean_abs_error": math.fsum(abs(d) for d in diffs) / len(diffs),
        "mean_rel_error": math.fsum(rel) / len(rel) if rel else None,
    }


def _goodput(records: Sequence[RequestRecord], slo: Mapping[str, float], duration_s: float | None) -> dict[str, Any]:
    met = sum(1 for r in records if meets_slo(r, slo))
    return {
        "slo": {k: float(v) for k, v in slo.items()},
        "met": met,
        "share": met / len(records) if records else None,
        "rps": _rate(met, duration_s),
    }


def _stage_window(
    stage_records: Sequence[RequestRecord], next_start: float | None, stage_s: float | None
) -> float | None:
    """A stage's length: the configured hold time when known, else from its first scheduled send to the
    next stage's (the last stage: to its last response's end)."""
    if stage_s is not None and stage_s > 0:
        return stage_s
    start = min(r.scheduled_s for r in stage_records)
    if next_start is not None:
        end = next_start
    else:
        end = max(r.sent_s + (r.latency_s or 0.0) for r in stage_records)
    return end - start if end > start else None


def _stages(
    records: Sequence[RequestRecord], settings: Mapping[str, Any], slo: Mapping[str, float] | None
) -> list[dict[str, Any]]:
    """Per-stage results of a sweep: what was offered, what was sent and served, and at what latency."""
    rates = settings.get("rates")
    stage_s = settings.get("stage_s")
    hold = float(stage_s) if isinstance(stage_s, int | float) else None
    by_stage: dict[int, list[RequestRecord]] = {}
    for r in records:
        by_stage.setdefault(r.stage, []).append(r)
    order = sorted(by_stage)
    out: list[dict[str, Any]] = []
    for i, stage in enumerate(order):
        rs = by_stage[stage]
        next_start = min(r.scheduled_s for r in by_stage[order[i + 1]]) if i + 1 < len(order) else None
        window = _stage_window(rs, next_start, hold)
        ok = [r for r in rs if r.error is None]
        offered = rates[stage] if isinstance(rates, Sequence) and 0 <= stage < len(rates) else None
        out.append(
            {
                "stage": stage,
                "rate_rps": float(offered) if isinstance(offered, int | float) else None,
                "duration_s": window,
                "requests": len(rs),
                "failed": len(rs) - len(ok),
                "sent_rps": _rate(len(rs), window),
                "throughput_rps": _rate(len(ok), window),
                "output_tokens_per_s": _rate(sum(r.completion_tokens or 0 for r in ok), window),
                "ttft_s": percentiles(_values(ok, "ttft_s")),
                "latency_s": percentiles(_values(ok, "latency_s")),
                "ttft_sched_s": percentiles(_values(ok, "ttft_sched_s")),
                "lag_p99_s": percentiles(_values(rs, "lag_s"))["p99"],
                "cold_starts": sum(1 for r in rs if r.cold) if any(r.cold is not None for r in rs) else None,
                "goodput_share": sum(1 for r in rs if meets_slo(r, slo)) / len(rs) if slo else None,
            }
        )
    return out


def jsonable(value: Any) -> Any:
    """Settings as JSON: dataclasses as objects, paths as strings, tuples as lists, anything else odd as
    its str(), so that a new kind of setting never makes the summary unwritable."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return jsonable(dataclasses.asdict(value))
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def summarize(
    records: Sequence[RequestRecord],
    *,
    duration_s: float,
    settings: Mapping[str, Any],
    slo: Mapping[str, float] | None = None,
    overhead: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """The summary.json of a run (schema in loadgen/README.md). `duration_s` is the run's wall time,
    the denominator of every rate. `settings` are echoed (and read: a sweep's `rates` and `stage_s`);
    `overhead` is the generator's own cost, when measured."""
    if not (math.isfinite(duration_s) and duration_s >= 0):
        raise ValueError(f"duration_s must be a finite number >= 0, got {duration_s}")
    ok = [r for r in records if r.error is None]
    errors = Counter(r.error for r in records if r.error is not None)
    output_tokens = sum(r.completion_tokens or 0 for r in ok)
    lag = percentiles(_values(records, "lag_s"))
    lag_p99 = lag["p99"]
    limit = settings.get("behind_lag_s")  # the runner's own bar when it was changed (RunSettings.behind_lag_s)
    lag_limit = float(limit) if isinstance(limit, int | float) and limit > 0 else LAG_LIMIT_S
    sweep = settings.get("pattern") == "sweep" or any(r.stage != 0 for r in records)
    summary: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "requests": len(records),
        "succeeded": len(ok),
        "failed": len(records) - len(ok),
        "errors": dict(sorted(errors.items())),
        "duration_s": duration_s,
        "request_rate_rps": _rate(len(records), duration_s),
        "throughput_rps": _rate(len(ok), duration_s),
        "output_tokens": output_tokens,
        "output_tokens_per_s": _rate(output_tokens, duration_s),
        "ttft_s": percentiles(_values(ok, "ttft_s")),
        "ttst_s": percentiles(_values(ok, "ttst_s")),
        "latency_s": percentiles(_values(ok, "latency_s")),
        "itl_s": percentiles([gap for r in ok for gap in r.itl_s]),
        "tpot_s": percentiles(_values(ok, "tpot_s")),
        "lag_s": lag,
        "ttft_sched_s": percentiles(_values(ok, "ttft_sched_s")),
        "latency_sched_s": percentiles(_values(ok, "latency_sched_s")),
        "behind_schedule": lag_p99 is not None and lag_p99 > lag_limit,
        "lag_limit_s": lag_limit,
        **_cold(records),
        "prompt_tokens": _prompt_error(records),
        "goodput": _goodput(records, slo, duration_s) if slo else None,
        "stages": _stages(records, settings, slo) if sweep and records else None,
        "overhead": dict(overhead) if overhead else None,
        "settings": jsonable(settings),
    }
    return summary


# -- summary.csv ------------------------------------------------------------------------------------

CSV_COLUMNS = ("stage", "metric", "value", *PERCENTILE_KEYS)


def csv_rows(summary: Mapping[str, Any]) -> list[dict[str, Any]]:
    """summary.csv's rows: one per metric, `stage` empty for the whole run and the stage's index for a
    sweep's per-stage rows. A single figure fills `value`; a distribution fills p50..mean (seconds);
    nested figures are named with dots (`errors.http_503`, `goodput.share`, `setting.mode`)."""
    rows: list[dict[str, Any]] = []

    def add(stage: Any, metric: str, value: Any) -> None:
        row: dict[str, Any] = dict.fromkeys(CSV_COLUMNS, "")
        row["stage"], row["metric"] = stage, metric
        if isinstance(value, Mapping) and set(value) == set(PERCENTILE_KEYS):
            row.update({k: _cell(v) for k, v in value.items()})
        else:
            row["value"] = _cell(value)
        rows.append(row)

    def flatten(stage: Any, prefix: str, value: Any) -> None:
        if isinstance(value, Mapping) and set(value) != set(PERCENTILE_KEYS):
            for k, v in value.items():
                flatten(stage, f"{prefix}.{k}", v)
        else:
            add(stage, prefix, value)

    for key, value in summary.items():
        if key in ("stages", "settings"):
            continue
        if value is None or not isinstance(value, Mapping) or set(value) == set(PERCENTILE_KEYS):
            add("", key, value)
        else:
            flatten("", key, value)
    for stage in summary.get("stages") or []:
        for key, value in stage.items():
            if key != "stage":
                add(stage["stage"], key, value)
    for key, value in (summary.get("settings") or {}).items():
        add("", f"setting.{key}", value)
    return rows


def _cell(value: Any) -> str:
    """A csv cell: empty for null, JSON for lists and objects, repr-exact floats."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | dict):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def write_summary(out: Path, summary: Mapping[str, Any]) -> None:
    """Write summary.json and summary.csv into the run's folder `out` (created when missing)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    with (out / "summary.csv").open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(csv_rows(summary))


def read_summary(run: Path) -> dict[str, Any]:
    """A run folder's summary.json; a ValueError naming the folder when it is not a run's."""
    path = run / "summary.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{run}: no summary.json (not the --out folder of a `kold loadgen run`)") from None
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: unreadable summary ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a summary (expected a JSON object)")
    return data


__all__ = [
    "CSV_COLUMNS",
    "DISTRIBUTIONS",
    "LAG_LIMIT_S",
    "SLO_KEYS",
    "csv_rows",
    "jsonable",
    "meets_slo",
    "parse_slo",
    "read_summary",
    "summarize",
    "write_summary",
]
