"""A trivial streaming OpenAI server for bench/loadgen.py: as cheap per request as Python allows, with a
known TTFT that it measures itself.

It runs as its own process (so that it never shares a GIL with the load generator it serves), on uvloop
with httptools and a raw asyncio Protocol: no framework, pre-encoded chunks, one timer per token. Every
POST to `/v1/chat/completions` or `/v1/completions` gets the response head at once, then `max_tokens`
(16 when absent) content chunks in the OpenAI stream format: the first `--ttft-ms` after the request head
was parsed, the others `--itl-ms` apart; the last one is followed in the same write by the finish chunk,
the usage chunk and `data: [DONE]`. A body with `"stream": false` gets the whole answer at the time of
the last token.

The server's "true TTFT" of a request is the time from the end of its head (httptools'
`on_headers_complete`) to the return of the write of its first content chunk (uvloop writes at once
when the socket has room, as it does on loopback). `GET /stats` answers those times, in seconds, of every
request since the last `POST /stats/reset`, so that a benchmark can hold a generator's measured TTFT
against them. `GET /v1/models` and `GET /health` answer what peers ask before a run.

    python bench/loadgen_server.py --port 8000 --ttft-ms 10 --itl-ms 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import time
from typing import Any

import httptools
import uvloop

MODEL = "bench"
DEFAULT_TOKENS = 16
_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
    b"transfer-encoding: chunked\r\n\r\n"
)


def _chunk(payload: bytes) -> bytes:
    """One HTTP/1.1 chunk."""
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def _event(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


class _Frames:
    """Pre-encoded stream pieces for one API ("chat" or "completions")."""

    def __init__(self, api: str) -> None:
        obj = "chat.completion.chunk" if api == "chat" else "text_completion"
        base = {"id": "cmpl-bench", "object": obj, "created": 0, "model": MODEL}

        def choice(text: str | None, finish: str | None, first: bool = False) -> dict[str, Any]:
            if api == "completions":
                return {"index": 0, "text": text or "", "finish_reason": finish}
            delta: dict[str, Any] = {"role": "assistant"} if first else {}
            if text is not None:
                delta["content"] = text
            return {"index": 0, "delta": delta, "finish_reason": finish}

        self.first = _chunk(_event({**base, "choices": [choice(" tok", None, first=True)]}))
        self.token = _chunk(_event({**base, "choices": [choice(" tok", None)]}))
        self.finish = _event({**base, "choices": [choice(None, "length")]})
        self._base = base

    def tail(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        """The finish chunk, usage, [DONE] and the end of the chunked body."""
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        body = self.finish + _event({**self._base, "choices": [], "usage": usage}) + b"data: [DONE]\n\n"
        return _chunk(body) + b"0\r\n\r\n"


FRAMES = {"chat": _Frames("chat"), "completions": _Frames("completions")}


class Server:
    """Settings and the true TTFTs measured since the last reset."""

    def __init__(self, ttft_s: float, itl_s: float) -> None:
        self.ttft_s = ttft_s
        self.itl_s = itl_s
        self.true_ttft_s: list[float] = []
        self.requests = 0


class Conn(asyncio.Protocol):
    """One keep-alive connection: requests in turn (the clients do not pipeline)."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.body: list[bytes] = []
        self.head_at = 0.0
        self.alive = False
        self.stream_id = 0  # a stream's timers stop when this moves on (a new request, or the connection lost)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not an asyncio.Transport subclass
        self.alive = True
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.alive = False
        self.stream_id += 1

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self._plain(400, b"bad request")
            if self.transport is not None:
                self.transport.close()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.url = b""
        self.body = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_headers_complete(self) -> None:
        self.head_at = time.perf_counter()

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        method = self.parser.get_method()
        path = self.url.split(b"?", 1)[0]
        if method == b"POST" and path in (b"/v1/chat/completions", b"/v1/completions"):
            self._generate("chat" if path.endswith(b"chat/completions") else "completions")
        elif method == b"GET" and path == b"/v1/models":
            models = {"object": "list", "data": [{"id": MODEL, "object": "model", "created": 0, "owned_by": "bench"}]}
            self._json(models)
        elif method == b"GET" and path == b"/health":
            self._plain(200, b"")
        elif method == b"GET" and path == b"/stats":
            self._json({"requests": self.server.requests, "true_ttft_s": self.server.true_ttft_s})
        elif method == b"POST" and path == b"/stats/reset":
            self.server.true_ttft_s = []
            self.server.requests = 0
            self._plain(200, b"")
        else:
            self._plain(404, b"not found")

    def _plain(self, status: int, body: bytes, kind: bytes = b"text/plain") -> None:
        if self.transport is None or not self.alive:
            return
        reason = {200: b"OK", 400: b"Bad Request", 404: b"Not Found"}[status]
        head = b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n\r\n" % (status, reason, kind, len(body))
        self.transport.write(head + body)

    def _json(self, obj: object) -> None:
        self._plain(200, json.dumps(obj).encode(), b"application/json")

    def _generate(self, api: str) -> None:
        try:
            req = json.loads(b"".join(self.body) or b"{}")
        except ValueError:
            self._plain(400, b"body is not JSON")
            return
        n = int(req.get("max_tokens") or req.get("max_completion_tokens") or DEFAULT_TOKENS)
        n = max(1, n)
        stream = bool(req.get("stream", False))
        server = self.server
        server.requests += 1
        frames = FRAMES[api]
        self.stream_id += 1
        sid = self.stream_id
        head_at = self.head_at
        transport = self.transport
        assert transport is not None
        if not stream:
            self.loop.call_at(self.loop.time() + server.ttft_s + (n - 1) * server.itl_s, self._whole, sid, api, n)
            return
        transport.write(_HEAD)
        tail = frames.tail(8, n)

        def token(i: int) -> None:
            if sid != self.stream_id:
                return  # the connection went away
            if i == 0:
                transport.write(frames.first if n > 1 else frames.first + tail)
                server.true_ttft_s.append(time.perf_counter() - head_at)
            else:
                transport.write(frames.token if i < n - 1 else frames.token + tail)
            if i < n - 1:
                self.loop.call_later(server.itl_s, token, i + 1)

        # the first token is due ttft_s after the head: what is left of it now
        self.loop.call_later(max(0.0, server.ttft_s - (time.perf_counter() - head_at)), token, 0)

    def _whole(self, sid: int, api: str, n: int) -> None:
        if sid != self.stream_id:
            return
        text = " tok" * n
        choice: dict[str, Any] = (
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}
            if api == "chat"
            else {"index": 0, "text": text, "finish_reason": "length"}
        )
        usage = {"prompt_tokens": 8, "completion_tokens": n, "total_tokens": 8 + n}
        self._json(
            {"id": "cmpl-bench", "object": "chat.completion", "model": MODEL, "choices": [choice], "usage": usage}
        )


async def serve(host: str, port: int, ttft_s: float, itl_s: float) -> None:
    server = Server(ttft_s, itl_s)
    loop = asyncio.get_running_loop()
    srv = await loop.create_server(lambda: Conn(server), host, port, backlog=4096)
    print(f"listening on {host}:{port}", flush=True)
    async with srv:
        await srv.serve_forever()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--ttft-ms", type=float, default=10.0, help="first token this long after the request head")
    ap.add_argument("--itl-ms", type=float, default=2.0, help="gap between tokens")
    args = ap.parse_args()
    uvloop.run(serve(args.host, args.port, args.ttft_ms / 1000, args.itl_ms / 1000))


if __name__ == "__main__":
    main()
