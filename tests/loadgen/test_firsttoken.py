"""The first-token client kold's benchmarks share with `kold loadgen`: times counted from the caller's
origin, the x-kold-* breakdown kept, a server that is gone said so."""

from __future__ import annotations

import asyncio
import time

import pytest
from loadgen_server import FakeServer, free_port

from kold.loadgen.firsttoken import FirstTokenError, first_token, first_token_s
from kold.loadgen.target import Target


def test_the_first_token_is_timed_from_the_callers_origin_with_the_breakdown() -> None:
    with FakeServer(ttft_s=0.05, gap_s=0.01) as server:
        origin = time.perf_counter()
        time.sleep(0.1)  # e.g. a process spawned at `origin`, asked once it listens
        record = asyncio.run(first_token(Target(f"{server.url}/v1", api="completions"), "cold", "hi", origin=origin))
    assert 0.14 < first_token_s(record) < 1.0  # the 0.1 s before the send, plus the server's 50 ms
    assert record.cold is True and record.cold_start is not None and record.cold_start["restore-ms"] == 400.5


def test_a_server_that_never_listens_and_is_gone_is_a_clear_error() -> None:
    calls = []

    def gone() -> str | None:
        calls.append(1)
        return "exited with status 1" if len(calls) >= 3 else None

    target = Target(f"http://127.0.0.1:{free_port()}/v1", api="completions")
    with pytest.raises(FirstTokenError, match="exited with status 1"):
        asyncio.run(first_token(target, "m", "hi", origin=time.perf_counter(), gone=gone))
    assert len(calls) == 3  # retried while the port refused, until it was known to be gone


def test_an_error_answer_is_a_clear_error() -> None:
    with FakeServer() as server, pytest.raises(FirstTokenError, match="500"):
        asyncio.run(
            first_token(Target(f"{server.url}/v1", api="completions"), "error500", "hi", origin=time.perf_counter())
        )
