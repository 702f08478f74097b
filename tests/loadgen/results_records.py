"""Synthetic request records with chosen values, for the results tests (summary, plots, report, compare)."""

from __future__ import annotations

from typing import Any

from kold.loadgen.records import RequestRecord


def rec(**fields: Any) -> RequestRecord:
    """A succeeded, warm request sent on schedule at t=0, with TTFT 0.1 s and latency 0.5 s unless told
    otherwise; the scheduled-time figures follow the lag unless given."""
    base: dict[str, Any] = {
        "function": "f",
        "scheduled_s": 0.0,
        "sent_s": None,
        "lag_s": 0.0,
        "ttft_s": 0.1,
        "ttst_s": 0.15,
        "ttft_sched_s": None,
        "latency_s": 0.5,
        "latency_sched_s": None,
        "itl_s": [0.05],
        "tpot_s": 0.05,
        "prompt_tokens": None,
        "completion_tokens": 8,
        "target_prompt_tokens": 100,
        "max_tokens": 8,
        "status": 200,
        "error": None,
        "cold": False,
        "cold_start": None,
        "instance": "i-1",
        "stage": 0,
    }
    base.update(fields)
    if base["sent_s"] is None:
        base["sent_s"] = base["scheduled_s"] + base["lag_s"]
    if base["ttft_sched_s"] is None and base["ttft_s"] is not None:
        base["ttft_sched_s"] = base["ttft_s"] + base["lag_s"]
    if base["latency_sched_s"] is None and base["latency_s"] is not None:
        base["latency_sched_s"] = base["latency_s"] + base["lag_s"]
    return RequestRecord(**base)


def failed(error: str, status: int | None = None, **fields: Any) -> RequestRecord:
    """A request that failed before its first token."""
    values: dict[str, Any] = {
        "ttft_s": None,
        "ttst_s": None,
        "latency_s": None,
        "itl_s": [],
        "tpot_s": None,
        "completion_tokens": None,
        "status": status,
        "error": error,
        "cold": None,
    }
    values.update(fields)
    return rec(**values)


def mixed_run() -> list[RequestRecord]:
    """Forty requests over 20 s: 30 warm, 6 cold (TTFT 2..3.5 s, with a breakdown), 4 failed; 2 s between
    cold starts; lags under 1 ms."""
    records: list[RequestRecord] = []
    for i in range(40):
        t = i * 0.5
        if i % 10 == 9:
            records.append(failed("http_503" if i < 30 else "timeout", 503 if i < 30 else None, scheduled_s=t))
        elif i % 6 == 0 and i < 36:
            ttft = 2.0 + 0.25 * (i // 6)
            cold_start = {"queue-ms": 10.0 * (i // 6 + 1), "restore-ms": 1500.0 + 100 * (i // 6)}
            records.append(
                rec(scheduled_s=t, lag_s=0.0005, ttft_s=ttft, latency_s=ttft + 0.4, cold=True, cold_start=cold_start)
            )
        else:
            ttft = 0.05 + 0.001 * i
            records.append(rec(scheduled_s=t, lag_s=0.0002, ttft_s=ttft, latency_s=ttft + 0.4, itl_s=[0.05] * 7))
    return records
