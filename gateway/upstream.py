"""The gateway's HTTP/1.1 client to its instances: keep-alive connections, httptools' parser.

Why not httpx here: on the data path every request pays the client's overhead, and httpx (anyio,
httpcore, its models) cost 1.6 ms of CPU per proxied request on this project's 2-core machines
against 0.2 ms for a plain asyncio stream parsed by httptools — most of the gateway's added latency
(bench/gateway.py). The instances are our own runtimes on loopback, speaking plain HTTP/1.1, so the
client needs little: a pool of idle keep-alive connections per instance, a request writer, and
httptools' C parser (the one uvicorn uses) for the response, which handles Content-Length and
chunked bodies. Everything else in kold (readiness polls, the CLI) keeps using httpx.

A response is read as the caller pulls it (`iter_raw`), so a slow client slows the instance
instead of filling the gateway's memory, and a streamed answer passes through chunk by chunk. A
connection goes back to the pool only when its response was read to the end and the server keeps
it alive; anything else closes it (the runtime then sees the disconnect and cancels the generation).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Iterable

import httptools

_READ_SIZE = 64 * 1024
_MAX_IDLE_PER_HOST = 32


class UpstreamError(ConnectionError):
    """The instance could not be reached, or the connection broke before the response was complete."""


class UpstreamNoResponseError(UpstreamError):
    """The connection failed before a single byte of the response arrived (safe to retry elsewhere)."""


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()

    @property
    def usable(self) -> bool:
        """An idle connection the server has not closed (EOF already seen means it did)."""
        return not self.writer.is_closing() and not self.reader.at_eof()


class UpstreamResponse:
    """A response being read from one connection: status and headers now, the body as it is pulled."""

    def __init__(self, client: UpstreamClient, key: tuple[str, int], conn: _Connection) -> None:
        self._client = client
        self._key = key
        self._conn: _Connection | None = conn
        self.status_code = 0
        self.headers: list[tuple[str, str]] = []
        self._body: deque[bytes] = deque()
        self._headers_done = False
        self._complete = False
        self._keep_alive = False
        self._got_bytes = False
        self._parser = httptools.HttpResponseParser(self)

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        self.status_code = self._parser.get_status_code()
        self._headers_done = True

    def on_body(self, body: bytes) -> None:
        self._body.append(bytes(body))

    def on_message_complete(self) -> None:
        self._keep_alive = self._parser.should_keep_alive()  # only meaningful before the parser resets
        self._complete = True

    async def _feed(self) -> None:
        """Read once from the socket into the parser (EOF before the end of the message is an error)."""
        assert self._conn is not None
        try:
            data = await self._conn.reader.read(_READ_SIZE)
        except OSError as exc:
            raise self._broken(f"the connection failed: {exc}") from exc
        if not data:
            raise self._broken("the instance closed the connection")
        self._got_bytes = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            raise self._broken(f"the instance sent a malformed response: {exc}") from exc

    def _broken(self, why: str) -> UpstreamError:
        self.close()
        return UpstreamError(why) if self._got_bytes else UpstreamNoResponseError(why)

    async def _read_head(self) -> None:
        while not self._headers_done:
            await self._feed()

    async def iter_raw(self) -> AsyncIterator[bytes]:
        """The body's bytes as they arrive (de-chunked); the connection is released at the end."""
        try:
            while True:
                while self._body:
                    yield self._body.popleft()
                if self._complete:
                    break
                await self._feed()
        finally:
            self._release()

    async def aread(self) -> bytes:
        return b"".join([chunk async for chunk in self.iter_raw()])

    def _release(self) -> None:
        """Back to the pool when read to the end on a kept-alive connection; closed otherwise."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if self._complete and not self._body and self._keep_alive:
            self._client._put_idle(self._key, conn)
        else:
            conn.close()

    def close(self) -> None:
        """Give up on the rest of the body: the connection is closed, never reused."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


class UpstreamClient:
    """HTTP/1.1 requests to instances on loopback, over pooled keep-alive connections."""

    def __init__(self, connect_timeout_s: float = 5.0) -> None:
        self.connect_timeout_s = connect_timeout_s
        self._idle: dict[tuple[str, int], deque[_Connection]] = {}
        self._closed = False

    async def request(
        self, method: str, host: str, port: int, path: str, headers: Iterable[tuple[str, str]], body: bytes
    ) -> UpstreamResponse:
        """Send the request; return once the response's status and headers arrived.

        A reused keep-alive connection that the instance had closed in the meantime is retried once
        on a new connection (the request never reached it); `UpstreamNoResponseError` means no
        byte of a response came back, `UpstreamError` that the response broke off.
        """
        key = (host, port)
        head = [f"{method} {path} HTTP/1.1\r\nhost: {host}:{port}\r\ncontent-length: {len(body)}\r\n"]
        head += [f"{k}: {v}\r\n" for k, v in headers if k.lower() not in ("host", "content-length")]
        head.append("\r\n")
        payload = "".join(head).encode("latin-1") + body
        for attempt in range(2):
            conn = self._take_idle(key) if attempt == 0 else None
            reused = conn is not None
            if conn is None:
                conn = await self._connect(host, port)
            response = UpstreamResponse(self, key, conn)
            try:
                try:
                    conn.writer.write(payload)
                    await conn.writer.drain()
                except OSError as exc:
                    response.close()
                    if reused:
                        continue
                    raise UpstreamNoResponseError(f"could not send the request: {exc}") from exc
                try:
                    await response._read_head()
                except UpstreamNoResponseError:
                    if reused:
                        continue
                    raise
            except BaseException:  # cancelled (a timeout, the client gone): the half-used connection is closed
                response.close()
                raise
            return response
        raise UpstreamNoResponseError(f"{host}:{port} closed the connection")  # pragma: no cover

    async def _connect(self, host: str, port: int) -> _Connection:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port, limit=_READ_SIZE), self.connect_timeout_s
            )
        except (OSError, TimeoutError) as exc:
            raise UpstreamNoResponseError(f"could not connect to {host}:{port}: {exc}") from exc
        return _Connection(reader, writer)

    def _take_idle(self, key: tuple[str, int]) -> _Connection | None:
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()  # the most recently used: the least likely to have timed out
            if conn.usable:
                return conn
            conn.close()
        return None

    def _put_idle(self, key: tuple[str, int], conn: _Connection) -> None:
        idle = self._idle.setdefault(key, deque())
        if self._closed or len(idle) >= _MAX_IDLE_PER_HOST or not conn.usable:
            conn.close()
            return
        idle.append(conn)

    def forget(self, host: str, port: int) -> None:
        """Close the idle connections to an instance that is gone (its port may be reused)."""
        for conn in self._idle.pop((host, port), ()):
            conn.close()

    async def aclose(self) -> None:
        self._closed = True
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()
