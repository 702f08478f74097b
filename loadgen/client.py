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
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx

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
    """Sends planned requests to a target over one pooled HTTP/1.1 client.

    `max_connections` sizes the pool to the run's concurrency; None means unbounded, which an open-loop run
    needs: a pool smaller than the load would queue requests inside the client, unseen. `timeout_s` bounds
    a whole request; `stall_s` bounds each wait for more of a stream once its head has come (the head
    itself may legitimately take a cold start's time).
    """

    def __init__(self, target: Target, *, max_connections: int | None, timeout_s: float, stall_s: float) -> None:
        if timeout_s <= 0 or stall_s <= 0:
            raise ValueError("timeout_s and stall_s must be positive")
        self.target = target
        self.timeout_s = timeout_s
        self.stall_s = stall_s
        self._url = target.url
        self._headers = {"Content-Type": "application/json", **target.headers()}
        self._http = httpx.AsyncClient(
            http1=True,
            http2=False,
            trust_env=False,
            timeout=httpx.Timeout(None),  # deadlines are ours (see send): httpx's read timeout cannot tell a
            # slow head (a cold start) from a stalled stream
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        )

    async def aclose(self) -> None:
        await self._http.aclose()

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
        timing = _Timing()
        error: str | None = None
        detail: str | None = None
        sent = time.perf_counter()
        try:
            await self._exchange(content, timing, sent)
        except RequestError as exc:
            error, detail = exc.error, exc.detail
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            error, detail = _classify(exc), _describe(exc)
        return _record(planned, timing, origin=origin, scheduled=scheduled, sent=sent, error=error, detail=detail)

    async def _exchange(self, content: bytes, timing: _Timing, sent: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        head = False
        stall_at: float | None = None  # the stall deadline in force, when it is the nearer one
        try:
            async with asyncio.timeout_at(deadline) as scope:
                req = self._http.build_request("POST", self._url, content=content, headers=self._headers)
                resp = await self._http.send(req, stream=True)
                try:
                    head = True
                    timing.status = resp.status_code
                    timing.cold, timing.cold_start, timing.instance = kold_headers(resp.headers)
                    if resp.status_code >= 400:
                        raise RequestError(f"http_{resp.status_code}", await _error_message(resp, self.stall_s))
                    if not self.target.stream:
                        await self._whole(resp, timing)
                        return
                    kind = resp.headers.get("content-type", "")
                    if "text/event-stream" not in kind:
                        raise RequestError(
                            "malformed_sse", f"a streamed answer came as {kind!r}, not text/event-stream"
                        )
                    parser = SSEParser()
                    finished = False
                    stall_at = min(deadline, loop.time() + self.stall_s)
                    scope.reschedule(stall_at)
                    async for chunk in resp.aiter_bytes():
                        now = time.perf_counter()
                        if not finished:
                            try:
                                events = parser.feed(chunk)
                            except MalformedSSEError as exc:
                                raise RequestError("malformed_sse", str(exc)) from None
                            for event in events:
                                if self._event(event.event, event.data, now, timing):
                                    finished = True
                                    timing.done = now
                                    break
                        # after [DONE], the rest of the body is read only so that the connection can be reused
                        wait = min(self.stall_s, 1.0) if finished else self.stall_s
                        stall_at = min(deadline, loop.time() + wait)
                        scope.reschedule(stall_at)
                    if not finished:
                        for event in parser.close():
                            if self._event(event.event, event.data, time.perf_counter(), timing):
                                finished = True
                                timing.done = time.perf_counter()
                    if not finished:
                        raise RequestError("incomplete_stream", "the stream ended without data: [DONE]")
                finally:
                    await resp.aclose()
        except TimeoutError:
            if timing.done is not None:
                return  # the answer was complete; only the drain for reuse timed out
            if head and stall_at is not None and stall_at < deadline:
                raise RequestError("stream_stalled", f"no data for {self.stall_s:g} s mid-stream") from None
            raise RequestError("timeout", f"no complete answer within {self.timeout_s:g} s") from None

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
        if any(_has_text(c, self.target.api) for c in choices):
            timing.tokens.append(now)
        _usage(payload, timing)
        return False

    async def _whole(self, resp: httpx.Response, timing: _Timing) -> None:
        """A non-streamed answer: read it whole; its usage."""
        raw = await resp.aread()
        timing.done = time.perf_counter()
        try:
            payload = json.loads(raw)
        except ValueError:
            raise RequestError("malformed_response", f"the body is not JSON: {raw[:200]!r}") from None
        if not isinstance(payload, dict):
            raise RequestError("malformed_response", f"the body is not a JSON object: {raw[:200]!r}")
        if "error" in payload:
            raise RequestError("response_error", _message(raw.decode("utf-8", "replace")))
        _usage(payload, timing)


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


async def _error_message(resp: httpx.Response, wait_s: float) -> str:
    """The message of an error response (its first ERROR_BODY_LIMIT bytes, what came within `wait_s`)."""
    raw = b""
    try:
        async with asyncio.timeout(wait_s):
            async for chunk in resp.aiter_bytes():
                raw += chunk
                if len(raw) >= ERROR_BODY_LIMIT:
                    break
    except (httpx.HTTPError, TimeoutError):
        pass  # the status says enough
    return _message(raw[:ERROR_BODY_LIMIT].decode("utf-8", "replace"))


def _classify(exc: Exception) -> str:
    """The error type of a transport failure."""
    if isinstance(exc, httpx.ConnectError):
        refused = "refused" in str(exc).lower() or any(isinstance(e, ConnectionRefusedError) for e in _chain(exc))
        return "connection_refused" if refused else "connect_error"
    if isinstance(exc, httpx.TimeoutException):
        return "timeout"
    if isinstance(exc, httpx.ReadError | httpx.WriteError):
        return "connection_reset"
    if isinstance(exc, httpx.RemoteProtocolError):
        text = str(exc).lower()
        closed = "peer closed" in text or "disconnected" in text or "incomplete" in text
        return "connection_reset" if closed else "protocol_error"
    if isinstance(exc, httpx.DecodingError):
        return "malformed_response"
    if isinstance(exc, httpx.HTTPError):
        return "http_error"
    return "client_error"


def _describe(exc: BaseException) -> str:
    """The exception's type and the first message along its chain (httpx's own is sometimes empty)."""
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
