"""The pre-warm controller's floors on Knative: a Revision's min-scale, raised and lowered in place.

`KnativeActuator.set_floor(function, floor)` holds a floor on the Revision that serves the function:

1. The Revision is the Service's `status.latestReadyRevisionName`, unless `status.traffic` sends the
   traffic elsewhere (then the one with the most): the KPA ignores min-scale on a revision no route
   points at (`PodAutoscaler.ScaleBounds`). None ready: not delivered (False), logged once.
2. Its `autoscaling.knative.dev/min-scale` becomes max(base, floor.instances) (at most its max-scale,
   which the webhook enforces) with a JSON merge patch of the Revision's metadata.annotations, never
   of the Service's `spec.template` (that would create a new Revision). The Revision's own value is
   kept beside it the first time (`names.BASE_MIN_SCALE`; "" when it had none) with the floor
   (`names.FLOOR`, JSON). `scale-down-delay` is not touched: the KPA sizes a revision's delay
   window once, when its decider is made (`New` in pkg/autoscaler/scaling/autoscaler.go; `Update`
   swaps only the DeciderSpec), so a patched value would do nothing until the autoscaler restarts.
   A floor's `idle_timeout_s` (the gateway's keep-alive for instances above it) has no live
   equivalent, so it is not sent: instances above the floor, and the floor's own once it ends, scale
   in on the Revision's own scale-down-delay (`--idle-timeout` at deploy), as the local platform's
   scale in on the function's idle timeout once a floor ends.
3. With no pods (`status.actualReplicas` missing or 0) and `instances > 0`, one warm-up request
   (`GET <status.address.url>/readyz`, header `x-kold-warmup: 1`) goes through the activator,
   fire-and-forget: one in flight per function, bounded in time and in number, its result logged.
4. `floor=None` restores the bases on every Revision of the Service that carries kold's annotations
   and drops them (null in the merge patch); so does a floor that moves to a newer Revision, and so
   does the actuator itself at a floor's `until` (a Revision's
   min-scale, unlike the gateway's floor, never runs out by itself, and the loop sends nothing for a
   floor that ran out). A `BASE_SCALE_DOWN_DELAY` an earlier kold left is given back the same way.
5. The node agents are told (`controller/nodes.py` NodeWants, optional): want the Revision's
   snapshot until the floor ends; unwant on clear. A missing or failing Redis never fails a floor.

Nothing raises into the controller's loop: an API error, a 403 (RBAC) or a 404 gives False, logged
once per function and kind of failure until that function's floor goes through again.

Why in place, and which Knative: since v1.21 (knative/serving#16186, commit 7c317848) the Revision
reconciler copies a Revision's `autoscaling.knative.dev/*` annotations to its PodAutoscaler whenever
they change (`syncAnnotationsForKPA` in pkg/reconciler/revision/reconcile_resources.go; a deleted one
is deleted there too), and keeps them off the Deployment and its pods. Before v1.21 `reconcilePA`
compared only the PA's spec, so a Revision's new min-scale never reached the autoscaler, and every
Revision annotation (min-scale included) was copied into the Deployment's pod template
(`makeAnnotations` in pkg/reconciler/revision/resources/meta.go), so a patch rolled the Revision's pods
and scaled nothing. In every version, any *other* annotation on a Revision reaches the pod template
and rolls the pods; kold's own bookkeeping keys (names.FLOOR, BASE_MIN_SCALE, BASE_SCALE_DOWN_DELAY)
therefore sit under the `autoscaling.knative.dev` prefix (the one Knative keeps off the pods since
v1.21, and whose keys it does not know it ignores).
On Knative older than v1.21, do not run this actuator: docs/knative-prewarm.md has the table.

Why the warm-up request (knative/serving#10327, "changing the podautoscaler directly does not trigger
scale up"): the KPA applies min/max bounds only to a valid desired scale
(`scaler.scale` in pkg/reconciler/autoscaling/kpa/scaler.go returns early while
`desiredScale < 0 && !pa.Status.IsActivating()`). A decider starts at -1 (`MultiScaler.createScaler`)
and moves only on a valid result (`tickScaler`); with no pods nothing is scraped (`serviceScraper.Scrape`
returns an empty stat, which the collection does not record) and `StableAndPanicConcurrency` answers
`ErrNoData`. So a Revision at zero whose decider has had no data since it was made (the autoscaler
restarted or failed over, #10327's `desiredScale: -1`) ignores a raised min-scale until a request
arrives; a decider that kept a valid 0 from before applies it at once. The activator reports a new
request to the autoscaler at once (`ConcurrencyReporter.getOrCreateStat` sends concurrency 1, which
`MultiScaler.Poke` turns into an immediate decision), so one request makes the bound act either way.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any, Final, Protocol

import httpx

from kold.controller.scaling import Floor
from kold.knative import names
from kold.knative.cluster import Forbidden, KnativeError, NotFound

log = logging.getLogger("kold.knative.actuator")

Doc = dict[str, Any]

WARMUP_HEADER: Final = "x-kold-warmup"
WARMUP_PATH: Final = "/readyz"  # the runtime answers it without work; the activator holds it until a pod is ready
# the activator counts the request when it arrives, so the answer only says when the pod was up: a
# minute covers most restores; a longer one is let go (logged) rather than kept open
WARMUP_TIMEOUT_S: Final = 60.0
MAX_WARMUPS: Final = 64  # warm-ups in flight at once, all functions together
# how often the end of the floors held is looked at, at most: the sleep to the next end is exact, this
# only catches a wall clock that jumped, and retries an end that failed (an API error) this often
EXPIRY_POLL_S: Final = 5.0
KOLD_KEYS: Final = (names.FLOOR, names.BASE_MIN_SCALE, names.BASE_SCALE_DOWN_DELAY)


class RevisionAPI(Protocol):
    """What the actuator needs of `kold.knative.cluster.Cluster` (blocking calls)."""

    def get_service(self, name: str) -> Doc: ...
    def get_revision(self, name: str) -> Doc: ...
    def list_revisions(self, service: str) -> list[Doc]: ...
    def patch_revision_annotations(self, name: str, annotations: dict[str, str | None]) -> Doc: ...


class Wants(Protocol):
    """The node agents' record (`kold.controller.nodes.NodeWants` fits it)."""

    def want(self, function: str, uri: str, until: float, reason: str = "", nbytes: int = 0) -> None: ...
    def unwant(self, function: str) -> None: ...


class FloorNotHeldError(Exception):
    """A floor that cannot be held now for a reason the actuator found itself (`kind` names it)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


# -- pure: what a floor writes on a Revision ---------------------------------------------------------


def annotations_of(obj: Doc) -> dict[str, str]:
    meta = obj.get("metadata")
    raw = meta.get("annotations") if isinstance(meta, dict) else None
    return {str(k): str(v) for k, v in raw.items() if v is not None} if isinstance(raw, dict) else {}


def floor_patch(revision: Doc, floor: Floor) -> dict[str, str | None]:
    """The merge patch of the Revision's annotations that holds `floor` (the bases kept from before)."""
    ann = annotations_of(revision)
    base_key = names.BASE_MIN_SCALE if names.BASE_MIN_SCALE in ann else names.MIN_SCALE
    base_min = ann.get(base_key, "")
    instances = floor.instances
    max_scale = _whole(names.MAX_SCALE, ann.get(names.MAX_SCALE, ""))
    if max_scale > 0:
        instances = min(instances, max_scale)  # min-scale above max-scale is refused by the webhook
    body = {"instances": floor.instances, "until": floor.until, "reason": floor.reason}
    patch: dict[str, str | None] = {
        names.MIN_SCALE: str(max(_whole(base_key, base_min), instances)),
        names.BASE_MIN_SCALE: base_min,
        names.FLOOR: json.dumps(body, sort_keys=True),
    }
    if names.BASE_SCALE_DOWN_DELAY in ann:  # an earlier kold changed it: the Revision gets its own back
        patch.update(_restore(ann, names.SCALE_DOWN_DELAY, names.BASE_SCALE_DOWN_DELAY))
    return patch


def held_until(floor: Floor) -> float:
    """When the actuator ends a floor's raised min-scale: at its `until`, as the gateway's floor ends;
    the Revision's own scale-down-delay then keeps the idle pods as long as the function's idle timeout
    keeps them locally (module docstring, step 2)."""
    return floor.until


def clear_patch(revision: Doc) -> dict[str, str | None]:
    """The merge patch that gives the Revision its own min-scale (and a scale-down-delay an earlier kold
    changed) back and drops kold's annotations; empty when it carries none."""
    ann = annotations_of(revision)
    patch: dict[str, str | None] = {}
    if names.BASE_MIN_SCALE in ann:
        patch.update(_restore(ann, names.MIN_SCALE, names.BASE_MIN_SCALE))
    if names.BASE_SCALE_DOWN_DELAY in ann:
        patch.update(_restore(ann, names.SCALE_DOWN_DELAY, names.BASE_SCALE_DOWN_DELAY))
    if names.FLOOR in ann:
        patch[names.FLOOR] = None
    return patch


def carries_floor(revision: Doc) -> bool:
    return any(key in annotations_of(revision) for key in KOLD_KEYS)


def serving_revision(service: Doc) -> str | None:
    """The Revision a floor belongs on: the latest ready one, unless the Service's traffic goes
    elsewhere (then the one with the most); None while none is ready."""
    status = service.get("status")
    if not isinstance(status, dict):
        return None
    latest = status.get("latestReadyRevisionName")
    routed: dict[str, float] = {}
    for target in status.get("traffic") or ():
        if isinstance(target, dict) and isinstance(target.get("revisionName"), str):
            percent = target.get("percent")
            share = float(percent) if isinstance(percent, int | float) else 0.0
            routed[target["revisionName"]] = routed.get(target["revisionName"], 0.0) + share
    routed = {name: share for name, share in routed.items() if share > 0}
    if routed and latest not in routed:
        return max(sorted(routed), key=lambda name: routed[name])
    return latest if isinstance(latest, str) and latest else None


def has_pods(revision: Doc) -> bool:
    status = revision.get("status")
    replicas = status.get("actualReplicas") if isinstance(status, dict) else None
    return isinstance(replicas, int) and replicas > 0


def service_url(service: Doc) -> str | None:
    """Where a request reaches the function through Knative's routing (the activator at zero): the
    cluster-local address, else the public URL."""
    status = service.get("status")
    if not isinstance(status, dict):
        return None
    address = status.get("address")
    url = address.get("url") if isinstance(address, dict) else None
    url = url or status.get("url")
    return url.rstrip("/") if isinstance(url, str) and url else None


def _restore(ann: dict[str, str], key: str, base_key: str) -> dict[str, str | None]:
    base = ann.get(base_key, "")
    return {key: base or None, base_key: None}  # "" recorded: the Revision had none


def _whole(key: str, text: str) -> int:
    """A scale annotation's whole number ("" is 0); FloorNotHeldError when someone wrote nonsense there."""
    if not text.strip():
        return 0
    try:
        value = int(text)
    except ValueError:
        raise FloorNotHeldError("garbled", f"its annotation {key}={text!r} is not a whole number") from None
    if value < 0:
        raise FloorNotHeldError("garbled", f"its annotation {key}={text!r} is negative")
    return value


# -- the actuator ------------------------------------------------------------------------------------


class KnativeActuator:
    """Floors as the serving Revision's min-scale (module docstring). Blocking cluster calls run in
    threads; the warm-up requests and the floors' ends run on the event loop `set_floor` is awaited on.

    A floor on a Revision does not end by itself, as the gateway's does: the actuator ends it at
    `held_until(floor)` (its `until`, by `clock`, Unix time) and gives the Revision
    its own values back, so a floor the controller lets run out (it sends nothing more) is not held for
    ever. The end is checked at least every `expiry_poll_s`, so a clock that jumps is caught up with."""

    def __init__(
        self,
        cluster: RevisionAPI,
        *,
        wants: Wants | None = None,
        http: httpx.AsyncClient | None = None,
        warmup_timeout_s: float = WARMUP_TIMEOUT_S,
        max_warmups: int = MAX_WARMUPS,
        clock: Callable[[], float] = time.time,
        expiry_poll_s: float = EXPIRY_POLL_S,
    ) -> None:
        self.cluster = cluster
        self.wants = wants
        self._own_http = http is None
        self._http = http if http is not None else httpx.AsyncClient(follow_redirects=False)
        self.warmup_timeout_s = warmup_timeout_s
        self.max_warmups = max_warmups
        self.clock = clock
        self.expiry_poll_s = expiry_poll_s
        self._held: dict[str, str] = {}  # function -> the Revision this actuator put its floor on
        self._floors: dict[str, Floor] = {}  # function -> the floor held now, until it ends
        # one change at a time per function (a set, an end); a lock is kept only while it is in use
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}  # function -> (its lock, callers holding or waiting)
        self._failing: dict[str, set[str]] = {}  # function -> kinds of failure logged since it last worked
        self._warmups: dict[str, asyncio.Task[None]] = {}
        self._warmups_failing: set[str] = set()  # functions whose warm-up failure was warned of
        self._expirer: asyncio.Task[None] | None = None
        self._wants_failing = False

    async def set_floor(self, function: str, floor: Floor | None) -> bool:
        async with self._lock(function):
            if floor is None:
                done = await self._attempt(function, self._clear(function))
            else:
                done = await self._attempt(function, self._hold(function, floor))
            if done:
                if floor is None:
                    self._floors.pop(function, None)
                else:
                    self._floors[function] = floor
                    self._watch_ends()
            return done

    async def _attempt(self, function: str, work: Coroutine[Any, Any, None]) -> bool:
        """Run one change; False (logged once per kind) when it failed, never an exception."""
        try:
            await work
        except FloorNotHeldError as exc:
            self._failed(function, exc.kind, str(exc))
            return False
        except NotFound as exc:
            self._failed(function, "not-found", str(exc))
            return False
        except Forbidden as exc:
            self._failed(function, "forbidden", str(exc))
            return False
        except KnativeError as exc:
            self._failed(function, "api", str(exc))
            return False
        except Exception as exc:  # a bug or a garbled object must not stop the loop deciding for others
            self._failed(function, "error", f"{type(exc).__name__}: {exc}")
            return False
        if self._failing.pop(function, None):
            log.info("%s: its floor reaches the cluster again", function)
        return True

    @asynccontextmanager
    async def _lock(self, function: str) -> AsyncIterator[None]:
        """The function's lock, dropped when its last caller is done (all run on one event loop), so
        functions that come and go leave none behind."""
        lock, users = self._locks.get(function, (asyncio.Lock(), 0))
        self._locks[function] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[function]
            if users > 1:
                self._locks[function] = (lock, users - 1)
            else:
                del self._locks[function]

    async def _hold(self, function: str, floor: Floor) -> None:
        service = await asyncio.to_thread(self.cluster.get_service, function)
        name = serving_revision(service)
        if name is None:
            raise FloorNotHeldError("not-ready", "its Knative Service has no ready revision yet")
        revision = await asyncio.to_thread(self.cluster.get_revision, name)
        try:
            patch = floor_patch(revision, floor)
        except FloorNotHeldError as exc:
            raise FloorNotHeldError(exc.kind, f"revision {name}: {exc}") from None
        await asyncio.to_thread(self.cluster.patch_revision_annotations, name, patch)
        if self._held.get(function) != name:  # first floor since start, or a newer revision serves
            await self._clear_revisions(function, keep=name)
            self._held[function] = name
        if floor.instances > 0 and not has_pods(revision):
            self._warm_up(function, service_url(service))
        await self._tell_agents(function, floor, revision, service)

    async def _clear(self, function: str) -> None:
        if not await self._clear_revisions(function, keep=None):
            # no Revision: the Service is gone (the loop clears a function it forgets); nothing more
            # will be said of its warm-ups (its failures are dropped once this clear has gone through)
            self._warmups_failing.discard(function)
        self._held.pop(function, None)
        await self._tell_agents(function, None, None, None)

    async def _clear_revisions(self, function: str, keep: str | None) -> int:
        """Restore every Revision of the function that carries kold's floor, but `keep`; how many
        Revisions the function has."""
        revisions = await asyncio.to_thread(self.cluster.list_revisions, function)
        for revision in revisions:
            name = revision.get("metadata", {}).get("name")
            if not isinstance(name, str) or name == keep or not carries_floor(revision):
                continue
            patch = clear_patch(revision)
            if patch:
                await asyncio.to_thread(self.cluster.patch_revision_annotations, name, patch)
                log.debug("%s: floor cleared on revision %s", function, name)
        return len(revisions)

    # -- the floors' ends ----------------------------------------------------------------------------

    def _watch_ends(self) -> None:
        if self._expirer is None or self._expirer.done():
            self._expirer = asyncio.get_running_loop().create_task(self._end_floors())

    async def _end_floors(self) -> None:
        """Until no floor is held: end each one whose hold (`held_until`) has passed (one that could not
        be ended is tried again within `expiry_poll_s`), then sleep to the next end."""
        while self._floors:
            now = self.clock()
            for function, floor in list(self._floors.items()):
                if held_until(floor) <= now:
                    await self._end(function, floor)
            ahead = [end for end in map(held_until, self._floors.values()) if end > now]
            wait = min([self.expiry_poll_s, *(until - now for until in ahead)])
            await asyncio.sleep(max(wait, 0.0))

    async def _end(self, function: str, floor: Floor) -> None:
        async with self._lock(function):
            if self._floors.get(function) is not floor:
                return  # replaced or cleared while this waited
            if await self._attempt(function, self._clear(function)):
                self._floors.pop(function, None)
                log.info("%s: floor ended (%s): its revision's own min-scale is back", function, floor.reason)

    # -- the warm-up request -------------------------------------------------------------------------

    def _warm_up(self, function: str, url: str | None) -> None:
        if function in self._warmups:
            return  # one in flight already: it wakes the revision as well as a second would
        if url is None:
            self._warmup_failed(function, "no warm-up request sent: its Knative Service has no URL in its status")
            return
        if len(self._warmups) >= self.max_warmups:
            log.warning("%s: no warm-up request sent: %d are in flight already", function, len(self._warmups))
            return
        task = asyncio.get_running_loop().create_task(self._send_warmup(function, url + WARMUP_PATH))
        self._warmups[function] = task
        task.add_done_callback(
            lambda done: self._warmups.pop(function, None) if self._warmups.get(function) is done else None
        )

    async def _send_warmup(self, function: str, url: str) -> None:
        started = time.monotonic()
        try:
            resp = await self._http.get(url, headers={WARMUP_HEADER: "1"}, timeout=self.warmup_timeout_s)
        except httpx.TimeoutException:
            log.info(
                "%s: warm-up request not answered within %g s (the autoscaler counted it when it arrived; "
                "the pod may still be starting)",
                function,
                self.warmup_timeout_s,
            )
        except Exception as exc:  # its own task: nothing may escape unobserved
            self._warmup_failed(function, f"warm-up request to {url} failed: {type(exc).__name__}: {exc}")
        else:
            self._warmups_failing.discard(function)
            log.info(
                "%s: warm-up request answered %d after %.1f s", function, resp.status_code, time.monotonic() - started
            )

    def _warmup_failed(self, function: str, why: str) -> None:
        """Warned once per function until one of its warm-ups is answered (a controller outside the
        cluster cannot reach the cluster-local address: every pre-warm from zero would say so)."""
        if function in self._warmups_failing:
            log.debug("%s: %s", function, why)
        else:
            self._warmups_failing.add(function)
            log.warning("%s: %s (the floor holds; the revision may wait for a request to wake)", function, why)

    # -- the node agents -----------------------------------------------------------------------------

    async def _tell_agents(self, function: str, floor: Floor | None, revision: Doc | None, service: Doc | None) -> None:
        """Want the serving snapshot on the nodes while a floor keeps an instance; unwant otherwise.
        Only logged when it fails: the floor on the Revision is what matters."""
        if self.wants is None:
            return
        uri = size = ""
        if floor is not None and floor.instances > 0:
            own, svc = annotations_of(revision or {}), annotations_of(service or {})
            uri = own.get(names.SNAPSHOT_URI) or svc.get(names.SNAPSHOT_URI, "")
            size = svc.get(names.SNAPSHOT_BYTES, "")
        try:
            if floor is not None and uri:
                nbytes = int(size) if size.isdigit() else 0
                await asyncio.to_thread(self.wants.want, function, uri, floor.until, floor.reason, nbytes)
            else:
                await asyncio.to_thread(self.wants.unwant, function)
        except Exception as exc:
            if not self._wants_failing:
                self._wants_failing = True
                log.warning(
                    "the node agents cannot be told what to prefetch (%s: %s); floors still hold",
                    type(exc).__name__,
                    exc,
                )
            return
        if self._wants_failing:
            self._wants_failing = False
            log.info("the node agents are told what to prefetch again")

    # -- failures ------------------------------------------------------------------------------------

    def _failed(self, function: str, kind: str, why: str) -> None:
        kinds = self._failing.setdefault(function, set())
        if kind not in kinds:
            kinds.add(kind)
            log.warning("%s: floor not delivered to Knative: %s (retrying)", function, why)

    async def aclose(self) -> None:
        """Stop the warm-up requests in flight and the watch on the floors' ends (a floor still held
        stays on its Revision: the next controller to hold the lease clears or keeps it), and close
        the HTTP client (if this actuator made it)."""
        tasks = list(self._warmups.values())
        if self._expirer is not None:
            tasks.append(self._expirer)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._own_http:
            await self._http.aclose()
