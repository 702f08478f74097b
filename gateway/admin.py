"""The admin API (what `kold deploy|ls|describe|rm|rollback|logs|keys` call): functions, revisions,
traffic, pre-warming and floors (what a pre-warm controller in another process sets), instance logs
and API keys.

Handlers only parse, ask the registry or the activator, and shape JSON; errors are raised and turned
into responses by the app's one error table (gateway/errors.py).
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import asdict, replace
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from kold.controller.scaling import Floor
from kold.gateway import logs as instance_logs
from kold.gateway.activator import Gateway
from kold.gateway.auth import KeyAuth
from kold.gateway.floors import MAX_FLOOR_INSTANCES, FloorError, check_floor, floor_to_json
from kold.gateway.registry import Function, InvalidSpecError, RuntimeSpec, ScalingSpec
from kold.gateway.router import parse_body
from kold.runtime.httpserver import read_body
from kold.runtime.protocol import InvalidRequestError, ModelNotFoundError, RouteNotFoundError, UnavailableError

Endpoint = Any  # the app's wrapper: (handler) -> handler with auth and the error table


def _spec(cls: type[ScalingSpec] | type[RuntimeSpec], raw: object, what: str) -> Any:
    """A spec from the request's JSON object: unknown or mistyped fields are the client's error (400)."""
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        raise InvalidRequestError(f"'{what}' must be a JSON object", param=what)
    try:
        return cls(**raw)
    except TypeError:
        known = ", ".join(cls.__dataclass_fields__)
        raise InvalidRequestError(f"'{what}' takes only these fields: {known}", param=what) from None
    except InvalidSpecError as exc:
        raise InvalidRequestError(f"{what}: {exc}", param=what) from None


_FLOOR_FIELDS = ("instances", "until", "ttl_s", "reason", "idle_timeout_s")


def _floor_json(floor: Floor | None) -> dict[str, Any] | None:
    return None if floor is None else floor_to_json(floor)


def floor_from_body(body: dict[str, Any], wall_now: float) -> Floor:
    """The floor a PUT asks for: `instances`, `until` (Unix time) or `ttl_s` (from now), `reason`,
    `idle_timeout_s` (null: the revision's). A bad or unknown field is a 400 that names it; the floor's
    own fields are checked by floors.check_floor, as `set_floor` checks them."""
    unknown = sorted(set(body) - set(_FLOOR_FIELDS))
    if unknown:
        raise InvalidRequestError(
            f"unknown floor field {unknown[0]!r}: a floor takes {', '.join(_FLOOR_FIELDS)}", param=unknown[0]
        )
    if ("until" in body) == ("ttl_s" in body):
        raise InvalidRequestError("give the floor's end as 'until' (Unix time) or 'ttl_s', one of them", param="until")
    if "until" in body:
        until = body["until"]
    else:
        ttl = body["ttl_s"]
        if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not 0 < ttl < math.inf:
            raise InvalidRequestError("'ttl_s' must be a number of seconds > 0", param="ttl_s")
        until = wall_now + ttl
    instances: Any = body.get("instances")  # checked, with the rest, by check_floor
    floor = Floor(instances, until, body.get("reason", "set through the admin API"), body.get("idle_timeout_s"))
    try:
        check_floor(floor)
    except FloorError as exc:
        raise InvalidRequestError(str(exc), param=exc.field) from None
    idle = floor.idle_timeout_s
    return replace(floor, until=float(floor.until), idle_timeout_s=None if idle is None else float(idle))


class AdminAPI:
    """The admin routes over one gateway (its registry and pool) and its key auth."""

    def __init__(self, gateway: Gateway, auth: KeyAuth, *, max_body_bytes: int, body_timeout_s: float) -> None:
        self.max_body_bytes = max_body_bytes  # bodies are bounded in size and time, as on the data path
        self.body_timeout_s = body_timeout_s
        self.gw = gateway
        self.registry = gateway.registry
        self.pool = gateway.pool
        self.auth = auth

    def routes(self, endpoint: Endpoint) -> list[Route]:
        """Every admin route needs an admin-scoped key (once keys exist)."""

        def admin(fn: Any) -> Any:
            return endpoint(fn, scope="admin")

        return [
            Route("/admin/functions", admin(self.list_functions), methods=["GET"]),
            Route("/admin/functions/{name}", admin(self.describe), methods=["GET"]),
            Route("/admin/functions/{name}", admin(self.delete), methods=["DELETE"]),
            Route("/admin/functions/{name}/revisions", admin(self.create_revision), methods=["POST"]),
            Route("/admin/functions/{name}/rollback", admin(self.rollback), methods=["POST"]),
            Route("/admin/functions/{name}/prewarm", admin(self.prewarm), methods=["POST"]),
            Route("/admin/functions/{name}/floor", admin(self.put_floor), methods=["PUT"]),
            Route("/admin/functions/{name}/floor", admin(self.delete_floor), methods=["DELETE"]),
            Route("/admin/functions/{name}/scale-to-zero", admin(self.scale_to_zero), methods=["POST"]),
            Route("/admin/functions/{name}/logs", admin(self.logs), methods=["GET"]),
            Route("/admin/keys", admin(self.create_key), methods=["POST"]),
            Route("/admin/keys", admin(self.list_keys), methods=["GET"]),
            Route("/admin/keys/{key_id}", admin(self.revoke_key), methods=["DELETE"]),
        ]

    async def _json(self, request: Request) -> dict[str, Any]:
        raw = await read_body(request, max_bytes=self.max_body_bytes, timeout_s=self.body_timeout_s)
        return parse_body(raw) if raw else {}

    async def _function(self, name: str) -> Function:
        fn = await asyncio.to_thread(self.registry.get_function, name)
        if fn is None:
            raise ModelNotFoundError(f"the function {name!r} does not exist")
        return fn

    def _instances(self, rev_ids: tuple[str, ...]) -> list[dict[str, Any]]:
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
                "failure": i.failure,
            }
            for r in rev_ids
            for i in self.pool.instances(r)
        ]

    def _failed(self, rev_id: str) -> str | None:
        """The cause code when the revision is marked failed, else None."""
        failure = self.gw.start_failures.get(rev_id)
        return failure.code if failure is not None and failure.failed else None

    # -- functions and revisions --

    async def create_revision(self, request: Request) -> Response:
        name = request.path_params["name"]
        body = await self._json(request)
        scaling = _spec(ScalingSpec, body.get("scaling"), "scaling")
        runtime = _spec(RuntimeSpec, body.get("runtime"), "runtime")
        never = self.gw.capacity.never_fits(Gateway.footprint_of(runtime)) if self.gw.capacity is not None else None
        if never is not None:
            raise InvalidRequestError(f"an instance of this revision can never fit on this node: needs {never}")
        rev = await asyncio.to_thread(
            self.registry.create_revision, name, body.get("snapshot_uri", ""), scaling=scaling, runtime=runtime
        )
        self.gw.add_revision(rev)
        rollout = self.gw.run_background(self.gw.roll_out(rev.revision_id))
        if body.get("wait"):
            if not await asyncio.shield(rollout):
                raise UnavailableError(f"revision {rev.revision_id} did not become ready (see the logs)")
            return JSONResponse({"revision": rev.revision_id, "serving": True}, status_code=201)
        return JSONResponse({"revision": rev.revision_id, "serving": False}, status_code=202)

    async def list_functions(self, request: Request) -> Response:
        fns = await asyncio.to_thread(self.registry.list_functions)
        return JSONResponse(
            {
                "functions": [
                    {
                        "name": f.name,
                        "serving": f.serving_revision,
                        "latest": f.latest_revision,
                        "failed": self._failed(f.serving_revision or f.latest_revision),
                        "instances": sum(
                            1 for i in self._instances(f.revisions) if i["state"] in ("starting", "ready")
                        ),
                    }
                    for f in fns
                ]
            }
        )

    async def describe(self, request: Request) -> Response:
        fn = await self._function(request.path_params["name"])
        revisions = []
        for rev_id in fn.revisions:
            rev = await self.gw.revision(rev_id)
            if rev is not None:
                failure = self.gw.start_failures.get(rev_id)
                revisions.append(
                    {
                        "id": rev_id,
                        "snapshot_uri": rev.snapshot_uri,
                        "created_at": rev.created_at,
                        "scaling": asdict(rev.scaling),
                        "runtime": asdict(rev.runtime),
                        "start_failure": failure.describe(self.gw.clock()) if failure is not None else None,
                    }
                )
        current = await self.gw.revision(fn.serving_revision or fn.latest_revision)
        return JSONResponse(
            {
                "name": fn.name,
                "serving": fn.serving_revision,
                "prewarm": current.scaling.prewarm if current is not None else None,
                "floor": _floor_json(self.gw.floor(fn.name)),
                "revisions": revisions,
                "instances": self._instances(fn.revisions),
            }
        )

    async def delete(self, request: Request) -> Response:
        fn = await self._function(request.path_params["name"])
        await asyncio.to_thread(self.registry.delete_function, fn.name)
        await self.gw.stop_function(fn.name, list(fn.revisions))
        return JSONResponse({"deleted": fn.name})

    async def rollback(self, request: Request) -> Response:
        name = request.path_params["name"]
        body = await self._json(request)
        target = body.get("revision")
        if target is not None and not isinstance(target, str):
            raise InvalidRequestError("'revision' must be a revision id", param="revision")
        rev_id = await asyncio.to_thread(self.registry.rollback, name, target)
        self.gw.invalidate(name)
        return JSONResponse({"serving": rev_id})

    async def prewarm(self, request: Request) -> Response:
        """Start instances ahead of demand (what the pre-warm controller does on its own)."""
        fn = await self._function(request.path_params["name"])
        body = await self._json(request)
        instances = body.get("instances", 1)
        if not isinstance(instances, int) or isinstance(instances, bool) or not 0 <= instances <= MAX_FLOOR_INSTANCES:
            raise InvalidRequestError(
                f"'instances' must be an integer between 0 and {MAX_FLOOR_INSTANCES}", param="instances"
            )
        started = await self.gw.prewarm(fn.name, instances)
        return JSONResponse({"function": fn.name, "started": started}, status_code=202)

    async def put_floor(self, request: Request) -> Response:
        """Hold a floor for the function (what `kold controller`'s HTTP actuator sends); applied at once."""
        fn = await self._function(request.path_params["name"])
        floor = floor_from_body(await self._json(request), self.gw.wall())
        self.gw.set_floor(fn.name, floor)
        return JSONResponse({"function": fn.name, "floor": _floor_json(self.gw.floor(fn.name))})

    async def delete_floor(self, request: Request) -> Response:
        fn = await self._function(request.path_params["name"])
        self.gw.set_floor(fn.name, None)
        return JSONResponse({"function": fn.name, "floor": None})

    async def scale_to_zero(self, request: Request) -> Response:
        """Stop the function's instances now (drained first): the next request is a cold start."""
        fn = await self._function(request.path_params["name"])
        stopped = await self.gw.scale_to_zero(fn.name, list(fn.revisions))
        return JSONResponse({"function": fn.name, "stopped": stopped})

    # -- logs: a snapshot as JSON, or (follow=1) a text stream like `tail -F` --

    async def logs(self, request: Request) -> Response:
        """`?tail=N`: each instance's last N lines as JSON; `&follow=1`: a text/plain stream that goes on."""
        try:
            tail = int(request.query_params.get("tail", "100"))
        except ValueError:
            raise InvalidRequestError("tail must be an integer", param="tail") from None
        if tail < 0:
            raise InvalidRequestError("tail must be >= 0", param="tail")
        follow = request.query_params.get("follow", "0").lower()
        if follow not in ("0", "1", "false", "true"):
            raise InvalidRequestError("follow must be 0 or 1", param="follow")
        fn = await self._function(request.path_params["name"])
        if follow in ("1", "true"):
            stopping = getattr(request.app.state, "log_streams_stopping", None)
            return StreamingResponse(
                instance_logs.follow(self.pool, fn.name, frozenset(fn.revisions), tail, stopping),
                media_type="text/plain; charset=utf-8",
                headers={"Cache-Control": "no-cache"},
            )
        out = [
            {"id": i.id, "state": i.state.value, "log": self.pool.read_log(i, tail)}
            for r in fn.revisions
            for i in self.pool.instances(r)
        ]
        return JSONResponse({"instances": out})

    # -- API keys --

    async def create_key(self, request: Request) -> Response:
        body = await self._json(request)
        label = body.get("label", "")
        if not isinstance(label, str):
            raise InvalidRequestError("'label' must be a string", param="label")
        scope = body.get("scope", "admin")
        if not isinstance(scope, str):
            raise InvalidRequestError("'scope' must be 'invoke' or 'admin'", param="scope")
        key = await asyncio.to_thread(self.registry.create_key, label, scope)
        self.auth.keys_changed()
        return JSONResponse({"key_id": key.key_id, "secret": key.secret, "scope": scope}, status_code=201)

    async def list_keys(self, request: Request) -> Response:
        keys = await asyncio.to_thread(self.registry.list_keys)
        return JSONResponse({"keys": [asdict(k) for k in keys]})

    async def revoke_key(self, request: Request) -> Response:
        key_id = request.path_params["key_id"]
        disable_auth = request.query_params.get("disable_auth", "0").lower() in ("1", "true")
        ok = await asyncio.to_thread(self.registry.revoke_key, key_id, disable_auth=disable_auth)
        self.auth.keys_changed()
        if not ok:
            raise RouteNotFoundError(f"no key {key_id!r}")
        return JSONResponse({"revoked": key_id})
