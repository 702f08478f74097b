"""One request's first token, timed from a moment of the caller's choosing: the one first-token client that
kold's benchmarks share with `kold loadgen` (a cold start timed from the process's spawn, say).

A server that is not listening yet refuses the connection; `first_token` then retries every few ms until
it accepts, until `gone()` says the server died, or until the deadline, so the time includes the wait.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from kold.loadgen.client import Client
from kold.loadgen.records import RequestRecord
from kold.loadgen.schedule import PlannedRequest
from kold.loadgen.target import Target

RETRY_S = 0.005  # between connection attempts while the server is not listening yet


class FirstTokenError(RuntimeError):
    """The request failed (the server died, answered an error, or never gave a token)."""


async def first_token(
    target: Target,
    model: str,
    prompt: str,
    *,
    origin: float,
    max_tokens: int = 1,
    timeout_s: float = 300.0,
    gone: Callable[[], str | None] | None = None,
) -> RequestRecord:
    """The request's record, its times counted from `origin` (a perf_counter value): the first token came
    `record.sent_s + record.ttft_s` seconds after it. Raises FirstTokenError on any failure."""
    planned = PlannedRequest(at_s=0.0, function=model, prompt_tokens=0, max_tokens=max_tokens)
    deadline = origin + timeout_s
    async with Client(target, max_connections=1, timeout_s=timeout_s, stall_s=timeout_s) as client:
        while True:
            record = await client.send(planned, prompt, origin=origin, scheduled=origin)
            if record.error not in ("connection_refused", "connect_error"):
                break
            why = gone() if gone is not None else None
            if why is not None or time.perf_counter() > deadline:
                raise FirstTokenError(f"{target.url} did not come up: {why or 'timeout'}")
            await asyncio.sleep(RETRY_S)
    if record.error is not None or record.ttft_s is None:
        detail = record.error_detail or record.error or "no token"
        raise FirstTokenError(f"{target.url} gave no first token: {detail} (status {record.status})")
    return record


def first_token_s(record: RequestRecord) -> float:
    """Seconds from the origin to the first token."""
    assert record.ttft_s is not None
    return record.sent_s + record.ttft_s
