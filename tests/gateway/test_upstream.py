"""The gateway's data-path HTTP client against a scripted HTTP/1.1 server on loopback.

The server is a raw asyncio server, so each test controls the bytes on the wire: keep-alive or not,
chunked or sized bodies, a connection closed between or in the middle of responses, garbage.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from kold.gateway.upstream import UpstreamClient, UpstreamError, UpstreamNoResponseError

Handler = Callable[[str, bytes, asyncio.StreamWriter], Awaitable[bool]]  # -> keep the connection open


class Scripted:
    """Counts connections and requests; `handler` writes each response."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        self.port = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                path = lines[0].split(" ")[1]
                headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                self.requests.append((path, headers, body))
                if not await self.handler(path, body, writer):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def scripted(handler: Handler) -> AsyncIterator[Scripted]:
    srv = Scripted(handler)
    server = await asyncio.start_server(srv.serve, "127.0.0.1", 0)
    srv.port = server.sockets[0].getsockname()[1]
    try:
        yield srv
    finally:
        server.close()


def sized(body: bytes, extra: str = "") -> bytes:
    return (
        f"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n{extra}\r\n".encode()
        + body
    )


async def echo(path: str, body: bytes, writer: asyncio.StreamWriter) -> bool:
    writer.write(sized(b'{"echo": ' + body + b"}"))
    await writer.drain()
    return True


def test_keep_alive_connections_are_reused_and_bodies_pass_unchanged() -> None:
    async def main() -> None:
        async with scripted(echo) as srv:
            client = UpstreamClient()
            for i in range(5):
                r = await client.request("POST", "127.0.0.1", srv.port, "/v1/x", [("content-type", "a/b")], b"%d" % i)
                assert r.status_code == 200
                assert ("content-type", "application/json") in r.headers
                assert await r.aread() == b'{"echo": %d}' % i
            assert srv.connections == 1
            path, headers, body = srv.requests[-1]
            assert (path, headers["content-type"], headers["content-length"], body) == ("/v1/x", "a/b", "1", b"4")
            await client.aclose()

    asyncio.run(main())


def test_a_chunked_answer_streams_chunk_by_chunk() -> None:
    """The server sends its second chunk only after the client has received the first: a client
    that buffered the body would never get it (the test would time out)."""
    got_first = asyncio.Event()

    async def chunked(path: str, body: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        writer.write(b"7\r\ndata: 1\r\n")
        await writer.drain()
        await got_first.wait()
        writer.write(b"7\r\ndata: 2\r\n0\r\n\r\n")
        await writer.drain()
        return True

    async def main() -> None:
        async with scripted(chunked) as srv:
            client = UpstreamClient()
            r = await client.request("POST", "127.0.0.1", srv.port, "/s", [], b"{}")
            chunks = []
            async for chunk in r.iter_raw():
                chunks.append(chunk)
                got_first.set()
            assert b"".join(chunks) == b"data: 1data: 2"
            assert chunks[0] == b"data: 1"
            # read to the end on a kept-alive connection: reused by the next request
            r2 = await client.request("POST", "127.0.0.1", srv.port, "/s", [], b"{}")
            assert await r2.aread() == b"data: 1data: 2"
            assert srv.connections == 1
            await client.aclose()

    asyncio.run(asyncio.wait_for(main(), 20))


def test_a_kept_alive_connection_the_server_closed_is_replaced_transparently() -> None:
    async def answer_then_close(path: str, body: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(sized(b"ok"))  # no "connection: close": the client believes it may reuse it
        await writer.drain()
        return False

    async def main() -> None:
        async with scripted(answer_then_close) as srv:
            client = UpstreamClient()
            for _ in range(3):
                r = await client.request("POST", "127.0.0.1", srv.port, "/", [], b"")
                assert await r.aread() == b"ok"
                await asyncio.sleep(0.05)  # let the close arrive, as it would between real requests
            assert srv.connections == 3
            assert len(srv.requests) == 3
            await client.aclose()

    asyncio.run(main())


def test_connection_close_answers_are_not_pooled() -> None:
    async def close_header(path: str, body: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(sized(b"ok", "connection: close\r\n"))
        await writer.drain()
        return False

    async def main() -> None:
        async with scripted(close_header) as srv:
            client = UpstreamClient()
            for _ in range(2):
                r = await client.request("POST", "127.0.0.1", srv.port, "/", [], b"")
                assert await r.aread() == b"ok"
            assert srv.connections == 2
            assert not any(client._idle.values())
            await client.aclose()

    asyncio.run(main())


def test_nothing_listening_is_a_no_response_error() -> None:
    async def main() -> None:
        async with scripted(echo) as srv:
            port = srv.port
        client = UpstreamClient()
        with pytest.raises(UpstreamNoResponseError, match="could not connect"):
            await client.request("POST", "127.0.0.1", port, "/", [], b"")

    asyncio.run(main())


def test_a_connection_closed_before_any_answer_is_a_no_response_error() -> None:
    async def hang_up(path: str, body: bytes, writer: asyncio.StreamWriter) -> bool:
        return False  # read the request, answer nothing, close

    async def main() -> None:
        async with scripted(hang_up) as srv:
            client = UpstreamClient()
            with pytest.raises(UpstreamNoResponseError, match="closed the connection"):
                await client.request("POST", "127.0.0.1", srv.port, "/", [], b"x")
            assert len(srv.requests) == 1  # a fresh connection is not retried: the caller decides

    asyncio.run(main())


def test_a_body_cut_short_is_an_error_and_the_connection_is_not_reused() -> None:
    async def cut(path: str, body: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n" + b"x" * 10)
        await writer.drain()
        return False

    async def main() -> None:
        async with scripted(cut) as srv:
            client = UpstreamClient()
            r = await client.request("POST", "127.0.0.1", srv.port, "/", [], b"")
            with pytest.raises(UpstreamError) as err:
                await r.aread()
            assert not isinstance(err.value, UpstreamNoResponseError)  # bytes had arrived
            assert not any(client._idle.values())

    asyncio.run(main())


def test_a_malformed_answer_is_an_error() -> None:
    async def garbage(path: str, body: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"SMTP is not HTTP\r\n\r\n")
        await writer.drain()
        return True

    async def main() -> None:
        async with scripted(garbage) as srv:
            client = UpstreamClient()
            with pytest.raises(UpstreamError, match="malformed"):
                await client.request("POST", "127.0.0.1", srv.port, "/", [], b"")

    asyncio.run(main())


def test_abandoning_a_stream_closes_its_connection() -> None:
    """A client that goes away mid-stream: the instance must see the disconnect (to cancel the
    generation), so the half-read connection is closed, never pooled."""
    closed = asyncio.Event()

    async def endless(path: str, body: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        try:
            while True:
                writer.write(b"5\r\nhello\r\n")
                await writer.drain()
                await asyncio.sleep(0.01)
        except ConnectionError:
            closed.set()
            return False

    async def main() -> None:
        async with scripted(endless) as srv:
            client = UpstreamClient()
            r = await client.request("POST", "127.0.0.1", srv.port, "/", [], b"")
            async for chunk in r.iter_raw():
                assert chunk.startswith(b"hello")
                break
            r.close()
            await asyncio.wait_for(closed.wait(), 10)
            assert not any(client._idle.values())

    asyncio.run(main())


def test_the_router_gives_up_with_504_when_an_instance_does_not_answer_in_time() -> None:
    """The function's request timeout bounds the wait for the answer to begin (Knative's
    timeoutSeconds): 504 with the function named, the instance released, its connection dropped."""
    from types import SimpleNamespace

    from kold.gateway.pool import InstanceState
    from kold.gateway.recorder import Call
    from kold.gateway.router import proxy
    from kold.runtime.protocol import ResponseTimeoutError, status_for

    async def never(path: str, body: bytes, writer: asyncio.StreamWriter) -> bool:
        await asyncio.sleep(3600)
        return False

    async def main() -> None:
        async with scripted(never) as srv:
            inst = SimpleNamespace(id="slow-00001-1", port=srv.port, state=InstanceState.READY)
            revision = SimpleNamespace(scaling=SimpleNamespace(request_timeout_s=0.3))
            released: list[object] = []
            outcomes: list[str] = []

            class Gateway:
                pool = SimpleNamespace(host="127.0.0.1", instance_headers={})

                def begin(self, name: str) -> Call:
                    return Call(name, 0.0)

                async def acquire(
                    self, name: str, exclude: object = None, call: Call | None = None
                ) -> tuple[object, object, bool, float]:
                    assert call is not None
                    call.known = True
                    return inst, revision, False, 0.0

                def finish(self, call: Call, outcome: str, *tokens: int | None) -> None:
                    outcomes.append(outcome)

                def release(self, instance: object) -> None:
                    released.append(instance)

            client = UpstreamClient()
            with pytest.raises(ResponseTimeoutError, match=r"'slow' did not answer within 0\.3 s") as err:
                await proxy(Gateway(), client, "slow", "/v1/completions", {"model": "slow"}, {}, b"{}")  # type: ignore[arg-type]
            assert status_for(err.value) == (504, "timeout_error")
            assert released == [inst] and outcomes == ["failed"]  # a 504 is the instance's failure
            assert not any(client._idle.values())
            assert len(srv.requests) == 1  # sent once, not retried elsewhere

    asyncio.run(main())
