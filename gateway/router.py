"""The data path: route an OpenAI request to an instance of its function and stream the answer back.

The body's `model` (the function name) is replaced by the revision's snapshot id, the name the
runtime serves. Response bytes are passed through as they arrive (SSE unbuffered); the runtime's
headers are kept and `X-Kold-Instance` / `X-Kold-Cold` added. A request whose instance failed
before any response byte (a crash, a refused connection) is retried once on another instance.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
from starlette.background import BackgroundTask
from starlette.responses import Response, StreamingResponse

from kold.gateway.activator import Gateway
from kold.gateway.pool import Instance
from kold.runtime.protocol import InvalidRequestError, UnavailableError

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
}
_FORWARD_REQUEST_HEADERS = ("content-type", "accept", "user-agent", "x-request-id")


def parse_body(raw: bytes) -> dict[str, Any]:
    """The request as a JSON object (json errors become 400 via the protocol's error table)."""
    body = json.loads(raw.decode("utf-8"))
    if not isinstance(body, dict):
        raise InvalidRequestError("the request body must be a JSON object")
    return body


async def proxy(
    gateway: Gateway,
    http: httpx.AsyncClient,
    name: str,
    path: str,
    body: dict[str, Any],
    headers: dict[str, str],
) -> Response:
    """Hold for an instance of `name`, forward `body` to `path` on it, stream the response back."""
    arrival = time.time()
    failed: Instance | None = None
    for attempt in range(2):
        inst, _revision, cold, wait_s = await gateway.acquire(name, exclude=failed)
        if attempt == 0:
            gateway.record(name, arrival, cold, wait_s)
        content = json.dumps({**body, "model": name}).encode()  # the runtime serves it under the function's name
        fwd = {k: v for k, v in headers.items() if k.lower() in _FORWARD_REQUEST_HEADERS}
        request = http.build_request("POST", f"{inst.url}{path}", content=content, headers=fwd)
        try:
            upstream = await http.send(request, stream=True)
        except httpx.TransportError as exc:
            gateway.release(inst)
            log.warning("instance %s failed before responding (%s)", inst.id, exc)
            failed = inst
            continue
        except BaseException:
            gateway.release(inst)
            raise
        out_headers = {k: v for k, v in upstream.headers.items() if k.lower() not in _HOP_BY_HOP}
        out_headers["X-Kold-Instance"] = inst.id
        out_headers["X-Kold-Cold"] = "1" if cold else "0"
        released = False

        def done(inst: Instance = inst, upstream: httpx.Response = upstream) -> None:
            nonlocal released
            if not released:
                released = True
                gateway.release(inst)

        async def stream(upstream: httpx.Response = upstream) -> AsyncIterator[bytes]:
            try:
                async for chunk in upstream.aiter_raw():
                    yield chunk
            finally:
                await upstream.aclose()
                done()

        async def cleanup(upstream: httpx.Response = upstream) -> None:
            await upstream.aclose()
            done()

        return StreamingResponse(
            stream(), status_code=upstream.status_code, headers=out_headers, background=BackgroundTask(cleanup)
        )
    raise UnavailableError(f"the instances of {name!r} failed; try again")
