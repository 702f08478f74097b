"""A runtime instance against oversized bodies, over-long prompts and slow clients (issue 11, item 4).

One real `kold runtime serve` process (the tiny random model) with a 12 MiB body limit, a 1 s
request-head timeout and a 2 s body timeout, spoken to over raw loopback sockets (tests/slow_clients.py)
where httpx cannot play the client. Its context is 600,000 tokens, so that a prompt of a few MB passes
the cheap length bound and is really tokenized, which takes seconds.
"""

from __future__ import annotations

import asyncio
import json
import select
import threading
from collections.abc import Iterator

import httpx
import pytest
from runtime_helpers import RuntimeProcess
from slow_clients import (
    HeldConnections,
    connect,
    declare_oversized,
    head,
    hold_half_heads,
    read_answer,
    stream_chunked,
    trickle_body,
)

MAX_BODY = 12 << 20
HEADER_TIMEOUT_S = 1.0
BODY_TIMEOUT_S = 2.0
CONTEXT = 600_000
# the tiny model's BPE tokenizer: its longest token is 13 characters, so no prompt of more than
# CONTEXT * 13 characters can fit, and any shorter one must be tokenized to know
LONGEST_TOKEN = 13


@pytest.fixture(scope="module")
def limited(tiny_snapshot: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RuntimeProcess]:
    process = RuntimeProcess(
        tiny_snapshot,
        tmp_path_factory.mktemp("limited-runtime"),
        "--max-batch",
        "2",
        "--max-seq-len",
        str(CONTEXT),
        "--served-model-name",
        "tiny",
        env={
            "KOLD_MAX_BODY_BYTES": "12MiB",
            "KOLD_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S),
            "KOLD_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S),
        },
    )
    try:
        process.wait_listening()
        process.wait_ready()
        yield process
    finally:
        process.kill()


def short_completion(rt: RuntimeProcess) -> httpx.Response:
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 2}
    return httpx.post(f"{rt.base}/v1/completions", json=body, timeout=60)


def test_a_declared_oversized_body_is_refused_before_it_is_read(limited: RuntimeProcess) -> None:
    answer = declare_oversized(limited.port, "/v1/completions", MAX_BODY + 1)
    assert answer.status == 413
    assert answer.json() == {
        "error": {
            "message": answer.json()["error"]["message"],
            "type": "invalid_request_error",
            "param": None,
            "code": "request_too_large",
        }
    }
    assert str(MAX_BODY) in answer.json()["error"]["message"]
    # at the limit itself, the body is read (and this one is not JSON)
    with connect(limited.port) as sock:
        sock.sendall(head("/v1/completions", "Content-Length: 5\r\n") + b"hello")
        assert read_answer(sock, 10).status == 400


def test_a_chunked_body_is_counted_and_cut_off_past_the_limit(limited: RuntimeProcess) -> None:
    answer, sent = stream_chunked(limited.port, "/v1/chat/completions", chunk=1 << 20, most=3 * MAX_BODY)
    assert answer.status == 413, answer
    assert answer.json()["error"]["code"] == "request_too_large"
    assert sent >= MAX_BODY  # the body never ended: the limit, not its end, brought the answer
    assert short_completion(limited).status_code == 200


def test_a_body_that_stops_coming_gets_408_and_the_connection_is_closed(limited: RuntimeProcess) -> None:
    answer, closed = trickle_body(
        limited.port, "/v1/completions", declared=200, sent=b'{"model": "tiny", ', timeout=BODY_TIMEOUT_S + 10
    )
    assert answer.status == 408
    assert answer.json()["error"]["code"] == "request_timeout"
    assert answer.json()["error"]["type"] == "invalid_request_error"
    assert closed


def test_a_thousand_half_sent_heads_are_closed_in_time_while_requests_are_served(limited: RuntimeProcess) -> None:
    async def scenario() -> tuple[HeldConnections, int]:
        held = asyncio.ensure_future(hold_half_heads(limited.port, 1000, deadline_s=HEADER_TIMEOUT_S + 20))
        await asyncio.sleep(0.5)  # the first connections are open and waiting
        normal = await asyncio.to_thread(short_completion, limited)
        return await held, normal.status_code

    held, status = asyncio.run(scenario())
    assert status == 200
    assert held.opened == 1000
    assert held.closed_by_server == 1000, held
    assert held.answered_408 == 1000, held
    assert short_completion(limited).status_code == 200


def test_a_prompt_far_longer_than_the_context_is_refused_before_it_is_tokenized(limited: RuntimeProcess) -> None:
    prompt = "x" * (CONTEXT * LONGEST_TOKEN + 1)  # 7.8 MB: no tokenization can make it fit
    r = httpx.post(f"{limited.base}/v1/completions", json={"model": "tiny", "prompt": prompt}, timeout=60)
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == "prompt"
    assert "characters" in error["message"], error  # the length bound, not the token count, refused it
    chat = {"model": "tiny", "messages": [{"role": "user", "content": prompt}]}
    r = httpx.post(f"{limited.base}/v1/chat/completions", json=chat, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    assert "characters" in r.json()["error"]["message"]


def test_a_short_request_is_answered_while_a_huge_prompt_is_tokenized(limited: RuntimeProcess) -> None:
    # under the length bound, so it is tokenized (seconds), then refused for its ~2.5M tokens
    prompt = "hello world, this is some text. " * 200_000
    assert len(prompt) < CONTEXT * LONGEST_TOKEN
    body = json.dumps({"model": "tiny", "prompt": prompt, "max_tokens": 1}).encode()
    big = connect(limited.port)
    try:
        big.sendall(head("/v1/completions", f"Content-Length: {len(body)}\r\n") + body)
        done = threading.Event()
        short: list[tuple[int, bool]] = []  # its status, and whether the big one was still unanswered then

        def watch() -> None:
            status = short_completion(limited).status_code
            short.append((status, not select.select([big], [], [], 0)[0]))
            done.set()

        select.select([big], [], [], 0.5)  # the body is in; give the server a moment to begin tokenizing
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        assert done.wait(120), "the short request got no answer"
        answer = read_answer(big, 120)  # read only now: an answer already read would not show as pending
    finally:
        big.close()
    assert answer.status == 400 and answer.json()["error"]["code"] == "context_length_exceeded"
    assert "tokens" in answer.json()["error"]["message"]  # refused after tokenizing, by the exact count
    assert short == [(200, True)], "the short request waited for the big prompt's tokenization"
