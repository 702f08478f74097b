"""The runtime's HTTP server.

In-process (a fake backend, httpx over ASGI): the error table, the lifecycle state machine and its
bounded wait queue, OpenAI shapes and SSE framing, cold-start headers. Real processes (a tiny random
model, `python -m kold runtime serve` on loopback, the official `openai` client): readiness, requests
queued during the restore, streaming and not, bad input, client disconnects, the SIGTERM drain.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from runtime_helpers import FakeBackend, RuntimeProcess, app_client, parse_sse, restore_delay_env, run

from kold.runtime.lifecycle import Lifecycle, State, TransitionError, process_start_time
from kold.runtime.protocol import (
    ERROR_TABLE,
    ContextLengthError,
    DrainingError,
    InvalidRequestError,
    ModelNotFoundError,
    QueueFullError,
    QueueTimeoutError,
    error_body,
    status_for,
)
from kold.runtime.server import Runtime

# -- unit: the error table and the state machine ----------------------------------------------------


def test_error_table_maps_every_client_error() -> None:
    from pydantic import ValidationError

    from kold.runtime.protocol import CompletionRequest

    assert status_for(InvalidRequestError("x")) == (400, "invalid_request_error")
    assert status_for(ContextLengthError("x")) == (400, "invalid_request_error")
    assert status_for(ModelNotFoundError("x")) == (404, "invalid_request_error")
    assert status_for(QueueFullError("x"))[0] == 503
    assert status_for(KeyError("x")) == (500, "server_error")
    with pytest.raises(ValidationError) as info:
        CompletionRequest.model_validate({"model": "m", "prompt": "hi", "max_tokens": "3"})
    status, body = error_body(info.value)
    assert status == 400 and body.error.param == "max_tokens" and body.error.type == "invalid_request_error"
    assert len(ERROR_TABLE) == len(set(ERROR_TABLE))
    status, body = error_body(RuntimeError("secret internals"))
    assert status == 500 and "secret" not in body.error.message


def test_lifecycle_transitions() -> None:
    lc = Lifecycle(max_waiting=1, queue_timeout=1)
    assert lc.state is State.STARTING and lc.accepting and not lc.ready
    with pytest.raises(TransitionError):
        lc.transition(State.READY)  # not without restoring
    lc.transition(State.RESTORING)
    lc.transition(State.READY)
    assert lc.ready and lc.cold_start.cold_start_ms is not None
    lc.transition(State.DRAINING)
    assert not lc.accepting
    with pytest.raises(TransitionError):
        lc.transition(State.READY)
    lc.transition(State.STOPPED)
    assert 0 < time.time() - process_start_time() < 3600


def test_wait_queue_is_bounded_and_times_out() -> None:
    async def main() -> None:
        lc = Lifecycle(max_waiting=2, queue_timeout=5)
        lc.transition(State.RESTORING)
        waiters = [asyncio.ensure_future(lc.wait_ready()) for _ in range(2)]
        await asyncio.sleep(0.01)
        assert lc.waiting == 2
        with pytest.raises(QueueFullError):
            await lc.wait_ready()
        lc.transition(State.READY)
        waited = await asyncio.gather(*waiters)
        assert all(w > 0 for w in waited) and lc.waiting == 0
        assert await lc.wait_ready() == 0.0

        slow = Lifecycle(max_waiting=2, queue_timeout=0.05)
        slow.transition(State.RESTORING)
        with pytest.raises(QueueTimeoutError):
            await slow.wait_ready()
        waiter = asyncio.ensure_future(slow.wait_ready())
        await asyncio.sleep(0.01)
        slow.transition(State.DRAINING)
        with pytest.raises(DrainingError):
            await waiter

    asyncio.run(main())


# -- in-process HTTP over a fake backend ------------------------------------------------------------


def test_fake_completions_chat_models_and_cold_start_headers() -> None:
    async def main() -> None:
        async with app_client() as (client, _, _):
            r = await client.post("/v1/completions", json={"model": "fake", "prompt": "a b c", "max_tokens": 3})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["object"] == "text_completion" and body["choices"][0]["text"] == " t0 t1 t2"
            assert body["choices"][0]["finish_reason"] == "length"
            assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}
            assert "x-kold-cold-start-ms" in r.headers and "x-kold-restore-ms" in r.headers
            assert "x-kold-queue-ms" in r.headers

            r = await client.post(
                "/v1/chat/completions",
                json={"model": "alias", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "n": 2},
            )
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["object"] == "chat.completion" and len(body["choices"]) == 2
            assert body["choices"][1]["message"] == {"role": "assistant", "content": " t0 t1"}
            assert body["usage"]["completion_tokens"] == 4
            assert "x-kold-cold-start-ms" not in r.headers  # the first response only

            r = await client.get("/v1/models")
            assert r.json()["data"][0]["id"] == "fake"

    run(main)


def test_fake_streams_are_sse_with_usage_last() -> None:
    async def main() -> None:
        async with app_client() as (client, _, _):
            r = await client.post(
                "/v1/chat/completions",
                json={
                    "model": "fake",
                    "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": 3,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                },
            )
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            chunks = parse_sse(r.text)
            assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
            text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
            assert text == " t0 t1 t2"
            assert chunks[-2]["choices"][0]["finish_reason"] == "length"
            assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3
            assert all(c["usage"] is None for c in chunks[:-1])

            r = await client.post(
                "/v1/completions", json={"model": "fake", "prompt": ["a", "b c"], "max_tokens": 2, "stream": True}
            )
            chunks = parse_sse(r.text)
            by_index: dict[int, str] = {}
            for c in chunks:
                for ch in c["choices"]:
                    by_index[ch["index"]] = by_index.get(ch["index"], "") + ch["text"]
            assert by_index == {0: " t0 t1", 1: " t0 t1"}

    run(main)


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        (b"{not json", 400, None),
        (b'{"model": "fake", "prompt": "x", "max_tokens": "ten"}', 400, "max_tokens"),
        (b'{"model": "fake", "prompt": 5}', 400, "prompt"),
        (b'{"model": "fake", "prompt": "x", "temperature": 9}', 400, "temperature"),
        (b'{"prompt": "x"}', 400, "model"),
        (b'{"model": "fake", "prompt": "x", "stream": "yes"}', 400, "stream"),
        (b'{"model": "nope", "prompt": "x"}', 404, "model"),
        (b'{"model": "fake", "prompt": "x", "max_tokens": 1000}', 400, "max_tokens"),
        (b'{"model": "fake", "prompt": "' + b"w " * 80 + b'"}', 400, "prompt"),
        (b'{"model": "fake", "prompt": "x", "logprobs": 6}', 400, "logprobs"),
        (b'{"model": "fake", "prompt": "x", "stop": ["a","b","c","d","e"]}', 400, "stop"),
        (b'{"model": "fake", "prompt": []}', 400, "prompt"),
    ],
)
def test_fake_bad_input_is_an_openai_error(body: bytes, status: int, param: str | None) -> None:
    async def main() -> None:
        async with app_client() as (client, _, _):
            r = await client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
            assert r.status_code == status, r.text
            error = r.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["message"]
            assert error["param"] == param
            if 'max_tokens": 1000' in body.decode() or b"w w" in body:
                assert error["code"] == "context_length_exceeded"

    run(main)


def test_fake_routes_and_methods_answer_in_openai_shape() -> None:
    async def main() -> None:
        async with app_client() as (client, _, _):
            r = await client.get("/v1/nothing")
            assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"
            r = await client.get("/v1/completions")
            assert r.status_code == 405 and "error" in r.json()
            r = await client.post("/v1/chat/completions", json={"model": "fake", "messages": []})
            assert r.status_code == 400 and r.json()["error"]["param"] == "messages"

    run(main)


def test_fake_requests_wait_for_readiness_and_overflow_gets_503() -> None:
    async def main() -> None:
        async with app_client(release=False, max_waiting=3) as (client, runtime, loader):
            assert (await client.get("/healthz")).status_code == 200
            r = await client.get("/readyz")
            assert r.status_code == 503 and r.json()["state"] == "restoring"
            body = {"model": "fake", "prompt": "x", "max_tokens": 2}
            waiting = [asyncio.ensure_future(client.post("/v1/completions", json=body)) for _ in range(3)]
            for _ in range(100):
                if runtime.lifecycle.waiting == 3:
                    break
                await asyncio.sleep(0.01)
            r = await client.post("/v1/completions", json=body)
            assert r.status_code == 503 and r.headers["retry-after"] and r.json()["error"]["code"] == "queue_full"
            metrics = (await client.get("/metrics")).text
            assert "kold_queue_depth 3.0" in metrics
            loader.release.set()
            responses = await asyncio.gather(*waiting)
            assert [r.status_code for r in responses] == [200, 200, 200]
            assert sum("x-kold-cold-start-ms" in r.headers for r in responses) == 1
            assert all(float(r.headers["x-kold-queue-ms"]) > 0 for r in responses)
            assert (await client.get("/readyz")).status_code == 200
            metrics = (await client.get("/metrics")).text
            for name in (
                "kold_cold_start_seconds",
                'kold_restore_phase_seconds{phase="fetch"}',
                "kold_time_to_first_token_seconds_bucket",
                "kold_inter_token_latency_seconds_bucket",
                "kold_engine_generated_tokens_total 6.0",
                "kold_requests_in_flight 0.0",
                'kold_state{state="ready"} 1.0',
            ):
                assert name in metrics, name

    run(main)


def test_fake_failed_load_answers_waiters_with_503() -> None:
    async def main() -> None:
        async with app_client(release=False) as (client, runtime, loader):
            body = {"model": "fake", "prompt": "x", "max_tokens": 2}
            waiting = asyncio.ensure_future(client.post("/v1/completions", json=body))
            await asyncio.sleep(0.05)
            loader.fail = "disk on fire"
            loader.release.set()
            r = await waiting
            assert r.status_code == 503 and "disk on fire" in r.json()["error"]["message"]
            ready = await client.get("/readyz")
            assert ready.status_code == 503 and "disk on fire" in ready.json()["error"]
            assert runtime.exit_code == 1

    run(main)


def test_fake_drain_refuses_new_requests_and_waits_for_in_flight() -> None:
    async def main() -> None:
        backend = FakeBackend(token_delay=0.01)
        async with app_client(backend, drain_timeout_s=5) as (client, runtime, _):
            body = {"model": "fake", "prompt": "x", "max_tokens": 20}
            in_flight = asyncio.ensure_future(client.post("/v1/completions", json=body))
            while backend.running == 0:
                await asyncio.sleep(0.005)
            runtime.on_signal(15)
            await asyncio.sleep(0.01)
            r = await client.post("/v1/completions", json=body)
            assert r.status_code == 503 and r.headers["connection"] == "close"
            assert r.json()["error"]["code"] == "shutting_down"
            assert (await client.get("/readyz")).status_code == 503
            assert runtime.lifecycle.in_flight == 1
            done = await in_flight
            assert done.status_code == 200 and done.json()["usage"]["completion_tokens"] == 20
            assert runtime._drain_task is not None
            await asyncio.wait_for(runtime._drain_task, 2)
            runtime.finish()
            assert backend.stopped and runtime.lifecycle.state is State.STOPPED

    run(main)


def post_then_leave(
    runtime: Runtime, body: dict[str, Any]
) -> tuple[asyncio.Future[None], asyncio.Event, asyncio.Event]:
    """POST /v1/completions by driving the ASGI app by hand: a client that goes away when `gone` is set.

    Returns the app's task, `gone`, and an event set once a non-empty response body chunk was sent."""
    raw = json.dumps(body).encode()
    received = asyncio.Event()
    gone = asyncio.Event()
    messages = [{"type": "http.request", "body": raw, "more_body": False}]

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop()
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body" and message.get("body"):
            received.set()

    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/completions",
        "raw_path": b"/v1/completions",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 2),
    }
    return asyncio.ensure_future(runtime.app(scope, receive, send)), gone, received


@pytest.mark.parametrize("stream", [True, False])
def test_fake_client_disconnect_cancels_the_generation(stream: bool) -> None:
    async def main() -> None:
        backend = FakeBackend(token_delay=0.01)
        async with app_client(backend) as (_, runtime, _):
            # a client that goes away after the first chunk
            body = {"model": "fake", "prompt": "x", "max_tokens": 60, "stream": stream}
            task, gone, received = post_then_leave(runtime, body)
            if stream:
                await asyncio.wait_for(received.wait(), 2)
            else:
                while backend.running == 0:
                    await asyncio.sleep(0.005)
            gone.set()
            await asyncio.wait_for(task, 2)
            assert backend.cancelled == 1 and backend.generations[0].cancelled
            assert runtime.lifecycle.in_flight == 0

    run(main)


def test_fake_client_gone_while_the_model_loads_leaves_the_wait_queue() -> None:
    """A request waiting for the restore whose client disconnects is dropped at once (its place in
    the bounded queue freed), not kept until the model is ready and then generated for nobody."""

    async def main() -> None:
        backend = FakeBackend()
        async with app_client(backend, release=False, max_waiting=1) as (client, runtime, loader):
            task, gone, _ = post_then_leave(runtime, {"model": "fake", "prompt": "x", "max_tokens": 5})
            while runtime.lifecycle.waiting == 0:
                await asyncio.sleep(0.005)
            gone.set()
            await asyncio.wait_for(task, 2)
            assert runtime.lifecycle.waiting == 0 and not runtime.lifecycle.ready  # left while still loading
            # its place is free: the queue (max 1) takes another request, which is served once ready
            waiter = asyncio.ensure_future(client.post("/v1/completions", json={"model": "fake", "prompt": "y"}))
            while runtime.lifecycle.waiting == 0:
                await asyncio.sleep(0.005)
            loader.release.set()
            r = await asyncio.wait_for(waiter, 5)
            assert r.status_code == 200, r.text
            assert len(backend.generations) == 1  # only the second request generated

    run(main)


# -- real processes ---------------------------------------------------------------------------------


def openai_client(runtime: RuntimeProcess) -> Any:
    import openai

    return openai.OpenAI(base_url=f"{runtime.base}/v1", api_key="x", max_retries=0, timeout=60)


def metric(runtime: RuntimeProcess, name: str) -> float:
    text = httpx.get(f"{runtime.base}/metrics").text
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics:\n{text}")


def test_requests_sent_during_the_restore_wait_and_all_succeed(start_runtime: Callable[..., RuntimeProcess]) -> None:
    # the delay must outlast the six clients getting queued on a loaded 2-core machine (1.5 s was flaky)
    env = {**restore_delay_env(3), "PYTHONPROFILEIMPORTTIME": "1"}
    rt = start_runtime("--max-batch", "4", env=env)
    rt.wait_listening()
    r = httpx.get(f"{rt.base}/readyz")
    assert r.status_code == 503 and r.json()["state"] in ("starting", "restoring")
    client = openai_client(rt)
    model = httpx.get(f"{rt.base}/v1/models").json()["data"][0]["id"]

    def completion(i: int) -> tuple[dict[str, str], str]:
        raw = client.completions.with_raw_response.create(model=model, prompt=f"Hello {i}", max_tokens=4)
        return dict(raw.headers), raw.parse().choices[0].finish_reason

    def chat_stream(i: int) -> tuple[dict[str, str], str]:
        raw = client.chat.completions.with_raw_response.create(
            model=model, messages=[{"role": "user", "content": f"Hi {i}"}], max_tokens=4, stream=True
        )
        chunks = list(raw.parse())
        return dict(raw.headers), next(c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason)

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(completion if i % 2 else chat_stream, i) for i in range(6)]
        deadline = time.monotonic() + 10
        while httpx.get(f"{rt.base}/readyz").json().get("waiting", 0) < 6:  # all six queued, none refused
            assert time.monotonic() < deadline, rt.output
            assert not any(f.done() for f in futures), [f.result() for f in futures if f.done()]
            time.sleep(0.02)
        results = [f.result(timeout=60) for f in futures]
    assert all(reason in ("length", "stop") for _, reason in results)
    headers = [h for h, _ in results]
    assert sum("x-kold-cold-start-ms" in h for h in headers) == 1  # the first response after the cold start
    first = next(h for h in headers if "x-kold-cold-start-ms" in h)
    assert float(first["x-kold-cold-start-ms"]) > float(first["x-kold-restore-ms"]) >= 0
    assert all(float(h["x-kold-queue-ms"]) > 0 for h in headers)
    assert httpx.get(f"{rt.base}/readyz").status_code == 200
    again = client.completions.with_raw_response.create(model=model, prompt="again", max_tokens=2)
    assert "x-kold-cold-start-ms" not in again.headers and float(again.headers["x-kold-queue-ms"]) == 0

    # the start path imports what it needs: never transformers, boto3 (a local store) or fastapi. (torch
    # is imported from the start, in a background thread beside the server's imports: it is the
    # longest step of a cold start, see kold/commands/runtime.py.)
    imported = [line.rsplit("|", 1)[1].strip() for line in rt.lines if line.startswith("import time:")]
    assert any(m.split(".")[0] == "torch" for m in imported)
    assert not [m for m in imported if m.split(".")[0] in ("transformers", "boto3", "botocore", "fastapi")]

    startup = rt.events("startup")
    assert len(startup) == 1 and startup[0]["state"] == "ready"
    phases = startup[0]["phases_ms"]
    assert isinstance(phases, dict) and {"torch_import", "restore", "tokenizer", "model"} <= set(phases)
    assert startup[0]["listening_ms"] < startup[0]["ready_ms"]
    assert "fetch_ms" in startup[0]["restore"]  # type: ignore[operator]
    assert len(rt.events("first_token")) == 1
    assert metric(rt, "kold_cold_start_seconds") > 0
    assert metric(rt, 'kold_restore_phase_seconds{phase="fetch"}') >= 0
    assert metric(rt, "kold_engine_generated_tokens_total") >= 6
    assert metric(rt, "kold_time_to_first_token_seconds_count") == 7
    assert metric(rt, "kold_requests_in_flight") == 0


def test_openai_client_completions_and_chat(shared_runtime: RuntimeProcess) -> None:
    client = openai_client(shared_runtime)
    assert [m.id for m in client.models.list().data] == ["tiny"]

    done = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=12, temperature=0)
    assert done.object == "text_completion" and done.choices[0].finish_reason in ("length", "stop")
    assert done.usage is not None and done.usage.completion_tokens <= 12
    assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens
    stream = client.completions.create(
        model="tiny",
        prompt="Once upon a time",
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == done.choices[0].text  # greedy: same text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == done.usage.completion_tokens

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)  # type: ignore[arg-type]
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    assert chat.usage is not None and chat.usage.prompt_tokens > 5
    stream = client.chat.completions.create(
        model="tiny",
        messages=messages,
        max_tokens=10,
        temperature=0,
        stream=True,  # type: ignore[arg-type]
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == chat.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage == chat.usage
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [chat.choices[0].finish_reason]

    seeded = [
        client.completions.create(model="tiny", prompt="abc", max_tokens=8, temperature=1.0, seed=7).choices[0].text
        for _ in range(2)
    ]
    assert seeded[0] == seeded[1]


def test_bad_input_gets_openai_errors(shared_runtime: RuntimeProcess) -> None:
    import openai

    client = openai_client(shared_runtime)
    url = f"{shared_runtime.base}/v1/completions"

    r = httpx.post(url, content=b'{"model": "tiny", "prompt": ', headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(url, json={"model": "tiny", "prompt": "x", "max_tokens": "many"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    r = httpx.post(f"{shared_runtime.base}/v1/chat/completions", json={"model": "tiny", "messages": "hi"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"

    with pytest.raises(openai.NotFoundError) as nf:
        client.completions.create(model="gpt-4", prompt="x", max_tokens=2)
    assert nf.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as too_many:
        client.completions.create(model="tiny", prompt="x", max_tokens=500)
    assert too_many.value.code == "context_length_exceeded" and too_many.value.param == "max_tokens"
    with pytest.raises(openai.BadRequestError) as too_long:
        client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hello there " * 200}], max_tokens=2
        )
    assert too_long.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as streamed:  # the check comes before the stream starts
        client.completions.create(model="tiny", prompt="hello " * 300, max_tokens=2, stream=True)
    assert streamed.value.status_code == 400
    assert client.completions.create(model="tiny", prompt="still fine", max_tokens=2).choices  # and it serves on


def _stream_lines(client: httpx.Client, base: str, body: dict[str, Any]) -> Any:
    return client.stream("POST", f"{base}/v1/completions", json={"stream": True, **body}, timeout=60)


def test_client_disconnect_frees_the_only_slot(start_runtime: Callable[..., RuntimeProcess]) -> None:
    rt = start_runtime("--max-batch", "1")
    rt.wait_listening()
    rt.wait_ready()
    model = httpx.get(f"{rt.base}/v1/models").json()["data"][0]["id"]
    long = {"model": model, "prompt": "go", "max_tokens": 480, "ignore_eos": True}
    with httpx.Client() as http, _stream_lines(http, rt.base, long) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")  # generating: the one slot is taken
    # the connection is closed: the generation must be cancelled and the slot freed at once
    try:
        r = httpx.post(
            f"{rt.base}/v1/completions", json={"model": model, "prompt": "next", "max_tokens": 3}, timeout=10
        )
    except httpx.TimeoutException:
        raise AssertionError(f"the next request was not served: is the slot still taken?\n{rt.output}") from None
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    deadline = time.monotonic() + 5
    while metric(rt, "kold_cancelled_generations_total") < 1:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert metric(rt, "kold_engine_generated_tokens_total") < 480  # the engine stopped generating it
    assert metric(rt, "kold_engine_running") == 0
    assert metric(rt, "kold_requests_in_flight") == 0


def test_sigterm_drains_in_flight_requests_and_exits_0(start_runtime: Callable[..., RuntimeProcess]) -> None:
    rt = start_runtime("--max-batch", "4")
    rt.wait_listening()
    rt.wait_ready()
    model = httpx.get(f"{rt.base}/v1/models").json()["data"][0]["id"]
    body = {"model": model, "prompt": "go", "max_tokens": 400, "ignore_eos": True}  # ~1 s for the three
    started = threading.Barrier(4)
    results: list[tuple[str | None, int]] = []

    def generate() -> None:
        text, finish, chunks = "", None, 0
        with httpx.Client() as http, _stream_lines(http, rt.base, body) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if not line:
                    continue
                if chunks == 0:
                    started.wait(10)
                chunks += 1
                if line == "data: [DONE]":
                    break
                choice = json.loads(line.removeprefix("data: "))["choices"][0]
                text += choice["text"]
                finish = choice["finish_reason"] or finish
        results.append((finish, chunks))

    threads = [threading.Thread(target=generate) for _ in range(3)]
    for t in threads:
        t.start()
    started.wait(30)  # all three are generating
    rt.terminate()
    deadline = time.monotonic() + 5
    while httpx.get(f"{rt.base}/readyz").status_code != 503:  # the signal is handled: draining
        assert time.monotonic() < deadline
        time.sleep(0.005)
    refused = httpx.post(f"{rt.base}/v1/completions", json={**body, "max_tokens": 2}, timeout=10)
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
    assert refused.headers["connection"] == "close" and refused.headers["retry-after"]
    for t in threads:
        t.join(60)
    assert rt.wait(30) == 0, rt.output
    assert len(results) == 3 and all(finish == "length" for finish, _ in results), results
    drain = rt.events("drain")
    assert len(drain) == 1 and drain[0]["drained"] is True and drain[0]["in_flight_at_signal"] == 3, rt.output


def test_a_request_runs_while_serving_early_and_answers_once_ready() -> None:
    """A loader that serves behind its restore: the waiting request reaches the model at once, its
    response (with the cold-start headers) starts once the load is over; /readyz waits for that."""

    async def main() -> None:
        backend = FakeBackend()
        async with app_client(backend, release=False, early=True) as (client, runtime, loader):
            assert loader.serve_early is not None
            request = asyncio.ensure_future(
                client.post("/v1/completions", json={"model": "fake", "prompt": "a b", "max_tokens": 2})
            )
            await asyncio.sleep(0.05)
            assert not backend.generations  # waiting: nothing serves yet
            loader.serve_early.set()
            for _ in range(200):
                if backend.generations:
                    break
                await asyncio.sleep(0.01)
            assert len(backend.generations) == 1  # it runs before the load is over
            assert runtime.lifecycle.serving_early and not request.done()
            assert (await client.get("/readyz")).status_code == 503
            loader.release.set()
            r = await request
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == " t0 t1"
            assert "x-kold-cold-start-ms" in r.headers and "x-kold-serving-early-ms" in r.headers
            assert (await client.get("/readyz")).status_code == 200

    run(main)


def test_a_load_that_fails_while_serving_early_fails_the_waiting_request() -> None:
    async def main() -> None:
        backend = FakeBackend()
        async with app_client(backend, release=False, early=True) as (client, runtime, loader):
            assert loader.serve_early is not None
            loader.fail = "chunk 7 is corrupt"
            request = asyncio.ensure_future(
                client.post("/v1/completions", json={"model": "fake", "prompt": "a b", "max_tokens": 2})
            )
            loader.serve_early.set()
            for _ in range(200):
                if backend.generations:
                    break
                await asyncio.sleep(0.01)
            loader.release.set()
            r = await request
            assert r.status_code == 503, r.text
            assert "chunk 7 is corrupt" in r.json()["error"]["message"]
            assert backend.generations[0].cancelled  # the generation it started is cancelled
            assert runtime.service.backend is None

    run(main)
