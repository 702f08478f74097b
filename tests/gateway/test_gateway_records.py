"""Every request becomes a demand record and every ready instance a cold-start record, written through
the real DemandStore on the session's redis-server.

Requests go through the router (`proxy`) to a scripted upstream standing in for the instances
(gateway_fakes.FakePool points them at it), so each test chooses the answer: JSON with or without
`usage`, a 500, a stream with a usage chunk, a stream cut off, an answer held until released.
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import pytest
from gateway_fakes import FakePool
from prometheus_client import CollectorRegistry, Counter
from starlette.responses import StreamingResponse

from kold.controller.demand import DemandStore
from kold.controller.records import ColdStart, Invocation
from kold.gateway.activator import ColdStartTimeoutError, Gateway
from kold.gateway.recorder import Call, Recorder
from kold.gateway.registry import Registry, RuntimeSpec, ScalingSpec
from kold.gateway.router import proxy
from kold.gateway.upstream import UpstreamClient
from kold.gateway.usage import StreamTail, tokens
from kold.runtime.protocol import ModelNotFoundError

pytestmark = pytest.mark.redis

URI = "file:///x/snapshots/" + "4" * 32
USAGE = {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}


def sse(payload: Any) -> bytes:
    return b"data: " + (payload if isinstance(payload, bytes) else json.dumps(payload).encode()) + b"\n\n"


class Upstream:
    """Answers by the request's prompt: ok, nousage, fail (500), stream (with a usage chunk), cut (a
    stream broken off), wait (ok once `gate` is set)."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.port = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                match = re.search(rb"content-length: *(\d+)", head, re.IGNORECASE)
                body = json.loads(await reader.readexactly(int(match.group(1)) if match else 0))
                prompt = body["prompt"]
                if prompt == "wait":
                    await self.gate.wait()
                    prompt = "ok"
                if prompt in ("ok", "nousage", "fail"):
                    answer: dict[str, Any] = {"object": "text_completion", "choices": [{"text": '"usage": {}'}]}
                    if prompt == "ok":
                        answer["usage"] = USAGE
                    if prompt == "fail":
                        answer = {"error": {"message": "boom", "type": "server_error"}}
                    data = json.dumps(answer).encode()
                    status = "500 Internal Server Error" if prompt == "fail" else "200 OK"
                    writer.write(f"HTTP/1.1 {status}\r\ncontent-length: {len(data)}\r\n\r\n".encode() + data)
                    await writer.drain()
                    continue
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
                )
                events = [sse({"choices": [{"text": "hi"}]}), sse({"choices": [{"text": "!"}]})]
                if prompt == "stream":
                    events += [
                        sse({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}),
                        sse(b"[DONE]"),
                    ]
                for event in events[: 1 if prompt == "cut" else None]:
                    writer.write(b"%x\r\n%s\r\n" % (len(event), event))
                    await writer.drain()
                if prompt == "cut":
                    return
                writer.write(b"0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def deploy(registry: Registry, name: str, **scaling: Any) -> str:
    rev = registry.create_revision(name, URI, scaling=ScalingSpec(**scaling), runtime=RuntimeSpec())
    registry.set_traffic(name, rev.revision_id)
    return rev.revision_id


async def call(gw: Gateway, client: UpstreamClient, name: str, prompt: str, stream: bool = False) -> int:
    """One request through the router, its answer read to the end; the status."""
    body = {"model": name, "prompt": prompt, "stream": stream}
    response = await proxy(gw, client, name, "/v1/completions", body, {}, json.dumps(body).encode())
    if isinstance(response, StreamingResponse):
        async for _ in response.body_iterator:
            pass
    return response.status_code


def test_every_request_is_recorded_with_its_outcome_tokens_and_concurrency(registry: Registry, tmp_path: Path) -> None:
    rev_id = deploy(registry, "fn", target_concurrency=8, request_timeout_s=5)
    deploy(registry, "stuck", request_timeout_s=0.3)
    demand = DemandStore(registry.redis, registry.prefix)

    async def scenario() -> None:
        upstream = Upstream()
        server = await asyncio.start_server(upstream.serve, "127.0.0.1", 0)
        pool = FakePool(tmp_path, port=server.sockets[0].getsockname()[1])
        pool.stuck.add("stuck")
        gw = Gateway(registry, pool, demand=demand)
        await gw.start()
        client = UpstreamClient()
        assert await call(gw, client, "fn", "ok") == 200
        assert await call(gw, client, "fn", "nousage") == 200
        assert await call(gw, client, "fn", "fail") == 500
        assert await call(gw, client, "fn", "stream", stream=True) == 200
        assert await call(gw, client, "fn", "cut", stream=True) == 200  # the status had gone out
        # two requests in flight when a third arrives: concurrency 1, 2, 3 (each counts itself)
        first = asyncio.create_task(call(gw, client, "fn", "wait"))
        while gw.functions["fn"].active < 1:
            await asyncio.sleep(0.005)
        second = asyncio.create_task(call(gw, client, "fn", "wait"))
        while gw.functions["fn"].active < 2:
            await asyncio.sleep(0.005)
        assert await call(gw, client, "fn", "ok") == 200
        upstream.gate.set()
        assert await asyncio.gather(first, second) == [200, 200]
        # the client leaves while the instance works on it
        upstream.gate.clear()
        left = asyncio.create_task(call(gw, client, "fn", "wait"))
        while gw.functions["fn"].active < 1:
            await asyncio.sleep(0.005)
        left.cancel()
        with pytest.raises(asyncio.CancelledError):
            await left
        # no instance becomes ready within the request timeout
        with pytest.raises(ColdStartTimeoutError):
            await call(gw, client, "stuck", "ok")
        # a name that is no function is not recorded (it would create keys for it)
        with pytest.raises(ModelNotFoundError):
            await call(gw, client, "nope", "ok")
        await gw.close()  # writes what is queued
        await client.aclose()
        server.close()

    asyncio.run(scenario())

    def shape(r: Invocation) -> tuple[str, int | None, int | None, int, bool]:
        return r.outcome, r.tokens_in, r.tokens_out, r.concurrency, r.cold

    got = demand.invocations("fn")
    assert [shape(r) for r in got[:5]] == [
        ("ok", 5, 7, 1, True),  # the first request waited for the instance's start
        ("ok", None, None, 1, False),  # no usage in the answer: unknown, not 0
        ("failed", None, None, 1, False),  # the instance's 500
        ("ok", 3, 2, 1, False),  # the stream's usage chunk
        ("failed", None, None, 1, False),  # the stream broken off
    ]
    assert sorted(shape(r) for r in got[5:8]) == [("ok", 5, 7, c, False) for c in (1, 2, 3)]
    assert [shape(r) for r in got[8:]] == [("cancelled", None, None, 1, False)]
    assert all(r.function == "fn" and r.arrival > 1e9 for r in got)
    [timed_out] = demand.invocations("stuck")
    assert timed_out.outcome == "timed_out" and timed_out.cold and timed_out.wait_s >= 0.3
    assert demand.invocations("nope") == []
    # one cold start per instance that became READY, from the runtime's report; none for "stuck"
    [cold] = demand.cold_starts("fn")
    assert (cold.revision, cold.restore_s, cold.tiers, cold.snapshot_bytes, cold.start_method) == (
        rev_id,
        0.12,
        {"disk": 0.08},
        4096,
        "fork-template",
    )
    assert 0 <= cold.total_s < 5 and cold.at > 1e9
    assert demand.cold_starts("stuck") == []


def test_a_gateway_without_a_demand_store_records_nothing_and_still_serves(registry: Registry, tmp_path: Path) -> None:
    deploy(registry, "fn")

    async def scenario() -> int:
        upstream = Upstream()
        server = await asyncio.start_server(upstream.serve, "127.0.0.1", 0)
        gw = Gateway(registry, FakePool(tmp_path, port=server.sockets[0].getsockname()[1]))
        await gw.start()
        client = UpstreamClient()
        status = await call(gw, client, "fn", "ok")
        await gw.close()
        await client.aclose()
        server.close()
        return status

    assert asyncio.run(scenario()) == 200
    assert DemandStore(registry.redis, registry.prefix).invocations("fn") == []


def test_a_stream_whose_client_left_before_it_began_is_recorded_as_cancelled(
    registry: Registry, tmp_path: Path
) -> None:
    """The client leaves between the answer's head and its first byte: the stream's generator never
    runs (nor its own bookkeeping); the response's cleanup records the request and frees the instance."""
    deploy(registry, "fn", request_timeout_s=5)
    demand = DemandStore(registry.redis, registry.prefix)

    async def scenario() -> int:
        upstream = Upstream()
        server = await asyncio.start_server(upstream.serve, "127.0.0.1", 0)
        gw = Gateway(registry, FakePool(tmp_path, port=server.sockets[0].getsockname()[1]), demand=demand)
        await gw.start()
        client = UpstreamClient()
        body = {"model": "fn", "prompt": "stream", "stream": True}
        response = await proxy(gw, client, "fn", "/v1/completions", body, {}, json.dumps(body).encode())
        assert isinstance(response, StreamingResponse)

        async def receive() -> dict[str, Any]:
            return {"type": "http.disconnect"}  # gone already

        async def send(message: dict[str, Any]) -> None:
            await asyncio.sleep(0)

        await response({"type": "http", "asgi": {"spec_version": "2.3"}}, receive, send)
        active = gw.functions["fn"].active
        await gw.close()
        await client.aclose()
        server.close()
        return active

    assert asyncio.run(scenario()) == 0
    assert [r.outcome for r in demand.invocations("fn")] == ["cancelled"]


class Written:
    """A demand writer that keeps each batch it is given, as given."""

    def __init__(self) -> None:
        self.batches: list[list[Invocation]] = []

    def record_invocations(self, records: list[Invocation]) -> None:
        self.batches.append(list(records))

    def record_cold_starts(self, reports: list[ColdStart]) -> None:
        pass

    def forget(self, function: str) -> None:
        pass


def test_a_batch_of_records_is_written_in_arrival_order() -> None:
    """Records are made as requests finish, so a batch comes in finish order; the demand history
    drops an arrival older than the last one it saw, so each batch is written by arrival."""
    written = Written()

    async def scenario() -> None:
        recorder = Recorder(written, Counter("dropped", "test", registry=CollectorRegistry()))
        recorder.start()
        for arrival in (3.0, 1.0, 2.0):  # a long request that arrived first finishes last
            recorder.add(Call("fn", arrival, known=True).invocation("ok", None, None))
        await recorder.close()

    asyncio.run(scenario())
    assert [[r.arrival for r in batch] for batch in written.batches] == [[1.0, 2.0, 3.0]]


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (json.dumps({"choices": [], "usage": USAGE}).encode(), (5, 7)),
        (
            json.dumps(
                {
                    "choices": [],
                    "usage": {
                        "prompt_tokens": 6,
                        "completion_tokens": 8,
                        "prompt_tokens_details": {"cached_tokens": 2},
                        "completion_tokens_details": {"reasoning_tokens": 0},
                    },
                }
            ).encode(),
            (6, 8),
        ),
        (b'{"choices": [{"text": "\\"usage\\": {\\"prompt_tokens\\": 9}"}], "usage": null}', (None, None)),
        (b'{"choices": [{"text": "\\"usage\\": {\\"prompt_tokens\\": 9}"}]}', (None, None)),
        (b'{"usage": {"prompt_tokens": 4, "completion_tokens": true}}', (4, None)),
        (b'{"usage": {"prompt_tokens": -1, "completion_tokens": 2}}', (None, 2)),
        (b'{"usage": {"prompt_tokens": 4, "completion_tok', (None, None)),
        (b"", (None, None)),
    ],
    ids=[
        "a JSON answer's usage gives both counts",
        "a usage object with nested details gives both counts",
        "usage null is unknown, whatever the generated text says",
        "generated text that spells a usage object is not taken for one",
        "a count of the wrong type is left unknown",
        "a negative count is left unknown",
        "a cut-off usage object is unknown",
        "an empty answer is unknown",
    ],
)
def test_tokens_come_from_the_last_usage_object(data: bytes, expected: tuple[int | None, int | None]) -> None:
    assert tokens(data) == expected


def test_a_stream_tail_finds_a_usage_chunk_split_from_its_done() -> None:
    tail = StreamTail()
    for chunk in (sse({"choices": [{"text": "a"}]}), sse({"choices": [], "usage": USAGE}), sse(b"[DONE]")):
        tail.add(chunk)
    assert tail.tokens() == (5, 7)
    tail.add(sse({"choices": [{"text": "b"}]}))
    tail.add(sse(b"[DONE]"))
    assert tail.tokens() == (None, None)  # only the last two chunks are looked at
