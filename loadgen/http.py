"""The load generator's HTTP/1.1 transport: pooled keep-alive connections whose responses are parsed by
httptools as the bytes arrive, each piece handed to a handler with the time its read returned.

Why not httpx: the generator must keep its schedule at hundreds of streamed requests a second on one
core, and httpx cost it 2-4 ms of CPU per 16-token request on this project's 2-core machines (its
connection pool scans every connection on every request, and each chunk goes through anyio and httpcore),
so it fell behind below 400 requests/s (bench/loadgen.py). Here a response is a set of callbacks run
inside `data_received`: no task, no await and no copy per chunk, and the time stamp is taken once per
read, before parsing, which is what the client's token times must be.

A connection goes back to the pool only when its response was read to the end on a kept-alive
connection; anything else closes it. The handler's methods must not raise: they run inside the event
loop's read callback.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from typing import Protocol
from urllib.parse import urlsplit

import httptools

MAX_IDLE = 1024  # idle keep-alive connections kept; beyond that a finished one is closed


class TransportError(Exception):
    """The connection failed; `kind` is the record's error type."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind


class Handler(Protocol):
    """What a connection tells the request it carries (`now`: perf_counter when the read returned)."""

    def on_head(self, status: int, headers: dict[str, str], now: float) -> None: ...

    def on_body(self, data: bytes, now: float) -> None: ...

    def on_complete(self, now: float) -> None: ...

    def on_lost(self, error: TransportError, got_bytes: bool) -> None: ...


class Connection(asyncio.Protocol):
    """One keep-alive connection carrying one request at a time."""

    def __init__(self, pool: Pool) -> None:
        self._pool = pool
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._handler: Handler | None = None
        self._headers: dict[str, str] = {}
        self._now = 0.0
        self._got_bytes = False
        self._complete = False
        self._keep_alive = False
        self._draining: asyncio.TimerHandle | None = None
        self.closed = False

    def start(self, handler: Handler, payload: bytes) -> None:
        """Send a request; its response goes to `handler`."""
        assert self._transport is not None
        self._handler = handler
        self._headers = {}
        self._got_bytes = False
        self._complete = False
        self._transport.write(payload)

    def detach(self, drain_s: float) -> None:
        """The request needs nothing more: the connection is reused once the rest of the response has come
        (within `drain_s`), else closed."""
        self._handler = None
        if self._complete:
            self._release()
        elif not self.closed:
            self._draining = asyncio.get_running_loop().call_later(drain_s, self.close)

    def close(self) -> None:
        self._handler = None
        self.closed = True
        if self._transport is not None:
            self._transport.close()

    def _release(self) -> None:
        if self._draining is not None:
            self._draining.cancel()
            self._draining = None
        if self._keep_alive and not self.closed:
            self._pool.release(self)
        else:
            self.close()

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's transports are not asyncio.Transport
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self._now = time.perf_counter()
        self._got_bytes = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            handler = self._handler
            self.close()
            if handler is not None:
                handler.on_lost(TransportError("protocol_error", f"a malformed HTTP response: {exc}"), True)

    def eof_received(self) -> bool:
        return False  # close; connection_lost tells the handler

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._draining is not None:
            self._draining.cancel()
        handler, self._handler = self._handler, None
        if handler is not None and not self._complete:
            why = f"{type(exc).__name__}: {exc}" if exc else "the server closed the connection"
            handler.on_lost(TransportError("connection_reset", why), self._got_bytes)

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        if self._handler is not None:
            self._handler.on_head(self._parser.get_status_code(), self._headers, self._now)

    def on_body(self, body: bytes) -> None:
        if self._handler is not None:
            self._handler.on_body(body, self._now)

    def on_message_complete(self) -> None:
        self._complete = True
        self._keep_alive = self._parser.should_keep_alive()
        if self._handler is not None:
            self._handler.on_complete(self._now)  # the handler detaches (or closes) in there
        elif not self.closed:
            self._release()  # a drained connection


class Pool:
    """Connections to one origin: idle ones reused most recent first, new ones opened as needed."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        default_port = self.port == (443 if parts.scheme == "https" else 80)
        self.authority = parts.hostname if default_port else f"{parts.hostname}:{self.port}"
        self._ssl = _ssl_context() if parts.scheme == "https" else None
        self._idle: list[Connection] = []
        self._closed = False

    async def connect(self) -> Connection:
        """A new connection (OSError or ssl.SSLError when it cannot be made)."""
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(
            lambda: Connection(self),
            self.host,
            self.port,
            ssl=self._ssl,
            server_hostname=self.host if self._ssl else None,
        )
        return conn

    def take_idle(self) -> Connection | None:
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed:
                return conn
        return None

    def release(self, conn: Connection) -> None:
        if self._closed or len(self._idle) >= MAX_IDLE:
            conn.close()
        else:
            self._idle.append(conn)

    def close(self) -> None:
        self._closed = True
        for conn in self._idle:
            conn.close()
        self._idle.clear()


def _ssl_context() -> ssl.SSLContext:
    """Verifying TLS with certifi's roots when installed (as httpx does), else the system's."""
    try:
        import certifi
    except ImportError:
        return ssl.create_default_context()
    return ssl.create_default_context(cafile=certifi.where())
