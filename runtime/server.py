"""The HTTP server of one instance: routes -> service -> engine, plus the lifecycle around them.

`serve(options, loader)` listens at once, then loads the model (restore + tokenizer + engine) in a
background thread; `/healthz` answers from the first moment, `/readyz` once the weights are in
place (its answer then carries the cold-start breakdown, the same object as the `startup` log
line), and inference requests that arrive before that wait (bounded) instead of failing.

Every response carries an `x-request-id` header: the one the request came with (the gateway forwards
its own), or a new one. The request's log records carry it (`request_id`), and so does its
`request` event line.

SIGTERM (or SIGINT) drains: new inference requests get 503 (Connection: close), in-flight ones run
to the end (at most `drain_timeout_s`), then uvicorn closes the listener and the process exits 0. A
second signal stops at once.

Weights restored from a node cache tier unchecked (the fast path) are checked once serving begins,
in a low-priority thread (`Loaded.verifier`, kold.snapshot.verify). If they were corrupt, the
instance stops serving at once: the engine is stopped (requests in flight and queued get a 503
`tier_corrupted`, as do new ones; a started stream ends with an error event), the tier entry is
quarantined, the cause goes to the termination log, and the process exits 1 so the platform starts
a fresh instance, which reads the store.

With demand reporting (runtime/demand.py, on Knative), the drain gate notes each inference request's
arrival and the service hands its end to the reporter, which queues its record off the request path;
the drain's last step flushes the queue, bounded.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import signal
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING, Any, TypeVar

import uvicorn
from prometheus_client import Gauge
from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kold.runtime.backend import Backend, Loaded, Loader
from kold.runtime.embeddings import EmbeddingRequest, Embeddings
from kold.runtime.httpserver import (
    DEFAULT_BODY_TIMEOUT_S,
    DEFAULT_HEADER_TIMEOUT_S,
    DEFAULT_MAX_BODY_BYTES,
    Disconnected,
    disconnect_watcher,
    http_protocol,
    read_body,
)
from kold.runtime.lifecycle import Lifecycle, State
from kold.runtime.metrics import CONTENT_TYPE, RuntimeMetrics
from kold.runtime.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DrainingError,
    InstanceTokenError,
    MethodNotAllowedError,
    RequestTimeoutError,
    RouteNotFoundError,
    UnavailableError,
    error_body,
    parse_json_object,
)
from kold.runtime.service import Service

if TYPE_CHECKING:
    from kold.runtime.demand import Call, DemandReporter, DemandReporting
    from kold.snapshot.verify import TierVerdict, TierVerifier

log = logging.getLogger("kold.runtime")
events = logging.getLogger("kold.runtime.events")  # one JSON object a line: startup, first_token, request, drain

INFERENCE_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/embeddings")
TIER_CORRUPTED = "tier_corrupted"  # the code of a cache tier found corrupt after serving began

R = TypeVar("R", bound=BaseModel)


@dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8080
    model_names: tuple[str, ...] = ("model",)  # the first is the served name; the others are aliases
    max_waiting: int = 256
    queue_timeout_s: float = 300.0
    drain_timeout_s: float = 30.0
    engine_stop_timeout_s: float = 5.0
    # slow and oversized clients (runtime/httpserver.py): 413 past the body limit; a request head must
    # be in within header_timeout_s, its body within body_timeout_s (408), or the connection is closed
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S
    # a failed load writes {"code", "error"} here before the exit, so whoever restarts the instance
    # knows why without reading its log (Kubernetes reads /dev/termination-log the same way)
    termination_log: str | None = None
    # when set, the /v1/ routes answer only requests that carry it (x-kold-instance-token): the gateway's
    # secret for its instances (KOLD_INSTANCE_TOKEN, set by the local platform's pool)
    instance_token: str | None = None


def error_response(exc: BaseException, *, close: bool = False) -> JSONResponse:
    status, body = error_body(exc)
    headers = {}
    if isinstance(exc, UnavailableError):
        headers["Retry-After"] = str(exc.retry_after)
    if close:
        headers["Connection"] = "close"
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def load_failure_code(exc: BaseException) -> str:
    """A machine-readable name for why the weights could not be loaded (the platform tells clients)."""
    from kold.snapshot import errors

    codes: tuple[tuple[type[BaseException], str], ...] = (
        (errors.ChunkCorruptedError, "snapshot_corrupted"),
        (errors.SnapshotNotFoundError, "snapshot_not_found"),
        (errors.StoreAuthError, "store_auth_failed"),
        (errors.StoreError, "store_unavailable"),
        (errors.ManifestError, "snapshot_invalid"),
        (errors.DeviceUnavailableError, "device_unavailable"),
        (MemoryError, "out_of_memory"),
    )
    return next((code for cls, code in codes if isinstance(exc, cls)), "load_failed")


class Runtime:
    """The app and its lifecycle: readiness, the background load, the drain."""

    def __init__(
        self,
        options: ServeOptions,
        loader: Loader,
        *,
        process_start: float | None = None,
        demand: DemandReporting | None = None,
    ) -> None:
        """`demand`: report this instance's requests and start to Redis (runtime/demand.py); None: not."""
        self.options = options
        self.loader = loader
        self.lifecycle = Lifecycle(
            max_waiting=options.max_waiting, queue_timeout=options.queue_timeout_s, process_start=process_start
        )
        self.metrics = RuntimeMetrics(
            state=lambda: self.lifecycle.state.value,
            queue_depth=lambda: self.service.pending(),  # noqa: PLW0108 (service is made below)
            in_flight=lambda: self.lifecycle.in_flight,
            engine=lambda: self.service.engine_stats(),  # noqa: PLW0108
        )
        self.demand: DemandReporter | None = None
        if demand is not None:
            from kold.runtime.demand import DemandReporter

            self.demand = DemandReporter(demand, self.lifecycle, self.metrics.registry)
        self.service = Service(
            self.lifecycle,
            self.metrics,
            model_names=options.model_names,
            on_first_token=self._log_first_token,
            demand=self.demand,
        )
        self.embeddings = Embeddings(self.service)  # /v1/embeddings (runtime/embeddings.py)
        self.startup: dict[str, Any] | None = None  # the `startup` event, once ready (also in /readyz)
        # whether the weights served were checked against their checksums (in /readyz): state is
        # verified (on the way in, or after), pending (being checked), corrupt, or unverified (a tier
        # trusted with the check off)
        self.tier_verification: dict[str, Any] | None = None
        self._tier_verified = Gauge(
            "kold_tier_verified",
            "1 once the weights served have been checked against their checksums; 0 while a cache tier's are "
            "being checked (or never are), or were found corrupt",
            registry=self.metrics.registry,
        )
        self._stop_verify = threading.Event()
        self.exit_code = 0
        self.server: uvicorn.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._cancel_load = threading.Event()
        self._drain_task: asyncio.Task[None] | None = None
        self.app = self._build_app()

    # -- HTTP ---------------------------------------------------------------------------------------

    def _build_app(self) -> ASGIApp:
        # Starlette, FastAPI's core, without FastAPI: its import alone is ~130 ms of the time before
        # the socket listens, and we use none of what it adds (requests are parsed by protocol.py).
        service, lifecycle = self.service, self.lifecycle

        async def healthz(request: Request) -> Response:
            return JSONResponse({"status": "ok", "state": lifecycle.state.value})

        async def readyz(request: Request) -> Response:
            if lifecycle.ready:
                # the breakdown rides along: a router that waits for readiness has it without reading logs
                return JSONResponse(
                    {
                        "status": "ready",
                        "state": lifecycle.state.value,
                        "tier_verification": self.tier_verification,
                        "cold_start": self.startup,
                    }
                )
            body: dict[str, Any] = {"status": "not ready", "state": lifecycle.state.value, "waiting": lifecycle.waiting}
            if self.tier_verification is not None:
                body["tier_verification"] = self.tier_verification
            if lifecycle.error:
                body["error"] = lifecycle.error
                body["code"] = lifecycle.error_code or "load_failed"
            return JSONResponse(body, status_code=503)

        async def metrics(request: Request) -> Response:
            return Response(self.metrics.render(), media_type=CONTENT_TYPE)

        async def models(request: Request) -> Response:
            return JSONResponse(service.models().model_dump())

        async def completions(request: Request) -> Response:
            return await self._call(request, CompletionRequest, service.completions, "completions")

        async def chat(request: Request) -> Response:
            return await self._call(request, ChatCompletionRequest, service.chat, "chat")

        async def embeddings(request: Request) -> Response:
            return await self._call(request, EmbeddingRequest, self.embeddings.create, "embeddings")

        async def http_error(request: Request, exc: Exception) -> Response:
            assert isinstance(exc, HTTPException)
            if exc.status_code == 405:
                return error_response(MethodNotAllowedError(f"{request.method} is not allowed on {request.url.path}"))
            if exc.status_code == 404:
                return error_response(RouteNotFoundError(f"no route {request.method} {request.url.path}"))
            return error_response(APIError(str(exc.detail)))

        routes = [
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/chat/completions", chat, methods=["POST"]),
            Route("/v1/embeddings", embeddings, methods=["POST"]),
        ]
        app = Starlette(routes=routes, exception_handlers={HTTPException: http_error})
        gated: ASGIApp = _DrainGate(app, lifecycle, self.demand)
        if self.options.instance_token:
            gated = _InstanceToken(gated, self.options.instance_token)
        return _RequestId(gated)

    async def _call(
        self,
        request: Request,
        model: type[R],
        handler: Callable[[R, Disconnected, str, Call | None], Awaitable[Response]],
        endpoint: str,
    ) -> Response:
        """Parse, validate, hand to the service; every exception becomes an OpenAI error response."""
        request_id = str(request.scope.get(REQUEST_ID_SCOPE_KEY, ""))
        call: Call | None = request.scope.get(DEMAND_SCOPE_KEY)
        try:
            raw = await read_body(request, max_bytes=self.options.max_body_bytes, timeout_s=self.options.body_timeout_s)
            parsed = model.model_validate(parse_json_object(raw))
            return await handler(parsed, disconnect_watcher(request), request_id, call)
        except Exception as raised:
            exc = self._as_failure(raised)
            status, _ = error_body(exc)
            if status >= 500 and not isinstance(exc, APIError):
                log.exception("%s request %s failed", endpoint, request_id, extra={"request_id": request_id})
            self.service.finished(endpoint, str(status), request_id, call=call, error=exc)
            # a body that never came: the connection's state is unknown, so it ends with this answer
            return error_response(exc, close=isinstance(exc, RequestTimeoutError))

    def _as_failure(self, exc: Exception) -> Exception:
        """A request the instance could not finish because its weights were found corrupt (its
        generation was cancelled with the engine) reports that cause, not a plain shutdown."""
        if isinstance(exc, UnavailableError) and self.lifecycle.error_code == TIER_CORRUPTED:
            return DrainingError(f"the instance stopped serving: {self.lifecycle.error}", code=TIER_CORRUPTED)
        return exc

    # -- the background load ------------------------------------------------------------------------

    def on_listening(self, loop: asyncio.AbstractEventLoop, address: str) -> None:
        self._loop = loop
        self.lifecycle.cold_start.listening = time.time()
        log.info("kold runtime listening on %s", address)
        if self.demand is not None:
            self.demand.start()
        self.lifecycle.transition(State.RESTORING)
        threading.Thread(target=self._load, name="kold-load", daemon=True).start()

    def _load(self) -> None:
        assert self._loop is not None
        loop = self._loop
        try:
            loaded = self.loader(self._cancel_load, early=self._serve_early_from_loader)
        except BaseException as exc:
            _call_soon(loop, self._load_failed, exc)
            return
        if not _call_soon(loop, self._loaded, loaded):  # the server is gone already
            loaded.backend.stop(0.0)

    def _serve_early_from_loader(self, backend: Backend) -> None:
        """The loader's `early`: called from its thread with a model that computes behind the restore."""
        if self._loop is not None:
            _call_soon(self._loop, self._serve_early, backend)

    def _serve_early(self, backend: Backend) -> None:
        if self.lifecycle.state is not State.RESTORING:  # stopping: the loader's result is discarded too
            return
        self.service.backend = backend
        self.lifecycle.serve_early()
        log.info("serving behind the restore: requests run as the weights land")

    def _loaded(self, loaded: Loaded) -> None:
        if self.lifecycle.state is not State.RESTORING:  # a SIGTERM came first: nothing will use it
            threading.Thread(target=loaded.backend.stop, args=(0.0,), daemon=True).start()
            return
        cold = self.lifecycle.cold_start
        cold.restore = dict(loaded.restore)
        cold.phases.update(loaded.phases)
        self.service.backend = loaded.backend
        self.lifecycle.transition(State.READY)
        self.tier_verification = _tier_verification(loaded)
        self._tier_verified.set(1 if self.tier_verification["state"] == "verified" else 0)
        # set in the same event-loop step as READY: no /readyz answer says ready without it
        self.startup = {
            "event": "startup",
            "state": "ready",
            **cold.summary(),
            "tier_verification": dict(self.tier_verification),
        }
        self.metrics.record_cold_start(cold)
        events.info(json.dumps(self.startup, sort_keys=False))
        if self.demand is not None:
            self.demand.ready(self.startup)
        if loaded.verifier is not None:
            threading.Thread(
                target=self._verify_tier, args=(loaded.verifier,), name="kold-tier-verify", daemon=True
            ).start()

    def _verify_tier(self, verifier: TierVerifier) -> None:
        """The verifier thread: hash the served weights, then report on the event loop."""
        assert self._loop is not None
        try:
            verdict = verifier.run(self._stop_verify)
        except Exception as exc:  # a check that cannot run says nothing about the weights: keep serving
            log.warning("could not check the weights from the %s tier: %s", verifier.tier, exc, exc_info=exc)
            return
        _call_soon(self._loop, self._tier_checked, verdict)

    def _tier_checked(self, verdict: TierVerdict) -> None:
        state = verdict.state
        self.tier_verification = {"state": state, "tier": verdict.tier, "seconds": round(verdict.seconds, 3)}
        self._tier_verified.set(1 if state == "verified" else 0)
        line: dict[str, Any] = {"event": "tier_verify", "snapshot_id": verdict.snapshot_id, **self.tier_verification}
        line["checked_bytes"] = verdict.checked_bytes
        if verdict.mismatch is None:
            events.info(json.dumps(line))
            return
        message = str(verdict.mismatch)
        line.update(chunk=verdict.mismatch.chunk.index, quarantined=verdict.quarantined, error=message)
        self.tier_verification.update(chunk=verdict.mismatch.chunk.index, error=message)
        events.error(json.dumps(line))
        self._stop_serving_corrupt(message)

    def _stop_serving_corrupt(self, message: str) -> None:
        """The weights being served are wrong: refuse everything from now on, cancel what runs (the
        engine stops without a drain), and exit non-zero once the requests have been answered."""
        self._write_termination_log(TIER_CORRUPTED, message)
        lifecycle = self.lifecycle
        if lifecycle.state is State.READY:
            lifecycle.transition(State.FAILED, error=message, code=TIER_CORRUPTED)
        else:  # already draining (a SIGTERM came first): what is still in flight is answered with the cause
            lifecycle.error, lifecycle.error_code = message, TIER_CORRUPTED
        backend = self.service.backend
        if backend is not None:
            threading.Thread(target=backend.stop, args=(0.0,), name="kold-stop-corrupt", daemon=True).start()
        log.error("stopped serving: %s", message)
        self.exit_code = 1
        self.start_drain()

    def _load_failed(self, exc: BaseException) -> None:
        self.service.backend = None  # a model serving early is gone with the restore (the loader stopped it)
        if self.lifecycle.state is not State.RESTORING:
            log.info("model load stopped: %s", exc)
            return
        message = f"{type(exc).__name__}: {exc}"
        code = load_failure_code(exc)
        self._write_termination_log(code, message)
        self.lifecycle.transition(State.FAILED, error=message, code=code)
        events.error(
            json.dumps({"event": "startup", "state": "failed", "error": message, **self.lifecycle.cold_start.summary()})
        )
        from kold.snapshot.errors import SnapshotError

        # a snapshot error says all there is to say; anything else is a bug worth its traceback
        log.error("model load failed: %s", message, exc_info=None if isinstance(exc, SnapshotError) else exc)
        self.exit_code = 1
        self.start_drain()  # answer whoever waits, then exit non-zero: the platform restarts the instance

    def _write_termination_log(self, code: str, message: str) -> None:
        path = self.options.termination_log
        if not path:
            return
        try:
            with open(path, "w", encoding="utf-8") as f:
                json.dump({"code": code, "error": message}, f)
        except OSError as exc:
            log.warning("cannot write the termination log %s: %s", path, exc)

    def _log_first_token(self, request_id: str) -> None:
        cold = self.lifecycle.cold_start
        if cold.first_token is None:
            return
        events.info(
            json.dumps(
                {
                    "event": "first_token",
                    "request_id": request_id,
                    "first_token_ms": round((cold.first_token - cold.process_start) * 1000, 1),
                    "after_ready_ms": round((cold.first_token - cold.ready) * 1000, 1) if cold.ready else None,
                }
            ),
            extra={"request_id": request_id},
        )

    # -- the drain ----------------------------------------------------------------------------------

    def start_drain(self) -> None:
        if self._drain_task is None:
            self._drain_task = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        lifecycle = self.lifecycle
        if lifecycle.state is not State.DRAINING:
            lifecycle.transition(State.DRAINING)
        self._cancel_load.set()
        started = time.perf_counter()
        in_flight = lifecycle.in_flight
        idle = await lifecycle.wait_idle(self.options.drain_timeout_s)
        events.info(
            json.dumps(
                {
                    "event": "drain",
                    "in_flight_at_signal": in_flight,
                    "drained": idle,
                    "left": lifecycle.in_flight,
                    "seconds": round(time.perf_counter() - started, 3),
                }
            )
        )
        if self.demand is not None:  # the records of the requests just answered, bounded
            await self.demand.close()
        if self.server is not None:
            self.server.should_exit = True

    def on_signal(self, sig: int) -> None:
        log.info("signal %s: draining", signal.Signals(sig).name)
        self.start_drain()

    def finish(self) -> None:
        """After the server stopped: stop the engine (its own bounded drain) and mark the end."""
        self._stop_verify.set()
        backend = self.service.backend
        if backend is not None:
            backend.stop(self.options.engine_stop_timeout_s)
        if self.lifecycle.state is not State.STOPPED:
            if self.lifecycle.state is not State.DRAINING:
                self.lifecycle.transition(State.DRAINING)
            self.lifecycle.transition(State.STOPPED)


class _DrainGate:
    """Counts inference requests in flight, and refuses new ones once the instance drains; with demand
    reporting, notes each one's arrival (in the scope, for the route's record)."""

    def __init__(self, app: ASGIApp, lifecycle: Lifecycle, demand: DemandReporter | None = None) -> None:
        self.app = app
        self.lifecycle = lifecycle
        self.demand = demand

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in INFERENCE_PATHS:
            await self.app(scope, receive, send)
            return
        if not self.lifecycle.accepting:
            reason = DrainingError("the instance is shutting down; retry on another instance")
            if self.lifecycle.error:
                code = self.lifecycle.error_code
                what = "the instance stopped serving" if code == TIER_CORRUPTED else "the model could not be loaded"
                reason = DrainingError(f"{what}: {self.lifecycle.error}", code=code or None)
            await error_response(reason, close=True)(scope, receive, send)
            return
        with self.lifecycle.track():
            if self.demand is not None:
                scope[DEMAND_SCOPE_KEY] = self.demand.arrived(scope)
            await self.app(scope, receive, send)


DEMAND_SCOPE_KEY = "kold.demand"


INSTANCE_TOKEN_HEADER = b"x-kold-instance-token"


class _InstanceToken:
    """Only whoever holds the platform's instance token may call the /v1/ routes: the local platform's
    instances listen on loopback ports that any local process could reach, bypassing the gateway's
    keys. (On Knative the queue-proxy and the mesh do this job, and no token is set.)"""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.token = token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            given = next((v for k, v in scope.get("headers", ()) if k.lower() == INSTANCE_TOKEN_HEADER), b"")
            if not hmac.compare_digest(given, self.token):
                denied = InstanceTokenError("this instance takes requests from its platform's gateway only")
                await error_response(denied, close=True)(scope, receive, send)
                return
        await self.app(scope, receive, send)


REQUEST_ID_HEADER = b"x-request-id"
REQUEST_ID_SCOPE_KEY = "kold.request_id"
# what we take from a client as its id: a plain token, bounded (it goes into log lines as it is); the
# gateway keeps the same kind of ids, so the one it forwards is the one the instance logs
_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")


class _RequestId:
    """Gives every request an id, `x-request-id`: the client's (the gateway forwards one), or a new one
    when it sent none or one that is not a plain token (letters, digits, `._:-`) of at most 128
    characters. The id goes into the ASGI scope (for the routes and their log records) and back on
    the response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next((v for k, v in scope.get("headers", ()) if k.lower() == REQUEST_ID_HEADER), None)
        request_id = given.decode() if given is not None and _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        scope[REQUEST_ID_SCOPE_KEY] = request_id
        raw = request_id.encode()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() != REQUEST_ID_HEADER]
                message = {**message, "headers": [*headers, (REQUEST_ID_HEADER, raw)]}
            await send(message)

        await self.app(scope, receive, send_with_id)


def _tier_verification(loaded: Loaded) -> dict[str, Any]:
    """What /readyz says of the weights' check when the instance becomes ready."""
    tier = loaded.restore.get("source_tier")
    if loaded.verifier is not None:
        return {"state": "pending", "tier": tier}
    return {"state": "verified" if loaded.restore.get("verified") else "unverified", "tier": tier}


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Callable[..., None], *args: Any) -> bool:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # the loop is closed: the process is exiting
        return False
    return True


class _Server(uvicorn.Server):
    """uvicorn, with our signal handling (drain first) and a hook once the socket listens."""

    def __init__(self, config: uvicorn.Config, runtime: Runtime) -> None:
        super().__init__(config)
        self.runtime = runtime
        self._signals = 0

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets)
        if self.started and not self.should_exit:
            address = ", ".join(
                "http://{}:{}".format(*sock.getsockname()[:2]) for server in self.servers for sock in server.sockets
            )
            self.runtime.on_listening(asyncio.get_running_loop(), address)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Unlike uvicorn's own handler, never re-raise the signal afterwards: a drained exit is exit 0.
        self._signals += 1
        loop = self.runtime._loop
        if self._signals > 1 or loop is None:
            self.should_exit = True
            self.force_exit = self._signals > 1
            return
        loop.call_soon_threadsafe(self.runtime.on_signal, sig)


def serve(
    options: ServeOptions,
    loader: Loader,
    *,
    process_start: float | None = None,
    demand: DemandReporting | None = None,
) -> int:
    """Run the instance until it is drained; the exit status (0, or 1 if the model never loaded)."""
    runtime = Runtime(options, loader, process_start=process_start, demand=demand)
    config = uvicorn.Config(
        runtime.app,
        host=options.host,
        port=options.port,
        # httptools + uvloop (dependencies of kold): httptools' parser imports in ~6 ms against h11's
        # ~26 ms, and frames each streamed chunk in C rather than Python; its protocol here has the
        # request-head and body deadlines (runtime/httpserver.py)
        loop="auto",
        http=http_protocol(header_timeout_s=options.header_timeout_s, body_timeout_s=options.body_timeout_s),
        lifespan="off",
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=5,
    )
    server = _Server(config, runtime)
    runtime.server = server
    runtime.lifecycle.cold_start.imports_done = time.time()
    server.run()
    runtime.finish()
    if not server.started:
        return 1
    return runtime.exit_code
