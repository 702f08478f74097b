"""The gateway against oversized bodies and slow clients (issue 11, item 4).

The gateway as `kold up` serves it (`server_config`), on a loopback port, over the session's real
redis-server, with a 1 MiB body limit, a 1 s request-head timeout and a 2 s body timeout, spoken to
over raw sockets (tests/slow_clients.py) where httpx cannot play the client. No instance is started:
every limit acts before a request is routed, and a function that does not exist shows that a body
within the limit was read and parsed.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from gateway_helpers import free_port, instance_env
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

from kold.gateway.app import build_app, server_config
from kold.gateway.pool import InstancePool
from kold.gateway.registry import Registry

MAX_BODY = 1 << 20
HEADER_TIMEOUT_S = 1.0
BODY_TIMEOUT_S = 2.0


class Gateway:
    def __init__(self, registry: Registry, tmp_path: Path) -> None:
        app = build_app(
            registry,
            InstancePool(tmp_path / "logs", env=instance_env(tmp_path)),
            require_keys=False,
            max_body_bytes=MAX_BODY,
            body_timeout_s=BODY_TIMEOUT_S,
        )
        self.port = free_port()
        config = server_config(
            app, "127.0.0.1", self.port, header_timeout_s=HEADER_TIMEOUT_S, body_timeout_s=BODY_TIMEOUT_S
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve()), daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "the gateway did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture
def gateway(registry: Registry, tmp_path: Path) -> Iterator[Gateway]:
    g = Gateway(registry, tmp_path)
    yield g
    g.close()


def unknown_function(g: Gateway, size: int = 0) -> httpx.Response:
    body = {"model": "nope", "messages": [{"role": "user", "content": "x" * size}]}
    return httpx.post(f"{g.url}/v1/chat/completions", json=body, timeout=30, trust_env=False)


@pytest.mark.redis
def test_bodies_over_the_limit_get_413_on_both_data_paths_and_the_admin_api(gateway: Gateway) -> None:
    for path in ("/v1/chat/completions", "/v1/functions/nope/v1/chat/completions", "/admin/functions/x/revisions"):
        answer = declare_oversized(gateway.port, path, MAX_BODY + 1)
        assert answer.status == 413, (path, answer)
        error = answer.json()["error"]
        assert error["code"] == "request_too_large" and error["type"] == "invalid_request_error"
        assert error["param"] is None and str(MAX_BODY) in error["message"]

        answer, sent = stream_chunked(gateway.port, path, chunk=64 << 10, most=4 * MAX_BODY)
        assert answer.status == 413, (path, answer)
        assert answer.json()["error"]["code"] == "request_too_large"
        assert sent >= MAX_BODY  # the body never ended: the limit, not its end, brought the answer
    # just under the limit, the body is read, parsed and routed
    r = unknown_function(gateway, MAX_BODY - 1000)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


@pytest.mark.redis
def test_a_client_that_sends_its_whole_oversized_body_still_reads_the_413(gateway: Gateway) -> None:
    # httpx writes the whole body before it reads: the gateway must drain it rather than reset the connection
    r = unknown_function(gateway, 4 * MAX_BODY)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert unknown_function(gateway).status_code == 404


@pytest.mark.redis
def test_a_body_that_stops_coming_gets_408_and_the_connection_ends(gateway: Gateway) -> None:
    answer, closed = trickle_body(
        gateway.port, "/v1/chat/completions", declared=500, sent=b'{"model": "nope", ', timeout=BODY_TIMEOUT_S + 10
    )
    assert answer.status == 408
    assert answer.json()["error"] == {
        "message": answer.json()["error"]["message"],
        "type": "invalid_request_error",
        "param": None,
        "code": "request_timeout",
    }
    assert closed


@pytest.mark.redis
def test_a_thousand_half_sent_heads_are_closed_in_time_while_requests_are_served(gateway: Gateway) -> None:
    async def scenario() -> tuple[HeldConnections, int, int]:
        held = asyncio.ensure_future(hold_half_heads(gateway.port, 1000, deadline_s=HEADER_TIMEOUT_S + 20))
        await asyncio.sleep(0.5)  # the first connections are open and waiting
        health = await asyncio.to_thread(httpx.get, f"{gateway.url}/healthz", timeout=10, trust_env=False)
        routed = await asyncio.to_thread(unknown_function, gateway)
        return await held, health.status_code, routed.status_code

    held, health, routed = asyncio.run(scenario())
    assert (health, routed) == (200, 404)
    assert held.opened == 1000
    assert held.closed_by_server == 1000, held
    assert held.answered_408 == 1000, held


@pytest.mark.redis
def test_keep_alive_requests_each_get_their_own_head_deadline(gateway: Gateway) -> None:
    """A connection that served requests is not cut by a deadline counted from its opening, and the
    next head it starts and never finishes is timed on its own."""
    with connect(gateway.port) as sock:
        body = json.dumps({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}).encode()
        for _ in range(3):
            sock.sendall(head("/v1/chat/completions", f"Content-Length: {len(body)}\r\n") + body)
            assert read_answer(sock, 10).status == 404
            time.sleep(HEADER_TIMEOUT_S * 0.6)  # together longer than one head timeout
        sock.sendall(b"GET /healthz HTTP/1.1\r\n")  # half a head, after the others
        answer = read_answer(sock, HEADER_TIMEOUT_S + 10)
        assert answer.status == 408 and answer.json()["error"]["code"] == "request_timeout"
