"""One record per request, and requests.jsonl.

The record is the unit every later step reads (summary, plots, compare), so it holds measurements only,
never derived judgements: times in seconds, None where a value was not measured (a request that failed
before its first token has no TTFT; a server that sends no `x-kold-*` headers has `cold` None, not a
guess). Times named `*_sched_s` count from the scheduled send, the others from the actual send: the
difference is queueing in the client, which coordinated omission would otherwise hide.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass
class RequestRecord:
    """A request's measurements; `asdict()` is its requests.jsonl line."""

    function: str
    scheduled_s: float  # when the schedule said to send, seconds from the run's start
    sent_s: float  # when it was actually sent, seconds from the run's start
    lag_s: float  # sent_s - scheduled_s: the generator's fidelity
    ttft_s: float | None  # first content token, from the actual send
    ttst_s: float | None  # second content token, from the actual send
    ttft_sched_s: float | None  # first content token, from the scheduled send
    latency_s: float | None  # end of the response, from the actual send
    latency_sched_s: float | None  # end of the response, from the scheduled send
    itl_s: list[float]  # every gap between consecutive content tokens (chunks)
    tpot_s: float | None  # (latency - ttft) / (completion_tokens - 1)
    prompt_tokens: int | None  # the server's usage
    completion_tokens: int | None
    target_prompt_tokens: int  # what the plan asked for
    max_tokens: int
    status: int | None  # HTTP status; None when no response came (connection refused, timeout)
    error: str | None  # an error type: "http_503", "connection_refused", "connection_reset", "timeout",
    # "stream_stalled", "malformed_sse", "sse_error", ...; None for a request that succeeded
    cold: bool | None  # from x-kold-cold; None when the server sends no such header
    cold_start: dict[str, float] | None  # x-kold-*-ms headers in ms, keyed without the prefix ("restore-ms")
    instance: str | None  # x-kold-instance, when sent
    stage: int = 0  # sweep stage
    error_detail: str | None = None  # the error's message (the server's, or the exception's), for people


_FIELDS = {f.name for f in dataclasses.fields(RequestRecord)}


def to_json(record: RequestRecord) -> str:
    """One requests.jsonl line (no newline)."""
    return json.dumps(asdict(record), separators=(",", ":"))


def from_dict(data: dict[str, Any]) -> RequestRecord:
    """A record from a requests.jsonl object; unknown keys are ignored so that older readers can read
    newer files."""
    return RequestRecord(**{k: v for k, v in data.items() if k in _FIELDS})


def write_jsonl(path: Path, records: Iterable[RequestRecord]) -> None:
    """Write requests.jsonl, one object per line."""
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(to_json(record) + "\n")


def read_jsonl(path: Path) -> list[RequestRecord]:
    """Read requests.jsonl back; a line that is not a record is a ValueError naming the file and line."""
    out: list[RequestRecord] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
                if not isinstance(data, dict):
                    raise ValueError("not a JSON object")
                out.append(from_dict(data))
            except (ValueError, TypeError) as exc:
                raise ValueError(f"{path}:{lineno}: not a request record ({exc})") from None
    return out


__all__ = ["RequestRecord", "from_dict", "read_jsonl", "to_json", "write_jsonl"]
