"""The data path: route an OpenAI request to an instance of its function and stream the answer back.

The body's `model` (the function name) is replaced by the revision's snapshot id, the name the
runtime serves. Response bytes are passed through as they arrive (SSE unbuffered); the runtime's
headers are kept and `X-Kold-Instance` / `X-Kold-Cold` added. A request whose instance failed
before any byte reached the client (a crash, a refused connection) is retried once on another instance.
Every request is recorded once it is over (gateway/recorder.py): its outcome, and its tokens from the
answer's `usage` (gateway/usage.py: a non-streamed body's, or a stream's last chunks').
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from starlette.background import BackgroundTask
from starlette.responses import Response, StreamingResponse

from kold.controller import records
from kold.gateway.activator import ColdStartTimeoutError, Gateway
from kold.gateway.pool import Instance, InstanceState
from kold.gateway.recorder import Call, outcome_of
from kold.gateway.startfailures import FAILED_AFTER
from kold.gateway.upstream import UpstreamClient, UpstreamError, UpstreamResponse
from kold.gateway.usage import StreamTail, tokens
from kold.runtime.protocol import (
    SSE_DONE,
    ClientDisconnectedError,
    ResponseTimeoutError,
    UnavailableError,
    error_body,
    parse_json_object,
    sse,
)

log = logging.getLogger("kold.gateway.router")

_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailers",
    "transfer-encoding",
    "upgrade",
    "content-length",
    # the gateway's server writes its own: passing the instance's on would send the header twice
    "date",
    "server",
}
# tries of one request: a retry after a warm instance failed, and the tries on instances whose start
# failed under it until the revision is marked failed (startfailures.FAILED_AFTER)
MAX_ATTEMPTS = FAILED_AFTER + 2
_FORWARD_REQUEST_HEADERS = ("content-type", "accept", "user-agent", "x-request-id")


def parse_body(raw: bytes) -> dict[str, Any]:
    """The request as a JSON object, checked as the runtime checks it (protocol.parse_json_object), so
    a body no instance could take is a 400 here."""
    return parse_json_object(raw)


async def sse_events(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Pass a text/event-stream through in whole events (cut after the last blank line seen): should
    the upstream break off, what went out ends on an event boundary, and an error event can follow.
    The runtime writes whole events, so nothing is held back in practice."""
    held = b""
    async for chunk in chunks:
        data = held + chunk
        cut = data.rfind(b"\n\n") + 2
        if cut < 2:
            held = data
            continue
        held = data[cut:]
        yield data[:cut]
    if held:
        yield held


async def proxy(
    gateway: Gateway,
    upstream_client: UpstreamClient,
    name: str,
    path: str,
    body: dict[str, Any],
    headers: dict[str, str],
    raw: bytes | None = None,
) -> Response:
    """Hold for an instance of `name`, forward the request to `path` on it, pass the response back.

    `raw` is the body as the client sent it: forwarded unchanged when its `model` already is the
    function's name (the runtime serves under that name), which saves re-encoding it on the hot path.
    A streamed request (`"stream": true`) is passed through chunk by chunk as the runtime writes it;
    any other is read whole and returned with its length, one message instead of a chunked stream —
    and a non-streamed request whose instance fails before the whole answer arrived is retried too,
    since nothing reached the client yet.
    """
    call = gateway.begin(name)
    try:
        return await _forward(gateway, upstream_client, name, path, body, headers, raw, call)
    except (asyncio.CancelledError, ClientDisconnectedError):
        gateway.finish(call, records.CANCELLED)
        raise
    except ColdStartTimeoutError:
        gateway.finish(call, records.TIMED_OUT)
        raise
    except Exception:
        gateway.finish(call, records.FAILED)
        raise


async def _forward(
    gateway: Gateway,
    upstream_client: UpstreamClient,
    name: str,
    path: str,
    body: dict[str, Any],
    headers: dict[str, str],
    raw: bytes | None,
    call: Call,
) -> Response:
    if raw is None or body.get("model") != name:
        raw = json.dumps({**body, "model": name}).encode()
    fwd = [(k, v) for k, v in headers.items() if k.lower() in _FORWARD_REQUEST_HEADERS]
    fwd += list(gateway.pool.instance_headers.items())
    streamed = bool(body.get("stream"))
    failed: Instance | None = None
    retries = 1  # a request that failed on a warm instance is tried once more on another
    for attempt in range(MAX_ATTEMPTS):
        inst, revision, cold, _ = await gateway.acquire(name, exclude=failed, call=call)
        starting = inst.state is InstanceState.STARTING
        timeout_s = revision.scaling.request_timeout_s
        upstream: UpstreamResponse | None = None
        try:
            # Like Knative's timeoutSeconds: the instance has the function's request timeout to begin
            # its answer (a non-streamed answer begins when it is complete); on expiry the connection
            # is closed, which cancels the generation in the runtime.
            async with asyncio.timeout(timeout_s):
                upstream = await upstream_client.request("POST", gateway.pool.host, inst.port, path, fwd, raw)
                content = None if streamed else await upstream.aread()
        except TimeoutError:
            gateway.release(inst)
            log.warning("instance %s did not answer within %ss", inst.id, timeout_s)
            raise ResponseTimeoutError(f"the function {name!r} did not answer within {timeout_s:g} s") from None
        except UpstreamError as exc:
            gateway.release(inst)
            log.warning("instance %s failed before the answer was complete (%s)", inst.id, exc)
            failed = inst
            if starting or retries > 0:
                retries -= 0 if starting else 1
                continue
            break
        except BaseException:  # cancelled (the client left): a half-read connection is closed, never reused
            if upstream is not None:
                upstream.close()
            gateway.release(inst)
            raise
        if upstream.status_code == 503 and (starting or retries > 0) and attempt < MAX_ATTEMPTS - 1:
            # unavailable (its restore failed, or it is draining): on another instance; nothing has
            # reached the client yet. A request woken onto an instance whose start then failed waits
            # for the next start instead, until the revision is marked failed (acquire says why)
            upstream.close()
            gateway.release(inst)
            log.warning("instance %s answered 503; trying another", inst.id)
            failed = inst
            retries -= 0 if starting else 1
            continue
        out_headers = {k: v for k, v in upstream.headers if k.lower() not in _HOP_BY_HOP}
        out_headers["X-Kold-Instance"] = inst.id
        out_headers["X-Kold-Cold"] = "1" if cold else "0"
        if content is not None:
            gateway.release(inst)
            gateway.finish(call, outcome_of(upstream.status_code), *tokens(content))
            return Response(content, status_code=upstream.status_code, headers=out_headers)
        released = False

        def done(inst: Instance = inst, upstream: UpstreamResponse = upstream) -> None:
            nonlocal released
            upstream.close()  # a no-op once the body was read to the end (the connection is pooled then)
            if not released:
                released = True
                gateway.release(inst)

        async def stream(upstream: UpstreamResponse = upstream, inst: Instance = inst) -> AsyncIterator[bytes]:
            tail = StreamTail()
            outcome = records.CANCELLED  # unless it ends: the client left mid-stream
            try:
                async for chunk in sse_events(upstream.iter_raw()):
                    tail.add(chunk)
                    yield chunk
                outcome = outcome_of(upstream.status_code)
            except UpstreamError as exc:
                outcome = records.FAILED
                # bytes have gone out, so the status cannot change: end the stream as a stream ends on an
                # error (an SSE error event, then [DONE]) instead of leaving the client a cut body
                log.warning("instance %s broke off a stream (%s)", inst.id, exc)
                gateway.stream_cut(name)
                error = UnavailableError(f"the instance serving {name!r} failed mid-answer: {exc}", code="stream_cut")
                yield sse(error_body(error)[1])
                yield SSE_DONE
            finally:
                gateway.finish(call, outcome, *tail.tokens())
                done()

        async def cleanup() -> None:  # async: Starlette would run a plain function in a worker thread
            # a client that left before the stream began: its generator never ran, nor its finally
            gateway.finish(call, records.CANCELLED)  # a no-op once the stream recorded it
            done()

        return StreamingResponse(
            stream(), status_code=upstream.status_code, headers=out_headers, background=BackgroundTask(cleanup)
        )
    raise UnavailableError(f"the instances of {name!r} failed; try again")
