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

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.exceptions import RedisError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from kold.gateway.activator import Gateway, RegistryUnavailableError
from kold.gateway.names import InvalidNameError
from kold.gateway.pool import InstancePool
from kold.gateway.registry import Registry, RuntimeSpec, ScalingSpec
from kold.gateway.router import parse_body, proxy
from kold.gateway.upstream import UpstreamClient
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

# How long the answers "are there keys" and "this key is valid" are reused before Redis is asked
# again: a revoked key stops working within this time.
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


def server_config(app: Starlette, host: str, port: int) -> uvicorn.Config:
    """How the gateway is served (`kold up` and bench/gateway.py alike).

    httptools and uvloop when installed (they are dependencies: ~0.5 ms less per request than h11 on
    asyncio); no access log (the gateway's metrics count requests; a log line per request costs CPU
    on the data path); and no X-Forwarded-* handling: the gateway is the edge of the local platform,
    and trusting those headers from any client would let it spoof its address.
    """
    return uvicorn.Config(
        app, host=host, port=port, log_level="warning", access_log=False, proxy_headers=False, server_header=False
    )


def build_app(
    registry: Registry,
    pool: InstancePool,
    *,
    require_keys: bool,
    upstream: UpstreamClient | None = None,
    gateway: Gateway | None = None,
    warm_template: bool = False,
) -> Starlette:
    """The gateway app; its lifespan runs the gateway's background tasks and stops instances at the end.

    `warm_template`: start the pool's fork template in the background at once, so that the first
    cold start already forks (otherwise the first instance waits for the template's imports).
    """
    gw = gateway if gateway is not None else Gateway(registry, pool)
    client = upstream if upstream is not None else UpstreamClient()
    keys_cache: list[float | bool] = [0.0, False]  # expiry, has_keys (0.0: never read)
    # keys that verified recently (by sha256): while Redis is briefly unreachable they keep working
    verified: dict[str, float] = {}
    # While Redis is unreachable (gw.registry_down, until the gateway's probe reaches it again), key
    # checks do not wait for it: they decide from `verified` and the cached has_keys at once.

    def _verified_recently(digest: str) -> None:
        if time.monotonic() - verified.get(digest, float("-inf")) > VERIFIED_GRACE_S:
            raise RegistryUnavailableError("the key registry (Redis) is unreachable") from None

    async def check_auth(request: Request) -> None:
        if not require_keys:
            if time.monotonic() >= float(keys_cache[0]) and not (gw.registry_down and keys_cache[0]):
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
        if time.monotonic() - verified.get(digest, float("-inf")) < KEYS_CACHE_S:
            return  # checked against Redis moments ago: a revocation takes effect within KEYS_CACHE_S
        if gw.registry_down:
            _verified_recently(digest)
            return
        try:
            ok = await asyncio.to_thread(registry.verify_key, secret.strip())
        except RedisError as exc:
            gw.redis_unreachable(exc)
            _verified_recently(digest)
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
        raw = await request.body()
        body = parse_body(raw)
        name = body.get("model")
        if not isinstance(name, str) or not name:
            raise InvalidRequestError("'model' (the function name) is required", param="model")
        kind = request.url.path.removeprefix("/v1/")
        return await _route(name, kind, body, raw, request)

    async def by_path(request: Request) -> Response:
        name = request.path_params["name"]
        kind = request.path_params["rest"]
        if kind not in _ROUTED_PATHS:
            raise RouteNotFoundError(f"no route POST {request.url.path}")
        raw = await request.body()
        return await _route(name, kind, parse_body(raw), raw, request)

    async def _route(name: str, kind: str, body: dict[str, Any], raw: bytes, request: Request) -> Response:
        try:
            return await proxy(gw, client, name, f"/v1/{kind}", body, dict(request.headers), raw)
        except InvalidNameError:
            raise ModelNotFoundError(f"the function {name!r} does not exist", param="model") from None

    async def models(request: Request) -> Response:
        fns = await asyncio.to_thread(registry.list_functions)
        data = [{"id": f.name, "object": "model", "created": 0, "owned_by": "kold"} for f in fns]
        return JSONResponse({"object": "list", "data": data})

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def metrics(request: Request) -> Response:
        gw.refresh_instance_gauge()
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

    # -- logs: a snapshot as JSON, or (follow=1) a text stream like `tail -F` --

    log_poll_s = 0.2  # how often a follow stream looks for new output (and new instances)
    log_read_max = 1 << 20  # bytes read per instance per look, so a flood cannot stall the loop
    log_tail_window = 8 << 20  # the last lines are searched in at most this much of the file's end

    def _read_tail(path: str, lines: int) -> tuple[bytes, int]:
        """The file's last `lines` lines and the offset of its end (where following starts)."""
        try:
            with open(path, "rb") as f:
                end = f.seek(0, 2)
                start = max(0, end - log_tail_window)
                f.seek(start)
                data = f.read(end - start)
        except FileNotFoundError:
            return b"", 0
        if start and b"\n" in data:
            data = data[data.index(b"\n") + 1 :]  # a cut first line is not a line
        kept = data.splitlines(keepends=True)[-lines:] if lines > 0 else []
        return b"".join(kept), end

    def _read_from(path: str, offset: int) -> tuple[bytes, int]:
        """What was appended since `offset`; a file now shorter (truncated, replaced) is read from its start."""
        try:
            with open(path, "rb") as f:
                if f.seek(0, 2) < offset:
                    offset = 0
                f.seek(offset)
                data = f.read(log_read_max)
        except FileNotFoundError:
            return b"", offset
        return data, offset + len(data)

    async def _follow_logs(name: str, rev_ids: frozenset[str], tail: int, stopping: Any) -> AsyncIterator[bytes]:
        """The function's instances' last `tail` lines, then their new output as it is appended.

        Instances started later (also of revisions deployed after the stream began: revision ids are
        `<name>-<n>`) are picked up from the pool, never from Redis, so following survives a Redis
        outage. Whole lines only; once more than one instance has shown up, each line is prefixed with
        `[instance id] `. Ends when the client disconnects (Starlette cancels this generator) or
        when the server shuts down (`app.state.log_streams_stopping`, set by `kold up`): an open
        stream must not hold up a graceful shutdown.
        """
        skip = {i.id for i in pool.instances() if i.revision_id not in rev_ids}  # e.g. a former same-named function
        offsets: dict[str, int] = {}  # instance id -> how far its log was sent
        pending: dict[str, bytes] = {}  # instance id -> a line read without its end yet

        def read(jobs: list[tuple[str, str, int | None]]) -> list[tuple[str, bytes, int]]:
            """(instance id, log path, offset or None: from the last lines) -> (id, bytes, new offset)."""
            return [(i, *(_read_tail(path, tail) if at is None else _read_from(path, at))) for i, path, at in jobs]

        first = True
        while stopping is None or not stopping.is_set():
            jobs: list[tuple[str, str, int | None]] = []
            alive: dict[str, bool] = {}
            for inst in pool.instances():  # on the event loop: the pool's dict is not thread-safe
                if inst.id in skip:
                    continue
                if inst.revision_id not in rev_ids and inst.revision_id.rpartition("-")[0] != name:
                    skip.add(inst.id)
                    continue
                alive[inst.id] = inst.alive  # taken before reading: what it wrote before it stopped is read
                jobs.append((inst.id, str(inst.log_path), offsets.get(inst.id, None if first else 0)))
            first = False
            results = await asyncio.to_thread(read, jobs) if jobs else []
            for inst_id, data, end in results:
                offsets[inst_id] = end
                if not data and not alive[inst_id]:
                    skip.add(inst_id)  # stopped and read to the end: never written again
            prefix_lines = len(offsets) > 1
            chunks: list[bytes] = []
            for inst_id, data, _ in results:
                buf = pending.pop(inst_id, b"") + data
                cut = buf.rfind(b"\n") + 1
                if not cut and len(buf) > log_read_max:
                    cut = len(buf)  # a line without end: passed on as it is rather than held forever
                if cut < len(buf):
                    pending[inst_id] = buf[cut:]
                if cut:
                    prefix = f"[{inst_id}] ".encode() if prefix_lines else b""
                    lines = buf[:cut].split(b"\n")  # the last is b"" unless the line had no end
                    chunks += [prefix + line + b"\n" for line in lines[:-1]]
                    chunks += [prefix + lines[-1]] if lines[-1] else []
            if chunks:
                yield b"".join(chunks)
            await asyncio.sleep(log_poll_s)

    async def logs(request: Request) -> Response:
        """`?tail=N`: each instance's last N lines as JSON; `&follow=1`: a text/plain stream that goes on."""
        try:
            fn = await _function(request.path_params["name"])
        except RedisError as exc:
            gw.redis_unreachable(exc)
            raise RegistryUnavailableError("the function registry (Redis) is unreachable") from None
        try:
            tail = int(request.query_params.get("tail", "100"))
        except ValueError:
            raise InvalidRequestError("tail must be an integer", param="tail") from None
        if tail < 0:
            raise InvalidRequestError("tail must be >= 0", param="tail")
        follow = request.query_params.get("follow", "0").lower()
        if follow not in ("0", "1", "false", "true"):
            raise InvalidRequestError("follow must be 0 or 1", param="follow")
        if follow in ("1", "true"):
            stopping = getattr(request.app.state, "log_streams_stopping", None)
            return StreamingResponse(
                _follow_logs(fn.name, frozenset(fn.revisions), tail, stopping),
                media_type="text/plain; charset=utf-8",
                headers={"Cache-Control": "no-cache"},
            )
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
        verified.clear()  # by digest, not key id: forget them all, so the revoked one stops at once here
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
