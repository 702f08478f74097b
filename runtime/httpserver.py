"""What keeps slow, stalled and oversized clients from holding the runtime and the gateway.

uvicorn reads a request head for as long as a client cares to send it, and a body too: one socket
that sends half a head and stops is held for ever, and a thousand of them are a thousand held file
descriptors. Nor does Starlette's `request.body()` bound what it buffers. So both servers (the runtime
in `server.py`, the gateway in `gateway/app.py`) use the two pieces here:

- `http_protocol(header_timeout_s, body_timeout_s)`: uvicorn's httptools connection protocol with
  deadlines. A request head (its first byte, or the connection's opening, to its blank line) must be
  complete within `header_timeout_s`, else the connection gets a 408 and is closed; the timer starts
  again for each request of a keep-alive connection. A body must be complete within `body_timeout_s`
  (plus a grace second, so that the app's own JSON 408 goes first) of its head, else the connection
  is closed once its response is over. That also ends the keep-alive drain of a body the app refused
  without reading (a 413): uvicorn reads and discards such a rest, so that a client that sends its
  whole body before it reads the answer still gets the 413, but not for ever.
- `read_body(request, max_bytes, timeout_s)`: the data path's body read: 413 from the Content-Length
  before a byte is read, or as soon as a chunked body passes `max_bytes` (nothing more is read); 408
  when the body has not arrived within `timeout_s`.
"""

from __future__ import annotations

import asyncio
import json
from asyncio import TimerHandle, Transport
from collections.abc import Awaitable, Callable
from typing import TypeVar

from starlette.requests import ClientDisconnect, Request
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from kold.runtime.protocol import (
    ClientDisconnectedError,
    InvalidRequestError,
    RequestTimeoutError,
    RequestTooLargeError,
    error_body,
)

# The library's defaults; kold/settings.py has the same numbers (KOLD_MAX_BODY_BYTES, ...) and why.
DEFAULT_MAX_BODY_BYTES = 16 << 20
DEFAULT_HEADER_TIMEOUT_S = 10.0
DEFAULT_BODY_TIMEOUT_S = 60.0
# how much later than the app's own body deadline the connection's fires: the app answers 408 first
BODY_GRACE_S = 1.0


# -- the body read ----------------------------------------------------------------------------------


async def read_body(request: Request, *, max_bytes: int, timeout_s: float) -> bytes:
    """The request's body, at most `max_bytes` of it, within `timeout_s` seconds.

    RequestTooLargeError (413) when the Content-Length says more, before anything is read, or once a
    chunked body passes the limit; RequestTimeoutError (408) when the body is not in within
    `timeout_s`; ClientDisconnectedError when the client leaves first."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():  # uvicorn's parser refuses these already; be sure
            raise InvalidRequestError(f"Content-Length {declared!r} is not a number of bytes")
        if int(declared) > max_bytes:
            raise RequestTooLargeError(_too_large(max_bytes, f"the body is {int(declared)} bytes"))
    body = bytearray()
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                body += chunk
                if len(body) > max_bytes:
                    raise RequestTooLargeError(_too_large(max_bytes, f"more than {max_bytes} bytes were sent"))
    except TimeoutError:
        raise RequestTimeoutError(
            f"the request body did not arrive within {timeout_s:g} seconds ({len(body)} bytes came)"
        ) from None
    except ClientDisconnect:
        raise ClientDisconnectedError("the client closed the connection before its request body was in") from None
    return bytes(body)


def _too_large(max_bytes: int, what: str) -> str:
    return f"the request body is too large: {what}; this server takes at most {max_bytes} bytes"


# -- the connection protocol ------------------------------------------------------------------------


def http_protocol(*, header_timeout_s: float, body_timeout_s: float) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol with these deadlines: pass it as `uvicorn.Config(http=...)`."""

    class Protocol(TimedHttpProtocol):
        header_timeout = header_timeout_s
        body_timeout = body_timeout_s + BODY_GRACE_S

    return Protocol


class TimedHttpProtocol(HttpToolsProtocol):
    """HttpToolsProtocol with a request-head deadline and a request-body deadline (see the module's
    docstring); `http_protocol()` makes one with the numbers set."""

    header_timeout = DEFAULT_HEADER_TIMEOUT_S
    body_timeout = DEFAULT_BODY_TIMEOUT_S + BODY_GRACE_S

    _head_timer: TimerHandle | None = None
    _body_timer: TimerHandle | None = None

    def connection_made(self, transport: Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_timer = self.loop.call_later(self.header_timeout, self._head_expired)  # silence counts too

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._head_timer is None:  # the next request of a keep-alive connection: its own deadline
            self._head_timer = self.loop.call_later(self.header_timeout, self._head_expired)

    def on_headers_complete(self) -> None:
        self._stop_head_timer()
        self._stop_body_timer()
        self._body_timer = self.loop.call_later(self.body_timeout, self._body_expired)
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._stop_body_timer()
        super().on_message_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        self._stop_body_timer()
        super().connection_lost(exc)

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _stop_body_timer(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _head_expired(self) -> None:
        self._head_timer = None
        cycle: RequestResponseCycle | None = self.cycle
        if cycle is not None and not cycle.response_complete:
            cycle.keep_alive = False  # a pipelined head behind a response in progress: close after it
            return
        if not self.transport.is_closing():
            self.transport.write(_TIMEOUT_RESPONSE)
            self.transport.close()

    def _body_expired(self) -> None:
        self._body_timer = None
        cycle: RequestResponseCycle | None = self.cycle
        if cycle is not None and cycle.response_started and not cycle.response_complete:
            cycle.keep_alive = False  # an answer in progress is not cut: the connection ends after it
        elif not self.transport.is_closing():
            # the app answered without the rest of the body (uvicorn is draining it), or it still waits
            # for it with no deadline of its own (it sees a disconnect): either way, this client is done
            self.transport.close()


def _timeout_response() -> bytes:
    _, body = error_body(RequestTimeoutError("the request head did not arrive in time"))
    payload = json.dumps(body.model_dump()).encode()
    head = (
        "HTTP/1.1 408 Request Timeout\r\n"
        "content-type: application/json\r\n"
        f"content-length: {len(payload)}\r\n"
        "connection: close\r\n\r\n"
    )
    return head.encode() + payload


_TIMEOUT_RESPONSE = _timeout_response()


# -- a client that leaves ---------------------------------------------------------------------------

T = TypeVar("T")
Disconnected = Callable[[], Awaitable[None]]  # returns when the client has gone away


def disconnect_watcher(request: Request) -> Disconnected:
    """Waits for the client to leave: call it once the request's body has been read, when the next ASGI
    message is the disconnect."""

    async def wait() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    return wait


async def unless_gone(work: Awaitable[T], disconnected: Disconnected, message: str) -> T:
    """`work`'s result, unless the client leaves first: then `work` is cancelled (a queued wait gives its
    place up, a proxied request closes its upstream connection) and `ClientDisconnectedError(message)` is
    raised. The runtime and the gateway both wait this way."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if not task.done() or task.cancelled():
        raise ClientDisconnectedError(message)
    return task.result()
