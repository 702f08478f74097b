"""The first-token client: one OpenAI request, timed token by token, always ending in a record.

Every number in a run comes from here, so the rules are strict: times are `time.perf_counter()` taken
as soon as the read that carried them returned; a content token is a chunk that carries text (the
role-only first chat chunk is not one); usage is the server's own (`stream_options.include_usage`);
kold's cold/warm tag and breakdown come from its `x-kold-*` headers and are None for a server that sends
none. A bad server never raises out of `send`: refused or reset connections, timeouts, stalled streams,
malformed SSE and error events each become a record with its error type.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kold.loadgen.http import Connection, Pool, TransportError
from kold.loadgen.records import RequestRecord
from kold.loadgen.schedule import PlannedRequest
from kold.loadgen.sse import MalformedSSEError, SSEParser
from kold.loadgen.target import Target

KOLD_PREFIX = "x-kold-"
ERROR_BODY_LIMIT = 64 * 1024  # an error response is read this far for its message


class RequestError(Exception):
    """Ends a request early with an error type (internal: `send` turns it into the record)."""

    def __init__(self, error: str, detail: str | None = None) -> None:
        super().__init__(detail or error)
        self.error = error
        self.detail = detail


def kold_headers(headers: Mapping[str, str]) -> tuple[bool | None, dict[str, float] | None, str | None]:
    """(cold, cold_start, instance) from a response's `x-kold-*` headers.

    `cold` is the gateway's `x-kold-cold` ("1"/"0"); a runtime answering directly sends no such tag but
    does send `x-kold-cold-start-ms` on the first response after its cold start, so a kold server without
    the tag is cold exactly when that header is there. `cold_start` holds every numeric `x-kold-*` value
    (milliseconds: queue-ms, cold-start-ms, restore-ms, ...) keyed without the prefix. A server that
    sends no `x-kold-*` header at all gets None for both: nothing is guessed.
    """
    cold_tag: str | None = None
    instance: str | None = None
    breakdown: dict[str, float] = {}
    seen = False
    for key, value in headers.items():
        name = key.lower()
        if not name.startswith(KOLD_PREFIX):
            continue
        seen = True
        short = name[len(KOLD_PREFIX) :]
        if short == "cold":
            cold_tag = value.strip()
        elif short == "instance":
            instance = value
        else:
            with contextlib.suppress(ValueError):  # e.g. restore-source (a tier name) is not a number
                breakdown[short] = float(value)
    if not seen:
        return None, None, None
    cold = cold_tag == "1" if cold_tag is not None else "cold-start-ms" in breakdown
    return cold, breakdown or None, instance


@dataclass
class _Timing:
    """What a request has measured so far (perf_counter values)."""

    tokens: list[float] = field(default_factory=list)
    done: float | None = None
    status: int | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cold: bool | None = None
    cold_start: dict[str, float] | None = None
    instance: str | None = None


class Client:
    """Sends planned requests to a target over pooled keep-alive HTTP/1.1 connections (loadgen/http.py).

    `max_connections` caps the requests in flight (the run's concurrency); None means no cap, which an
    open-loop run needs: a cap below the load would queue requests inside the client, unseen. `timeout_s`
    bounds a whole request; `stall_s` bounds each wait for more of a stream once its head has come (the
    head itself may legitimately take a cold start's time).
    """

    def __init__(self, target: Target, *, max_connections: int | None, timeout_s: float, stall_s: float) -> None:
        if timeout_s <= 0 or stall_s <= 0:
            raise ValueError("timeout_s and stall_s must be positive")
        self.target = target
        self.timeout_s = timeout_s
        self.stall_s = stall_s
        self._pool = Pool(target.url)
        self._slots = asyncio.Semaphore(max_connections) if max_connections is not None else None
        extra = "".join(f"{k}: {v}\r\n" for k, v in target.headers().items())
        self._head = (
            f"POST {self._pool.path} HTTP/1.1\r\nhost: {self._pool.authority}\r\nuser-agent: kold-loadgen\r\n"
            f"content-type: application/json\r\naccept: text/event-stream, application/json\r\n{extra}"
            "content-length: "
        ).encode("latin-1")

    async def aclose(self) -> None:
        self._pool.close()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def body(self, planned: PlannedRequest, prompt: str) -> dict[str, Any]:
        """The request body for the target's API."""
        body: dict[str, Any] = {"max_tokens": planned.max_tokens, "stream": self.target.stream}
        if planned.function:
            body["model"] = planned.function
        if self.target.api == "chat":
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        if self.target.stream:
            body["stream_options"] = {"include_usage": True}
        if planned.ignore_eos:
            body["ignore_eos"] = True
        return body

    async def send(self, planned: PlannedRequest, prompt: str, *, origin: float, scheduled: float) -> RequestRecord:
        """Send one request now and measure it. `origin` is the run's start and `scheduled` the planned send
        time, both perf_counter values; the record's times count from them. Never raises (but cancellation
        propagates)."""
        content = json.dumps(self.body(planned, prompt)).encode()
        payload = self._head + b"%d\r\n\r\n" % len(content) + content
        timing = _Timing()
        error: str | None = None
        detail: str | None = None
        sent = time.perf_counter()
        try:
            if self._slots is None:
                await self._exchange(payload, timing, sent)
            else:
                async with self._slots:
                    await self._exchange(payload, timing, sent)
        except RequestError as exc:
            error, detail = exc.error, exc.detail
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            error, detail = "client_error", _describe(exc)
        return _record(planned, timing, origin=origin, scheduled=scheduled, sent=sent, error=error, detail=detail)

    async def _exchange(self, payload: bytes, timing: _Timing, sent: float) -> None:
        """One request on a pooled connection (a reused one that the server had closed meanwhile is retried
        once on a new connection: the request never reached it)."""
        deadline = sent + self.timeout_s
        for attempt in range(2):
            conn = self._pool.take_idle() if attempt == 0 else None
            reused = conn is not None
            if conn is None:
                conn = await self._connect(deadline)
            exchange = _Exchange(self, conn, timing, deadline, reused)
            try:
                conn.start(exchange, payload)
                await exchange.result
            except _StaleConnectionError:
                continue
            except BaseException:
                exchange.stop()  # cancelled: the connection, half used, is closed
                raise
            return
        raise RequestError("connection_reset", "the server closed two connections before answering")  # pragma: no cover

    async def _connect(self, deadline: float) -> Connection:
        try:
            async with asyncio.timeout(max(0.0, deadline - time.perf_counter())):
                return await self._pool.connect()
        except TimeoutError:
            raise RequestError("timeout", f"no connection within {self.timeout_s:g} s") from None
        except ConnectionRefusedError as exc:
            raise RequestError("connection_refused", _describe(exc)) from None
        except (OSError, ssl.SSLError) as exc:
            refused = any(isinstance(e, ConnectionRefusedError) for e in _chain(exc))
            raise RequestError("connection_refused" if refused else "connect_error", _describe(exc)) from None

    def _event(self, kind: str, data: str, now: float, timing: _Timing) -> bool:
        """Account one SSE event; True at `[DONE]`."""
        if data == "[DONE]":
            return True
        if kind == "error":
            raise RequestError("sse_error", _message(data))
        try:
            payload = json.loads(data)
        except ValueError:
            raise RequestError("malformed_sse", f"an event's data is not JSON: {data[:200]!r}") from None
        if not isinstance(payload, dict):
            raise RequestError("malformed_sse", f"an event's data is not a JSON object: {data[:200]!r}")
        if "error" in payload:
            raise RequestError("sse_error", _message(data))
        choices = payload.get("choices") or []
        if not isinstance(choices, list):
            raise RequestError("malformed_sse", f"'choices' is not a list: {data[:200]!r}")
        api = self.target.api
        for choice in choices:
            if _has_text(choice, api):
                timing.tokens.append(now)
                break
        _usage(payload, timing)
        return False

    def _whole(self, raw: bytes, timing: _Timing) -> None:
        """A non-streamed answer, read whole: its usage."""
        try:
            payload = json.loads(raw)
        except ValueError:
            raise RequestError("malformed_response", f"the body is not JSON: {raw[:200]!r}") from None
        if not isinstance(payload, dict):
            raise RequestError("malformed_response", f"the body is not a JSON object: {raw[:200]!r}")
        if "error" in payload:
            raise RequestError("response_error", _message(raw.decode("utf-8", "replace")))
        _usage(payload, timing)


class _StaleConnectionError(Exception):
    """A reused keep-alive connection was closed by the server before any byte of an answer."""


class _Exchange:
    """One request's response as its connection parses it (loadgen/http.py's Handler): every content token
    timed by the read that carried it, the stream's stall and the request's deadline watched by one timer.
    It ends by setting `result` (None, or the RequestError to raise) and by handing the connection back
    (complete and kept alive) or closing it."""

    def __init__(self, client: Client, conn: Connection, timing: _Timing, deadline: float, reused: bool) -> None:
        self.loop = asyncio.get_running_loop()
        self.result: asyncio.Future[None] = self.loop.create_future()
        self.client = client
        self.conn = conn
        self.timing = timing
        self.deadline = deadline
        self.reused = reused
        self.state = "head"  # head | stream | whole | error_body | done
        self.sse = SSEParser()
        self.body: list[bytes] = []
        self.body_size = 0
        self.last = 0.0  # perf_counter of the latest data (the stall clock)
        self.close_delimited = False
        self.timer = self.loop.call_later(max(0.0, deadline - time.perf_counter()), self._tick)

    # the end
    def _finish(self, error: RequestError | None, *, reuse: bool = False) -> None:
        if self.state == "done":
            return
        self.state = "done"
        self.timer.cancel()
        if reuse:
            self.conn.detach(min(self.client.stall_s, 1.0))  # the rest of the body is read only to reuse it
        else:
            self.conn.close()
        if not self.result.done():
            if error is None:
                self.result.set_result(None)
            else:
                self.result.set_exception(error)

    def stop(self) -> None:
        """Abandon the request (cancelled)."""
        if self.state != "done":
            self.state = "done"
            self.timer.cancel()
            self.conn.close()

    def _tick(self) -> None:
        """The timer: the deadline, a stalled stream, or an error body that does not come."""
        if self.state == "done":
            return
        now = time.perf_counter()
        stall = self.client.stall_s
        if self.state in ("stream", "error_body") and now - self.last >= stall - 0.0005:
            if self.state == "error_body":
                self._error_status()
            else:
                self._finish(RequestError("stream_stalled", f"no data for {stall:g} s mid-stream"))
            return
        if now >= self.deadline - 0.0005:
            if self.state == "stream" and self.last + stall < self.deadline:
                self._finish(RequestError("stream_stalled", f"no data for {stall:g} s mid-stream"))
            elif self.state == "error_body":
                self._error_status()
            else:
                self._finish(RequestError("timeout", f"no complete answer within {self.client.timeout_s:g} s"))
            return
        due = self.deadline
        if self.state in ("stream", "error_body"):
            due = min(due, self.last + stall)
        self.timer = self.loop.call_later(max(0.0, due - now), self._tick)

    def _error_status(self) -> None:
        status = self.timing.status
        raw = b"".join(self.body)[:ERROR_BODY_LIMIT]
        self._finish(RequestError(f"http_{status}", _message(raw.decode("utf-8", "replace"))))

    # http.Handler
    def on_head(self, status: int, headers: dict[str, str], now: float) -> None:
        if self.state != "head":
            return
        t = self.timing
        t.status = status
        t.cold, t.cold_start, t.instance = kold_headers(headers)
        self.last = now
        self.close_delimited = "content-length" not in headers and "chunked" not in headers.get("transfer-encoding", "")
        if status >= 400:
            self.state = "error_body"  # its message is read for at most stall_s
            self._retime(now)
        elif not self.client.target.stream:
            self.state = "whole"
        else:
            kind = headers.get("content-type", "")
            if "text/event-stream" not in kind:
                self._finish(
                    RequestError("malformed_sse", f"a streamed answer came as {kind!r}, not text/event-stream")
                )
                return
            self.state = "stream"
            self._retime(now)

    def _retime(self, now: float) -> None:
        """Move the timer to the stall deadline when that is the nearer one."""
        if now + self.client.stall_s < self.deadline:
            self.timer.cancel()
            self.timer = self.loop.call_later(self.client.stall_s, self._tick)

    def on_body(self, data: bytes, now: float) -> None:
        state = self.state
        if state == "stream":
            self.last = now
            try:
                events = self.sse.feed(data)
                for event in events:
                    if self.client._event(event.event, event.data, now, self.timing):
                        self.timing.done = now
                        self._finish(None, reuse=True)
                        return
            except MalformedSSEError as exc:
                self._finish(RequestError("malformed_sse", str(exc)))
            except RequestError as exc:
                self._finish(exc)
        elif state in ("whole", "error_body"):
            self.last = now
            self.body.append(data)
            self.body_size += len(data)
            if state == "error_body" and self.body_size >= ERROR_BODY_LIMIT:
                self._error_status()

    def on_complete(self, now: float) -> None:
        state = self.state
        if state == "stream":
            self._stream_end(now, reuse=True)
        elif state == "whole":
            self.timing.done = now
            try:
                self.client._whole(b"".join(self.body), self.timing)
            except RequestError as exc:
                self._finish(exc, reuse=True)
                return
            self._finish(None, reuse=True)
        elif state == "error_body":
            self._error_status()
        elif state == "head":  # a response with no head callback (cannot happen with httptools)
            self._finish(RequestError("protocol_error", "a response without a head"))

    def _stream_end(self, now: float, *, reuse: bool) -> None:
        """The body ended before [DONE]: a last unterminated event may still hold it."""
        try:
            for event in self.sse.close():
                if self.client._event(event.event, event.data, now, self.timing):
                    self.timing.done = now
                    self._finish(None, reuse=reuse)
                    return
        except RequestError as exc:
            self._finish(exc, reuse=reuse)
            return
        self._finish(RequestError("incomplete_stream", "the stream ended without data: [DONE]"), reuse=reuse)

    def on_lost(self, error: TransportError, got_bytes: bool) -> None:
        if self.state == "done":
            return
        if self.state == "head" and not got_bytes and self.reused and error.kind == "connection_reset":
            self.state = "done"
            self.timer.cancel()
            self.result.set_exception(_StaleConnectionError())
            return
        if self.state == "stream" and self.close_delimited and error.kind == "connection_reset":
            self._stream_end(time.perf_counter(), reuse=False)  # a body that ends with the connection
            return
        if self.state == "error_body":
            self._error_status()
            return
        self._finish(RequestError(error.kind, str(error)))


def _has_text(choice: object, api: str) -> bool:
    """Whether a streamed choice carries generated text (reasoning text counts: it is generated tokens)."""
    if not isinstance(choice, dict):
        return False
    if api == "completions":
        return bool(choice.get("text"))
    delta = choice.get("delta")
    if not isinstance(delta, dict):
        return False
    return bool(delta.get("content") or delta.get("reasoning_content") or delta.get("reasoning"))


def _usage(payload: dict[str, Any], timing: _Timing) -> None:
    usage = payload.get("usage")
    if isinstance(usage, dict):
        prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
        if isinstance(prompt, int):
            timing.prompt_tokens = prompt
        if isinstance(completion, int):
            timing.completion_tokens = completion


def _message(text: str) -> str:
    """An OpenAI error body's message (with its code), or the text itself."""
    try:
        payload = json.loads(text)
    except ValueError:
        return text[:500]
    err = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(err, dict):
        msg = str(err.get("message") or "")
        code = err.get("code") or err.get("type")
        return f"{code}: {msg}" if code else msg
    if isinstance(err, str):
        return err
    return text[:500]


def _describe(exc: BaseException) -> str:
    """The exception's type and the first message along its chain (a wrapper's own is sometimes empty)."""
    causes = list(dict.fromkeys(str(e) for e in _chain(exc) if str(e)))
    return f"{type(exc).__name__}: {' <- '.join(causes[:2])}" if causes else type(exc).__name__


def _chain(exc: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and len(out) < 10:
        out.append(cur)
        cur = cur.__cause__ or cur.__context__
    return out


def _record(
    planned: PlannedRequest,
    t: _Timing,
    *,
    origin: float,
    scheduled: float,
    sent: float,
    error: str | None,
    detail: str | None,
) -> RequestRecord:
    """The record of a finished request. Latency is set only for a complete answer (an error has none);
    token times are kept even for a stream that broke later, since they were measured."""
    first = t.tokens[0] if t.tokens else None
    second = t.tokens[1] if len(t.tokens) > 1 else None
    done = t.done if error is None else None
    latency = done - sent if done is not None else None
    tpot = None
    if latency is not None and first is not None and t.completion_tokens is not None and t.completion_tokens > 1:
        tpot = (latency - (first - sent)) / (t.completion_tokens - 1)
    return RequestRecord(
        function=planned.function,
        scheduled_s=scheduled - origin,
        sent_s=sent - origin,
        lag_s=sent - scheduled,
        ttft_s=first - sent if first is not None else None,
        ttst_s=second - sent if second is not None else None,
        ttft_sched_s=first - scheduled if first is not None else None,
        latency_s=latency,
        latency_sched_s=done - scheduled if done is not None else None,
        itl_s=[b - a for a, b in zip(t.tokens, t.tokens[1:], strict=False)],
        tpot_s=tpot,
        prompt_tokens=t.prompt_tokens,
        completion_tokens=t.completion_tokens,
        target_prompt_tokens=planned.prompt_tokens,
        max_tokens=planned.max_tokens,
        status=t.status,
        error=error,
        cold=t.cold,
        cold_start=t.cold_start,
        instance=t.instance,
        stage=planned.stage,
        error_detail=detail,
    )
