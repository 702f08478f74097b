"""The gateway's HTTP app: the OpenAI data path, the models list, health, metrics, and the admin API.

Thin: each route parses, calls the activator/router (data path) or the admin API (gateway/admin.py),
and every error goes through one table (gateway/errors.py). Authentication is gateway/auth.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.exceptions import RedisError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from kold.controller.demand import DemandStore
from kold.gateway.activator import ColdStartTimeoutError, Gateway, RegistryUnavailableError
from kold.gateway.admin import AdminAPI
from kold.gateway.auth import KeyAuth
from kold.gateway.capacity import NodeCapacity
from kold.gateway.errors import error_response, status_of
from kold.gateway.names import InvalidNameError
from kold.gateway.pool import InstancePool
from kold.gateway.registry import Registry
from kold.gateway.router import parse_body, proxy
from kold.gateway.upstream import UpstreamClient
from kold.runtime.httpserver import (
    DEFAULT_BODY_TIMEOUT_S,
    DEFAULT_HEADER_TIMEOUT_S,
    DEFAULT_MAX_BODY_BYTES,
    disconnect_watcher,
    http_protocol,
    read_body,
    unless_gone,
)
from kold.runtime.protocol import (
    ClientDisconnectedError,
    InvalidRequestError,
    MethodNotAllowedError,
    ModelNotFoundError,
    RouteNotFoundError,
)

log = logging.getLogger("kold.gateway.app")

_ROUTED_PATHS = {"chat/completions", "completions", "embeddings"}
# A client's X-Request-Id is kept when it is a plain token (it goes into log lines); anything else is
# replaced by one of ours.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")

Handler = Callable[[Request], Awaitable[Response]]
T = TypeVar("T")


def server_config(
    app: Starlette,
    host: str,
    port: int,
    *,
    header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S,
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
) -> uvicorn.Config:
    """How the gateway is served (`kold up` and bench/gateway.py alike).

    httptools and uvloop (they are dependencies: ~0.5 ms less per request than h11 on asyncio), with
    the runtime's request-head and body deadlines on each connection (runtime/httpserver.py: a client
    that never finishes its request is closed, not held; `body_timeout_s` is build_app's); no access
    log (the gateway's metrics count requests; a log line per request costs CPU on the data path); and
    no X-Forwarded-* handling: the gateway is the edge of the local platform, and trusting those
    headers from any client would let it spoof its address.
    """
    protocol = http_protocol(header_timeout_s=header_timeout_s, body_timeout_s=body_timeout_s)
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=protocol,
        log_level="warning",
        access_log=False,
        proxy_headers=False,
        server_header=False,
    )


def request_id(request: Request) -> str:
    given = request.headers.get("x-request-id", "")
    return given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex


def build_app(
    registry: Registry,
    pool: InstancePool,
    *,
    require_keys: bool,
    upstream: UpstreamClient | None = None,
    gateway: Gateway | None = None,
    warm_template: bool = False,
    clock: Callable[[], float] = time.monotonic,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
    metrics_need_key: bool = False,
    capacity: NodeCapacity | None = None,
    demand: DemandStore | None = None,
) -> Starlette:
    """The gateway app; its lifespan runs the gateway's background tasks and stops instances at the end.

    `warm_template`: start the pool's fork template in the background at once, so that the first
    cold start already forks (otherwise the first instance waits for the template's imports).
    `max_body_bytes`, `body_timeout_s`: the data path's request bodies (413 above the size, 408 when
    the body is not in within the time; the instances have the same limits).
    `capacity`: the node's resources, so that no instance starts that does not fit (None: unbounded).
    `metrics_need_key`: /metrics asks for an API key, like the data path (off: open for scrapers).
    `demand`: where the gateway built here records demand (None: a DemandStore on the registry's
    Redis and prefix). A `gateway` passed in brings its own (and its capacity).
    """
    if gateway is None:
        store = demand if demand is not None else DemandStore(registry.redis, registry.prefix)
        gateway = Gateway(registry, pool, capacity=capacity, demand=store)
    gw = gateway
    client = upstream if upstream is not None else UpstreamClient()
    auth = KeyAuth(registry, gw, require_keys=require_keys, clock=clock)
    admin = AdminAPI(gw, auth, max_body_bytes=max_body_bytes, body_timeout_s=body_timeout_s)

    def endpoint(fn: Handler, *, scope: str | None = "invoke") -> Handler:
        """`fn` behind the key check for `scope` ("invoke", "admin"; None: open) and the error table."""

        async def wrapped(request: Request) -> Response:
            try:
                if scope is not None:
                    await auth.check(request.headers.get("authorization"), scope)
                return await fn(request)
            except Exception as exc:
                if isinstance(exc, RedisError):
                    gw.redis_unreachable(exc)
                return error_response(exc)

        return wrapped

    # -- data path --

    async def read(request: Request) -> bytes:
        return await read_body(request, max_bytes=max_body_bytes, timeout_s=body_timeout_s)

    async def by_model(request: Request) -> Response:
        raw = await read(request)
        body = parse_body(raw)
        name = body.get("model")
        if not isinstance(name, str) or not name:
            raise InvalidRequestError("'model' (the function name) is required", param="model")
        return await _route(name, request.url.path.removeprefix("/v1/"), body, raw, request)

    async def by_path(request: Request) -> Response:
        kind = request.path_params["rest"]
        if kind not in _ROUTED_PATHS:
            raise RouteNotFoundError(f"no route POST {request.url.path}")
        raw = await read(request)
        return await _route(request.path_params["name"], kind, parse_body(raw), raw, request)

    async def _route(name: str, kind: str, body: dict[str, Any], raw: bytes, request: Request) -> Response:
        started = time.monotonic()
        rid = request_id(request)
        headers = {**dict(request.headers), "x-request-id": rid}
        try:
            work = proxy(gw, client, name, f"/v1/{kind}", body, headers, raw)
            response = await unless_gone(work, disconnect_watcher(request), "the client closed the connection")
        except InvalidNameError:
            gw.observe(None, False, 404, time.monotonic() - started)
            raise ModelNotFoundError(f"the function {name!r} does not exist", param="model") from None
        except Exception as exc:
            gw.observe(name, isinstance(exc, ColdStartTimeoutError), status_of(exc), time.monotonic() - started)
            if isinstance(exc, ClientDisconnectedError):
                log.info("request %s for %s: the client left before its answer began", rid, name)
            raise
        response.headers["x-request-id"] = rid
        cold = response.headers.get("x-kold-cold") == "1"
        if isinstance(response, StreamingResponse):
            response.body_iterator = _observed(response.body_iterator, name, cold, response.status_code, started)
        else:
            gw.observe(name, cold, response.status_code, time.monotonic() - started)
        return response

    async def _observed(
        body: AsyncIterable[Any], name: str, cold: bool, status: int, started: float
    ) -> AsyncIterator[Any]:
        """A streamed answer, observed when its last byte was sent (or the client left)."""
        try:
            async for chunk in body:
                yield chunk
        finally:
            gw.observe(name, cold, status, time.monotonic() - started)

    async def _model(name: str) -> dict[str, Any]:
        try:
            fn = await asyncio.to_thread(registry.get_function, name)
        except InvalidNameError:
            fn = None
        if fn is None:
            raise ModelNotFoundError(f"the model {name!r} does not exist", param="model")
        rev = await gw.revision(fn.revisions[0])
        created = int(rev.created_at) if rev is not None else 0
        return {"id": fn.name, "object": "model", "created": created, "owned_by": "kold"}

    async def models(request: Request) -> Response:
        """GET /v1/models: every function; under a function's base URL, that function alone."""
        if "name" in request.path_params:
            data = [await _model(request.path_params["name"])]
        else:
            fns = await asyncio.to_thread(registry.list_functions)
            data = [await _model(f.name) for f in fns]
        return JSONResponse({"object": "list", "data": data})

    async def model(request: Request) -> Response:
        name = request.path_params["model"]
        if "name" in request.path_params and name != request.path_params["name"]:
            raise ModelNotFoundError(f"the model {name!r} is not served at this URL", param="model")
        return JSONResponse(await _model(name))

    async def healthz(request: Request) -> Response:
        """Liveness: 200 while the process serves; "degraded" while Redis is unreachable (warm
        functions and recently verified keys still work, nothing new can be deployed or looked up)."""
        registry_state = "unreachable" if gw.registry_down else "ok"
        return JSONResponse({"status": "degraded" if gw.registry_down else "ok", "registry": registry_state})

    async def readyz(request: Request) -> Response:
        """Readiness: 200 when the gateway can take any request, 503 while Redis is unreachable."""
        if gw.registry_down:
            raise RegistryUnavailableError("the function registry (Redis) is unreachable")
        return JSONResponse({"status": "ready", "registry": "ok"})

    async def metrics(request: Request) -> Response:
        gw.refresh_metrics()
        return Response(generate_latest(gw.metrics), media_type=CONTENT_TYPE_LATEST)

    async def not_found(request: Request, exc: Exception) -> Response:
        if isinstance(exc, HTTPException) and exc.status_code == 405:
            return error_response(MethodNotAllowedError(f"{request.method} is not allowed on {request.url.path}"))
        return error_response(RouteNotFoundError(f"no route {request.method} {request.url.path}"))

    routes = [
        Route("/v1/chat/completions", endpoint(by_model), methods=["POST"]),
        Route("/v1/completions", endpoint(by_model), methods=["POST"]),
        Route("/v1/embeddings", endpoint(by_model), methods=["POST"]),
        Route("/v1/models", endpoint(models), methods=["GET"]),
        Route("/v1/models/{model}", endpoint(model), methods=["GET"]),
        # a function's own base URL (what `kold deploy` prints): .../v1/functions/NAME/v1
        Route("/v1/functions/{name}/v1/models", endpoint(models), methods=["GET"]),
        Route("/v1/functions/{name}/v1/models/{model}", endpoint(model), methods=["GET"]),
        Route("/v1/functions/{name}/v1/{rest:path}", endpoint(by_path), methods=["POST"]),
        Route("/healthz", endpoint(healthz, scope=None), methods=["GET"]),
        Route("/readyz", endpoint(readyz, scope=None), methods=["GET"]),
        # open for scraping unless `metrics_need_key` (then any valid key, invoke scope included)
        Route("/metrics", endpoint(metrics, scope="invoke" if metrics_need_key else None), methods=["GET"]),
        *admin.routes(endpoint),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await gw.start()
        warming = asyncio.create_task(pool.warm_template()) if warm_template else None
        try:
            yield
        finally:
            if warming is not None:
                warming.cancel()
                await asyncio.gather(warming, return_exceptions=True)
            await gw.close()
            if upstream is None:
                await client.aclose()

    app = Starlette(routes=routes, exception_handlers={HTTPException: not_found}, lifespan=lifespan)
    app.state.gateway = gw
    return app
