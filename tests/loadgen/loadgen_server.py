"""OpenAI-shaped servers with known behaviour, on loopback, for the client and runner tests.

`FakeServer` is a Starlette app under uvicorn (in a thread). The request's `model` picks how it answers,
so one server covers every case:
- any name not below: streams `max_tokens` one-word tokens, the first `ttft_s` after the request came
  and the others `gap_s` apart (absolute deadlines, so sleeps do not add up), then usage and [DONE];
  non-streamed: the whole answer after `ttft_s + (n-1) * gap_s`;
- "cold": as above, with the headers a kold gateway sends after a cold start;
- "error500": a 500 with an OpenAI error body;
- "crash": two tokens, then the handler raises (uvicorn drops the connection mid-body);
- "stall": two tokens, then nothing for a minute;
- "malformed": two tokens, then an event whose data is not JSON;
- "sse_error": two tokens, then an OpenAI error event and [DONE] (as kold does when an instance fails);
- "no_done": the tokens and usage, then the body ends without [DONE];
- "error_stall": a 503 head, then a body that never comes;
- "json_stream": a JSON answer to a streamed request;
- "slow_head": the response head only after 5 s;
- "fragments": the stream written a few bytes at a time, CRLF line ends split across writes.
`GET /admin/functions/{name}` answers instances by state; "forbidden" gets 403.

`ResettingServer` is a raw socket server that sends a head and one token, then resets the connection
(SO_LINGER 0: an RST, not a FIN), which no ASGI server can be made to do.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

COLD_HEADERS = {
    "X-Kold-Cold": "1",
    "X-Kold-Instance": "inst-1",
    "X-Kold-Queue-Ms": "1.5",
    "X-Kold-Cold-Start-Ms": "812.0",
    "X-Kold-Restore-Ms": "400.5",
    "X-Kold-Restore-Source": "shm",
}


@dataclass
class Seen:
    """One request as the server saw it, and when it wrote each token and the end (perf_counter: the same
    clock as the client's, in this process), which is what the client's measurements are checked against."""

    headers: dict[str, str]
    body: dict[str, Any]
    arrived: float
    tokens: list[float] = field(default_factory=list)
    done: float | None = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def sse(payload: Any) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


class FakeServer:
    """The app under uvicorn in a thread; `requests` holds what it saw and did for each request (`Seen`),
    `max_in_flight` the most generations it ran at once."""

    def __init__(self, *, ttft_s: float = 0.05, gap_s: float = 0.02) -> None:
        self.ttft_s = ttft_s
        self.gap_s = gap_s
        self.requests: list[Seen] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        app = Starlette(
            routes=[
                Route("/v1/chat/completions", self.generate, methods=["POST"]),
                Route("/v1/completions", self.generate, methods=["POST"]),
                Route("/admin/functions/{name}", self.describe, methods=["GET"]),
            ]
        )
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_level="critical", lifespan="off", timeout_graceful_shutdown=1
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve()), daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "the fake server did not start"
            time.sleep(0.02)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)

    def __enter__(self) -> FakeServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def describe(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name == "forbidden":
            return JSONResponse({"error": {"message": "admin scope needed", "code": "insufficient_scope"}}, 403)
        states = ["ready", "ready", "starting", "draining", "stopped"]
        return JSONResponse({"name": name, "instances": [{"id": f"i{n}", "state": s} for n, s in enumerate(states)]})

    async def generate(self, request: Request) -> Response:
        arrived = time.perf_counter()
        body = await request.json()
        seen = Seen(dict(request.headers), body, arrived)
        self.requests.append(seen)
        model = body.get("model", "")
        chat = request.url.path.endswith("/chat/completions")
        n = int(body.get("max_tokens", 4))
        if model == "error500":
            return JSONResponse({"error": {"message": "boom", "type": "server_error", "code": "internal"}}, 500)
        if model == "error_stall":

            async def never() -> AsyncIterator[bytes]:
                await asyncio.sleep(60)
                yield b""

            return StreamingResponse(never(), status_code=503, media_type="application/json")
        if model == "json_stream":
            return JSONResponse({"id": "x", "choices": [{"index": 0, "message": {"content": "w0"}}]})
        if model == "slow_head":
            await asyncio.sleep(5)
        headers = COLD_HEADERS if model == "cold" else {}
        if not body.get("stream"):
            await self._until(arrived + self.ttft_s + (n - 1) * self.gap_s)
            seen.done = time.perf_counter()
            text = " ".join(f"w{i}" for i in range(n))
            choice = (
                {"index": 0, "message": {"role": "assistant", "content": text}} if chat else {"index": 0, "text": text}
            )
            usage = {"prompt_tokens": 7, "completion_tokens": n, "total_tokens": 7 + n}
            return JSONResponse({"id": "x", "object": "response", "choices": [choice], "usage": usage}, headers=headers)
        events = self._events(seen, model, chat, n, bool(body.get("stream_options", {}).get("include_usage")))
        return StreamingResponse(events, media_type="text/event-stream", headers=headers)

    async def _until(self, at: float) -> None:
        delay = at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)

    async def _events(self, seen: Seen, model: str, chat: bool, n: int, usage: bool) -> AsyncIterator[bytes]:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if chat:  # the role first, without content, as OpenAI sends it
                yield sse({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
            cut = 2 if model in ("crash", "stall", "malformed", "sse_error") else None
            for i in range(n):
                if cut is not None and i == cut:
                    break
                await self._until(seen.arrived + self.ttft_s + i * self.gap_s)
                word = f" w{i}"
                choice = {"index": 0, "delta": {"content": word}} if chat else {"index": 0, "text": word}
                data = sse({"choices": [choice]})
                if model == "fragments":
                    data = data.replace(b"\n", b"\r\n")
                    pieces = [data[k : k + 3] for k in range(0, len(data), 3)]
                    for piece in pieces[:-1]:
                        yield piece
                    data = pieces[-1]  # the token is complete when this goes
                seen.tokens.append(time.perf_counter())
                yield data
            if model == "crash":
                raise RuntimeError("the fake server crashed mid-stream")
            if model == "stall":
                await asyncio.sleep(60)
            if model == "malformed":
                yield b"data: {this is not json\n\n"
                await asyncio.sleep(60)
            if model == "sse_error":
                yield sse({"error": {"message": "the instance failed mid-answer", "code": "stream_cut"}})
                yield b"data: [DONE]\n\n"
                return
            if usage:
                yield sse({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": n, "total_tokens": 7 + n}})
            if model != "no_done":
                seen.done = time.perf_counter()
                yield b"data: [DONE]\n\n"
        finally:
            self.in_flight -= 1


class ResettingServer:
    """Answers each request with a 200 head and one token, then an RST."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.1)  # so that the accept loop sees close()
        self.stopped = False
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopped:
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(5)
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    more = conn.recv(65536)
                    if not more:
                        break
                    data += more
                head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
                event = sse({"choices": [{"index": 0, "delta": {"content": "w0"}}]})
                conn.sendall(head + f"{len(event):x}\r\n".encode() + event + b"\r\n")
                time.sleep(0.05)
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    def close(self) -> None:
        self.stopped = True
        self.thread.join(5)
        self.sock.close()

    def __enter__(self) -> ResettingServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
