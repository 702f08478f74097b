"""The gateway's HTTP app: the OpenAI data path, /v1/models, health, metrics and the admin API."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict
from typing import Any

import httpx
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.exceptions import RedisError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from kold.gateway.activator import Gateway, RegistryUnavailableError
from kold.gateway.names import InvalidNameError
from kold.gateway.pool import InstancePool
from kold.gateway.registry import Registry, RuntimeSpec, ScalingSpec
from kold.gateway.router import parse_body, proxy
from kold.runtime.protocol import (
    APIError,
    InvalidRequestError,
    MethodNotAllowedError,
    ModelNotFoundError,
    RouteNotFoundError,
    UnavailableError,
    error_body,
)

log = logging.getLogger("kold.gateway.app")

KEYS_CACHE_S = 1.5
# How long after its last successful check a key keeps working while Redis is unreachable. Revoking
# a key takes effect at the next check that reaches Redis.
VERIFIED_GRACE_S = 300.0
_ROUTED_PATHS = {"chat/completions", "completions"}

Handler = Callable[[Request], Awaitable[Response]]


class AuthError(APIError):
    code = "invalid_api_key"

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def error_response(exc: BaseException) -> JSONResponse:
    if isinstance(exc, AuthError):
        body = {"error": {"message": exc.message, "type": "authentication_error", "param": None, "code": exc.code}}
        return JSONResponse(body, status_code=exc.status, headers={"WWW-Authenticate": "Bearer"})
    if isinstance(exc, InvalidNameError | ValueError) and not isinstance(exc, json.JSONDecodeError | UnicodeError):
        exc = InvalidRequestError(str(exc))
    status, body_model = error_body(exc)
    headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, UnavailableError) else None
    if status >= 500 and not isinstance(exc, APIError):
        log.error("unhandled error", exc_info=exc)
    return JSONResponse(body_model.model_dump(), status_code=status, headers=headers)


def build_app(
    registry: Registry,
    pool: InstancePool,
    *,
    require_keys: bool,
    http: httpx.AsyncClient | None = None,
    gateway: Gateway | None = None,
) -> Starlette:
    """The gateway app; its lifespan runs the gateway's background tasks and stops instances at the end."""
    gw = gateway if gateway is not None else Gateway(registry, pool)
    client = http if http is not None else httpx.AsyncClient(timeout=httpx.Timeout(None, connect=5.0), trust_env=False)
    keys_cache: list[float | bool] = [0.0, False]  # expiry, has_keys (0.0: never read)
    # keys that verified recently (by sha256): while Redis is briefly unreachable they keep working
    verified: dict[str, float] = {}

    async def check_auth(request: Request) -> None:
        if not require_keys:
            if time.monotonic() >= float(keys_cache[0]):
                try:
                    keys_cache[1] = await asyncio.to_thread(registry.has_keys)
                    keys_cache[0] = time.monotonic() + KEYS_CACHE_S
                except RedisError as exc:
                    gw.redis_unreachable(exc)
                    if not keys_cache[0]:
                        raise RegistryUnavailableError("the key registry (Redis) is unreachable") from None
            if not keys_cache[1]:
                return
        header = request.headers.get("authorization", "")
        scheme, _, secret = header.partition(" ")
        if not header or not hmac.compare_digest(scheme.lower(), "bearer") or not secret.strip():
            raise AuthError("missing API key: send 'Authorization: Bearer <key>'", 401)
        digest = hashlib.sha256(secret.strip().encode()).hexdigest()
        try:
            ok = await asyncio.to_thread(registry.verify_key, secret.strip())
        except RedisError as exc:
            gw.redis_unreachable(exc)
            if time.monotonic() - verified.get(digest, float("-inf")) > VERIFIED_GRACE_S:
                raise RegistryUnavailableError("the key registry (Redis) is unreachable") from None
            return
        if not ok:
            verified.pop(digest, None)
            raise AuthError("invalid API key", 403)
        verified[digest] = time.monotonic()

    def endpoint(fn: Handler, *, auth: bool = True) -> Handler:
        async def wrapped(request: Request) -> Response:
            try:
                if auth:
                    await check_auth(request)
                return await fn(request)
            except Exception as exc:
                return error_response(exc)

        return wrapped

    async def read_json(request: Request) -> dict[str, Any]:
        raw = await request.body()
        return parse_body(raw) if raw else {}

    # -- data path --

    async def by_model(request: Request) -> Response:
        body = parse_body(await request.body())
        name = body.get("model")
        if not isinstance(name, str) or not name:
            raise InvalidRequestError("'model' (the function name) is required", param="model")
        kind = request.url.path.removeprefix("/v1/")
        return await _route(name, kind, body, request)

    async def by_path(request: Request) -> Response:
        name = request.path_params["name"]
        kind = request.path_params["rest"]
        if kind not in _ROUTED_PATHS:
            raise RouteNotFoundError(f"no route POST {request.url.path}")
        body = parse_body(await request.body())
        return await _route(name, kind, body, request)

    async def _route(name: str, kind: str, body: dict[str, Any], request: Request) -> Response:
        try:
            return await proxy(gw, client, name, f"/v1/{kind}", body, dict(request.headers))
        except InvalidNameError:
            raise ModelNotFoundError(f"the function {name!r} does not exist", param="model") from None

    async def models(request: Request) -> Response:
        fns = await asyncio.to_thread(registry.list_functions)
        data = [{"id": f.name, "object": "model", "created": 0, "owned_by": "kold"} for f in fns]
        return JSONResponse({"object": "list", "data": data})

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def metrics(request: Request) -> Response:
        return Response(generate_latest(gw.metrics), media_type=CONTENT_TYPE_LATEST)

    # -- admin --

    async def create_revision(request: Request) -> Response:
        name = request.path_params["name"]
        body = await read_json(request)
        scaling = ScalingSpec(**(body.get("scaling") or {}))
        runtime = RuntimeSpec(**(body.get("runtime") or {}))
        rev = await asyncio.to_thread(
            registry.create_revision, name, body.get("snapshot_uri", ""), scaling=scaling, runtime=runtime
        )
        gw._revisions[rev.revision_id] = rev
        rollout = asyncio.create_task(_roll_out(rev.revision_id))
        if body.get("wait"):
            if not await rollout:
                raise UnavailableError(f"revision {rev.revision_id} did not become ready (see the logs)")
            return JSONResponse({"revision": rev.revision_id, "serving": True}, status_code=201)
        gw._starts.add(rollout)
        rollout.add_done_callback(gw._starts.discard)
        return JSONResponse({"revision": rev.revision_id, "serving": False}, status_code=202)

    async def _roll_out(rev_id: str) -> bool:
        """Start an instance of the new revision; move traffic once one is READY."""
        rev = gw._revisions[rev_id]
        deadline = time.monotonic() + rev.scaling.request_timeout_s
        st = gw.state(rev.function)
        while time.monotonic() < deadline:
            if gw._ready(rev_id):
                await asyncio.to_thread(registry.set_traffic, rev.function, rev_id)
                gw.invalidate(rev.function)
                return True
            changed = st.changed
            gw.ensure_capacity(rev, extra=1)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), 1.0)
        return False

    def _instances(rev_ids: tuple[str, ...]) -> list[dict[str, Any]]:
        return [
            {
                "id": i.id,
                "revision": i.revision_id,
                "state": i.state.value,
                "in_flight": i.in_flight,
                "url": i.url,
                "started_at": i.started_at,
                "ready_at": i.ready_at,
                "cold_start": i.cold_start,
            }
            for r in rev_ids
            for i in pool.instances(r)
        ]

    async def list_functions(request: Request) -> Response:
        fns = await asyncio.to_thread(registry.list_functions)
        return JSONResponse(
            {
                "functions": [
                    {
                        "name": f.name,
                        "serving": f.serving_revision,
                        "latest": f.latest_revision,
                        "instances": sum(1 for i in _instances(f.revisions) if i["state"] in ("starting", "ready")),
                    }
                    for f in fns
                ]
            }
        )

    async def _function(name: str) -> Any:
        fn = await asyncio.to_thread(registry.get_function, name)
        if fn is None:
            raise ModelNotFoundError(f"the function {name!r} does not exist")
        return fn

    async def describe(request: Request) -> Response:
        fn = await _function(request.path_params["name"])
        revisions = []
        for rev_id in fn.revisions:
            rev = await gw.revision(rev_id)
            if rev is not None:
                revisions.append(
                    {
                        "id": rev_id,
                        "snapshot_uri": rev.snapshot_uri,
                        "created_at": rev.created_at,
                        "scaling": asdict(rev.scaling),
                        "runtime": asdict(rev.runtime),
                    }
                )
        return JSONResponse(
            {
                "name": fn.name,
                "serving": fn.serving_revision,
                "revisions": revisions,
                "instances": _instances(fn.revisions),
            }
        )

    async def delete(request: Request) -> Response:
        fn = await _function(request.path_params["name"])
        await gw.stop_function(fn.name, list(fn.revisions))
        await asyncio.to_thread(registry.delete_function, fn.name)
        gw.invalidate(fn.name)
        return JSONResponse({"deleted": fn.name})

    async def rollback(request: Request) -> Response:
        name = request.path_params["name"]
        body = await read_json(request)
        target = body.get("revision")
        if target is not None and not isinstance(target, str):
            raise InvalidRequestError("'revision' must be a revision id", param="revision")
        rev_id = await asyncio.to_thread(registry.rollback, name, target)
        gw.invalidate(name)
        return JSONResponse({"serving": rev_id})

    async def prewarm(request: Request) -> Response:
        """Start instances ahead of demand (what the pre-warm controller does on its own)."""
        fn = await _function(request.path_params["name"])
        body = await read_json(request)
        instances = body.get("instances", 1)
        if not isinstance(instances, int) or isinstance(instances, bool) or instances < 0:
            raise InvalidRequestError("'instances' must be an integer >= 0", param="instances")
        started = await gw.prewarm(fn.name, instances)
        return JSONResponse({"function": fn.name, "started": started}, status_code=202)

    async def logs(request: Request) -> Response:
        fn = await _function(request.path_params["name"])
        try:
            tail = int(request.query_params.get("tail", "100"))
        except ValueError:
            raise InvalidRequestError("tail must be an integer", param="tail") from None
        out = [
            {"id": i.id, "state": i.state.value, "log": pool.read_log(i, tail)}
            for r in fn.revisions
            for i in pool.instances(r)
        ]
        return JSONResponse({"instances": out})

    async def create_key(request: Request) -> Response:
        body = await read_json(request)
        key = await asyncio.to_thread(registry.create_key, str(body.get("label", "")))
        keys_cache[0] = 0.0
        return JSONResponse({"key_id": key.key_id, "secret": key.secret}, status_code=201)

    async def list_keys(request: Request) -> Response:
        keys = await asyncio.to_thread(registry.list_keys)
        return JSONResponse({"keys": [asdict(k) for k in keys]})

    async def revoke_key(request: Request) -> Response:
        ok = await asyncio.to_thread(registry.revoke_key, request.path_params["key_id"])
        keys_cache[0] = 0.0
        if not ok:
            raise RouteNotFoundError(f"no key {request.path_params['key_id']!r}")
        return JSONResponse({"revoked": request.path_params["key_id"]})

    async def not_found(request: Request, exc: Exception) -> Response:
        if isinstance(exc, HTTPException) and exc.status_code == 405:
            return error_response(MethodNotAllowedError(f"{request.method} is not allowed on {request.url.path}"))
        return error_response(RouteNotFoundError(f"no route {request.method} {request.url.path}"))

    routes = [
        Route("/v1/chat/completions", endpoint(by_model), methods=["POST"]),
        Route("/v1/completions", endpoint(by_model), methods=["POST"]),
        Route("/v1/functions/{name}/v1/{rest:path}", endpoint(by_path), methods=["POST"]),
        Route("/v1/models", endpoint(models), methods=["GET"]),
        Route("/healthz", endpoint(healthz, auth=False), methods=["GET"]),
        Route("/metrics", endpoint(metrics, auth=False), methods=["GET"]),
        Route("/admin/functions", endpoint(list_functions), methods=["GET"]),
        Route("/admin/functions/{name}", endpoint(describe), methods=["GET"]),
        Route("/admin/functions/{name}", endpoint(delete), methods=["DELETE"]),
        Route("/admin/functions/{name}/revisions", endpoint(create_revision), methods=["POST"]),
        Route("/admin/functions/{name}/rollback", endpoint(rollback), methods=["POST"]),
        Route("/admin/functions/{name}/prewarm", endpoint(prewarm), methods=["POST"]),
        Route("/admin/functions/{name}/logs", endpoint(logs), methods=["GET"]),
        Route("/admin/keys", endpoint(create_key), methods=["POST"]),
        Route("/admin/keys", endpoint(list_keys), methods=["GET"]),
        Route("/admin/keys/{key_id}", endpoint(revoke_key), methods=["DELETE"]),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await gw.start()
        try:
            yield
        finally:
            await gw.close()
            if http is None:
                await client.aclose()

    app = Starlette(routes=routes, exception_handlers={HTTPException: not_found}, lifespan=lifespan)
    app.state.gateway = gw
    return app
