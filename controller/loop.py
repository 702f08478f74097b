"""The pre-warm controller's loop: fold demand, ask each function's policy for a floor, hand it on.

Every `tick_s`, and at once for a function the gateway pokes (a request found it cold), the
controller that holds the lease (controller/lease.py):
1. lists the functions with their serving revision's scaling spec and pre-warm policy;
2. folds each function's new demand records into its history, off the event loop (the histories
   are held in memory while the lease is: controller/demand.py's `HeldHistories`), adds the poked
   arrivals whose records have not come yet to a throwaway copy, and asks the function's policy
   for a plan (`Policy.plan`: pure, `now` passed in);
3. sends the plan's floor through the actuator only when it differs from the floor it last
   delivered (instances or keep-alive changed, or the end moved by more than a tick), when the floor
   it sent is about to run out and the policy extends it, or every `reassert_s` (a gateway that
   restarted gets it again); a floor that did not arrive is sent again next tick; a floor the policy
   no longer holds is cleared, and so, once, is whatever a previous lease holder may have left;
4. clears the floor of a function removed from the registry and drops its demand keys.

Only the outer loop (`run`) owns a clock; `tick_once(now)` and `decide_now(functions, now)` take the
time, so tests drive the controller on a fake timeline against a real Redis. A Redis error ends the
tick (logged once until Redis answers again): floors already set hold until they expire, and the
next tick starts over from what Redis kept (the folded history and the stream cursors). One
function that cannot be read or planned is logged once and costs only its own decision.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import math
import time
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, replace
from typing import Any, Final, Protocol

from redis.exceptions import RedisError

from kold.controller.actuators import Actuator
from kold.controller.demand import DemandStore, HeldHistories
from kold.controller.lease import Lease
from kold.controller.metrics import ControllerMetrics
from kold.controller.policies.base import Plan, Policy
from kold.controller.policies.registry import DEFAULT_POLICY, make_policy
from kold.controller.scaling import Floor, Spec
from kold.gateway.floors import MAX_REASON_LEN  # pure: the gateway's floor rules, no gateway with it

log = logging.getLogger("kold.controller")

SET: Final = "set"  # a floor set or changed
REFRESH: Final = "refresh"  # the same floor sent again: extended before it ran out, or re-asserted
CLEAR: Final = "clear"  # the floor cleared: the policy holds nothing now
FORGET: Final = "forget"  # the function left the registry: floor cleared, demand keys dropped
# a poked arrival is planned with until its record is folded, or this long at most (a request that
# never finishes, a record lost with Redis); and at most this many are kept per function
PENDING_S: Final = 60.0
MAX_PENDING: Final = 256


@dataclass(frozen=True, slots=True)
class FunctionView:
    """A function as the controller decides for it: its serving revision's scaling spec and the
    pre-warm policy text that revision was deployed with ("name" or "name:knob=value")."""

    name: str
    spec: Spec
    policy: str


class OneLineError(Exception):
    """An error whose message is all a person needs, in one line they can act on (an API server that
    cannot be reached, a verb RBAC refuses). A FunctionSource or an Actuator that raises one into a
    pass has it logged as that line, once until a pass succeeds, its traceback only at debug level;
    any other exception is logged with its traceback (a bug). kold.knative's KnativeError is one."""


class FunctionSource(Protocol):
    def list(self) -> list[FunctionView]:
        """Every function (a blocking call: the controller runs it off the event loop)."""
        ...


@dataclass(frozen=True, slots=True)
class Action:
    """What the controller sent for one function (`floor` None: cleared)."""

    function: str
    kind: str  # SET, REFRESH, CLEAR or FORGET
    floor: Floor | None
    policy: str


class RegistrySource:
    """The gateway's function registry as a FunctionSource.

    Duck typed (`list_functions()` -> objects with `name`, `serving_revision`, `latest_revision`;
    `get_revision(id)` -> an object with `scaling`), so the controller does not import the gateway.
    The policy is the revision's `scaling.prewarm`; `default_policy` where it has none. Revisions
    are immutable, so each is read once and kept while it is one a function uses.

    A revision that cannot be read (garbled data) costs that function only: it is logged once, and
    the function keeps the view read before (or is left out until it reads), so the others are still
    decided and the controller does not take it for deleted and forget its floor and demand."""

    def __init__(self, registry: Any, default_policy: str = DEFAULT_POLICY) -> None:
        self.registry = registry
        self.default_policy = default_policy
        self._revisions: dict[str, Any] = {}
        self._last: dict[str, FunctionView] = {}  # function -> its last view read
        self._unreadable: set[str] = set()  # functions logged as unreadable, until they read again

    def list(self) -> list[FunctionView]:
        views: list[FunctionView] = []
        known: dict[str, Any] = {}
        last: dict[str, FunctionView] = {}
        listed = self.registry.list_functions()
        for fn in listed:
            rev_id = fn.serving_revision or fn.latest_revision  # the latest while none serves yet
            try:
                rev = self._revisions.get(rev_id)
                if rev is None:
                    rev = self.registry.get_revision(rev_id)
                    if rev is None:  # deleted while we read
                        continue
                policy = getattr(rev.scaling, "prewarm", None) or self.default_policy
                view = FunctionView(fn.name, rev.scaling, str(policy))
            except RedisError:
                raise  # the tick's: Redis away is not one function's problem
            except Exception as exc:
                if fn.name not in self._unreadable:
                    self._unreadable.add(fn.name)
                    log.warning(
                        "revision %s of %s cannot be read (%s); %s",
                        rev_id,
                        fn.name,
                        f"{type(exc).__name__}: {exc}",
                        "planned with the revision read before" if fn.name in self._last else "not planned",
                    )
                if fn.name in self._last:
                    views.append(last.setdefault(fn.name, self._last[fn.name]))
                continue
            if fn.name in self._unreadable:
                self._unreadable.discard(fn.name)
                log.info("revision %s of %s reads again", rev_id, fn.name)
            known[rev_id] = rev
            last[fn.name] = view
            views.append(view)
        self._revisions = known
        self._last = last
        self._unreadable &= {fn.name for fn in listed}  # a deleted one is logged afresh if it comes back
        return views


class Controller:
    """One pre-warm controller. `make_policy(text)` builds a policy from its text (by default the
    policies registry's); a policy is made once per distinct text and kept. A text it refuses (only
    data written around `kold deploy`'s check gets here) is logged once and `default_policy` used."""

    def __init__(
        self,
        store: DemandStore,
        functions: FunctionSource,
        actuator: Actuator,
        lease: Lease,
        *,
        make_policy: Callable[[str], Policy] = make_policy,
        default_policy: str = DEFAULT_POLICY,
        tick_s: float = 1.0,
        clock: Callable[[], float] = time.time,
        metrics: ControllerMetrics | None = None,
        reassert_s: float = 30.0,
    ) -> None:
        if not (math.isfinite(tick_s) and tick_s > 0):
            raise ValueError(f"tick_s must be a positive number of seconds, not {tick_s}")
        self.store = store
        # the histories folded while this controller holds the lease, read from Redis once per holding
        self.histories = HeldHistories(store)
        self.functions = functions
        self.actuator = actuator
        self.lease = lease
        self.make_policy = make_policy
        self.default_policy = default_policy
        self.tick_s = float(tick_s)
        self.clock = clock
        self.metrics = metrics if metrics is not None else ControllerMetrics()
        self.reassert_s = reassert_s
        # a sent floor the policy extends is sent again once it has less than this left: two ticks
        self.refresh_margin_s = 2 * self.tick_s
        self._policies: dict[str, Policy] = {}
        self._bad_policies: set[str] = set()
        self._failing_plans: set[str] = set()
        self._views: dict[str, FunctionView] = {}
        self._sent: dict[str, tuple[Floor, float]] = {}  # function -> (floor delivered, when)
        # functions whose floor at the gateway is known since this controller took the lease: for the
        # others a previous holder may have left one, so a plan that holds nothing still clears once
        self._known: set[str] = set()
        self._acting = False
        self._redis_down = False
        self._failing = False
        self._recheck_at: float | None = None
        self._poked: set[str] = set()
        # arrivals pokes told of, per function, until the folded history covers them: (Unix time, concurrency)
        self._pending: dict[str, list[tuple[float, int]]] = {}
        self._wake = asyncio.Event()

    @property
    def recheck_at(self) -> float | None:
        """The earliest time a plan of the last pass asked to be asked again (a pre-warm falling due
        before the next tick); `run` wakes then."""
        return self._recheck_at

    # -- the loop ----------------------------------------------------------------------------------

    def poke(self, function: str, arrival: float | None = None, concurrency: int = 1) -> None:
        """Decide for `function` now, not at the next tick (the gateway calls it, on the event loop,
        when a request finds the function with no ready instance). Never blocks.

        `arrival` (Unix time) and `concurrency` are that request's: the gateway records a request only
        once it finishes, so until its record is folded the plans observe it into a copy of the
        function's history (never stored: the record is counted when it comes, once)."""
        if arrival is not None:
            if not (isinstance(arrival, int | float) and math.isfinite(arrival)):
                raise ValueError(f"a poke's arrival must be a finite Unix time, not {arrival!r}")
            if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
                raise ValueError(f"a poke's concurrency must be a whole number >= 1, not {concurrency!r}")
            pending = self._pending.setdefault(function, [])
            pending.append((float(arrival), concurrency))
            if len(pending) > MAX_PENDING or pending[0][0] < arrival - PENDING_S:
                self._pending[function] = [p for p in pending[-MAX_PENDING:] if p[0] >= arrival - PENDING_S]
        self._poked.add(function)
        self._wake.set()

    async def run(self) -> None:
        """Tick every `tick_s` (sooner when a plan asked to be rechecked) and serve pokes in between,
        until cancelled; then give the lease up so that another controller takes over at once."""
        loop = asyncio.get_running_loop()
        try:
            while True:
                await self._guarded(self.tick_once(self.clock()))
                wait_s = self.tick_s
                if self._recheck_at is not None and self._recheck_at > (now := self.clock()):
                    wait_s = min(wait_s, self._recheck_at - now)  # a past one (a pass cut short) waits the tick
                deadline = loop.time() + wait_s
                while (remaining := deadline - loop.time()) > 0:
                    try:
                        # asyncio.timeout, not wait_for: on 3.11 wait_for swallows a cancel that comes
                        # as the event is set (a poke, then shutdown), and the loop would go on
                        async with asyncio.timeout(remaining):
                            await self._wake.wait()
                    except TimeoutError:
                        break
                    self._wake.clear()
                    poked, self._poked = self._poked, set()
                    await self._guarded(self.decide_now(poked, self.clock()))
        finally:
            await self._give_up_lease()

    async def _guarded(self, work: Coroutine[Any, Any, list[Action]]) -> None:
        """A pass that fails for any other reason than Redis (a bug, a garbled revision, a cluster
        away) is logged, once until a pass succeeds again, and the loop goes on: the controller must
        not die silently inside `kold up`. A `OneLineError` is logged as its line, without a traceback."""
        try:
            await work
        except OneLineError as exc:
            if not self._failing:
                self._failing = True
                log.warning(
                    "a pre-warm controller pass failed: %s; trying again next tick",
                    exc,
                    exc_info=log.isEnabledFor(logging.DEBUG),  # its traceback only for debugging
                )
            return
        except Exception:
            if not self._failing:
                self._failing = True
                log.exception("a pre-warm controller pass failed; trying again next tick")
            return
        if self._failing:
            self._failing = False
            log.info("the pre-warm controller's passes succeed again")

    async def tick_once(self, now: float) -> list[Action]:
        """One pass over every function at `now`, if this controller holds the lease."""
        # this pass's plans set it again; a pass cut short (lease lost, Redis away) must not leave an
        # old one behind, or `run` would find it past and tick back to back
        self._recheck_at = None
        try:
            if not await self._hold_lease(now):
                return []
            views = await asyncio.to_thread(self.functions.list)
            actions: list[Action] = []
            gone = [name for name in self._views if name not in {v.name for v in views}]
            self._views = {v.name: v for v in views}
            for name in gone:
                actions.append(await self._forget(name))
            actions += await self._decide(views, now)
            self._redis_back()
            return actions
        except RedisError as exc:
            self._redis_failed(exc)
            return []

    async def decide_now(self, functions: Iterable[str], now: float) -> list[Action]:
        """Decide for these functions at once (a poke), if this controller holds the lease. No lease
        call: the tick keeps it, and the local view says whether it is still ours."""
        if not self.lease.held(now):
            return []
        names = set(functions)
        try:
            if names - self._views.keys():  # a function deployed since the last tick
                self._views = {v.name: v for v in await asyncio.to_thread(self.functions.list)}
            views = [self._views[n] for n in sorted(names) if n in self._views]
            actions = await self._decide(views, now) if views else []
            self._redis_back()
            return actions
        except RedisError as exc:
            self._redis_failed(exc)
            return []

    # -- the lease ---------------------------------------------------------------------------------

    async def _hold_lease(self, now: float) -> bool:
        try:
            held = await asyncio.to_thread(self.lease.try_acquire, now)
        except RedisError:
            self._set_acting(False, now)  # a lease we cannot renew may soon be another's
            raise
        self._set_acting(held, now)
        return held

    def _set_acting(self, held: bool, now: float) -> None:
        if held and not self._acting:
            log.info("pre-warm controller %s holds the lease %s: deciding floors", self.lease.holder_id, self.lease.key)
            # what the gateway holds now is not known (another controller may have set floors):
            # every floor a policy holds is sent afresh, and every one it does not is cleared once
            self._sent.clear()
            self._known.clear()
            self._views = {}
            self.histories.clear()  # another holder may have folded since: Redis has the latest
        elif not held and self._acting:
            log.info("pre-warm controller %s no longer holds the lease: it stops acting", self.lease.holder_id)
            self.histories.clear()  # unwritten folds are not ours to write now; the next holder redoes them
        self._acting = held
        self.metrics.lease_held.set(1 if held else 0)

    async def _give_up_lease(self) -> None:
        try:
            if self._acting and self.lease.held(self.clock()):
                await asyncio.to_thread(self.histories.flush)  # the next holder starts from the latest folds
        except RedisError as exc:
            log.warning("could not write the folded demand back (%s): the next holder folds it again", exc)
        self._set_acting(False, self.clock())
        try:
            await asyncio.to_thread(self.lease.release)
        except RedisError as exc:
            log.warning("could not release the controller lease (%s): it expires in %g s", exc, self.lease.ttl_s)

    # -- deciding ----------------------------------------------------------------------------------

    async def _decide(self, views: list[FunctionView], now: float) -> list[Action]:
        """Fold and plan off the event loop (Redis reads, and the policies' arithmetic), then act."""
        pending = self._pending_arrivals(now)  # a copy: pokes add to the table meanwhile, on the loop
        planned = await asyncio.to_thread(self._plan_all, views, pending, now)
        actions: list[Action] = []
        for view, policy, plan, covered in planned:
            if covered is not None and view.name in self._pending:  # folded now: the record counts them
                left = [p for p in self._pending[view.name] if p[0] > covered]
                if left:
                    self._pending[view.name] = left
                else:
                    del self._pending[view.name]
            if plan is None:
                continue
            if plan.recheck_at is not None and plan.recheck_at > now:
                self._recheck_at = (
                    plan.recheck_at if self._recheck_at is None else min(self._recheck_at, plan.recheck_at)
                )
            floor = plan.floor
            if len(floor.reason) > MAX_REASON_LEN:  # the most the gateway takes: a longer reason is cut
                floor = replace(floor, reason=floor.reason[: MAX_REASON_LEN - 1] + "…")
            action = await self._apply(view.name, policy, floor, now)
            if action is not None:
                actions.append(action)
        return actions

    def _pending_arrivals(self, now: float) -> dict[str, tuple[tuple[float, int], ...]]:
        """The poked arrivals still waiting for their records (older than PENDING_S dropped)."""
        for function in list(self._pending):
            left = [p for p in self._pending[function] if p[0] >= now - PENDING_S]
            if left:
                self._pending[function] = left
            else:
                del self._pending[function]
        return {function: tuple(arrivals) for function, arrivals in self._pending.items()}

    def _plan_all(
        self, views: list[FunctionView], pending: dict[str, tuple[tuple[float, int], ...]], now: float
    ) -> list[tuple[FunctionView, str, Plan | None, float | None]]:
        """Each function's plan, with the last arrival its folded history covers (None: unknown)."""
        out: list[tuple[FunctionView, str, Plan | None, float | None]] = []
        for view in views:
            policy = self._policy(view.policy)
            covered: float | None = None
            try:
                history = self.histories.fold(view.name, now)
                covered = -math.inf if history.last_arrival is None else history.last_arrival
                unfolded = sorted(p for p in pending.get(view.name, ()) if p[0] > covered)
                if unfolded:  # a throwaway copy: the held (and stored) history never sees them
                    history = copy.deepcopy(history)
                    for arrival, concurrency in unfolded:
                        history.observe(arrival, concurrency)
                plan = policy.plan(view.name, history, view.spec, now)
            except RedisError:
                raise  # ends the tick
            except Exception:  # one broken policy or function must not stop the others' decisions
                if view.name not in self._failing_plans:
                    self._failing_plans.add(view.name)
                    log.exception(
                        "the plan failed for %s (policy %s); its floor is left as it is", view.name, view.policy
                    )
                out.append((view, policy.name, None, covered))
                continue
            self._failing_plans.discard(view.name)
            out.append((view, policy.name, plan, covered))
        return out

    def _policy(self, text: str) -> Policy:
        policy = self._policies.get(text)
        if policy is None:
            try:
                policy = self.make_policy(text)
            except ValueError as exc:  # deploys validate it: only data from elsewhere gets here
                if text not in self._bad_policies:
                    self._bad_policies.add(text)
                    log.warning("pre-warm policy %r: %s; using %s", text, exc, self.default_policy)
                policy = self._policies.get(self.default_policy) or self.make_policy(self.default_policy)
            self._policies[text] = policy
        return policy

    async def _apply(self, function: str, policy: str, floor: Floor, now: float) -> Action | None:
        """Send `floor` if the gateway's differs in what matters; the Action taken, or None."""
        sent_floor, sent_at = self._sent.get(function, (None, 0.0))
        if sent_floor is not None and not sent_floor.holds(now):
            sent_floor = None  # it ran out at the gateway by itself
            self._sent.pop(function, None)
        # a floor of 0 instances still matters while it shortens the keep-alive (an instance unloaded
        # right after its request, to be pre-warmed later)
        holds = floor.holds(now) and (floor.instances > 0 or floor.idle_timeout_s is not None)
        if not holds:
            if sent_floor is None and function in self._known:
                return None
            if not await self.actuator.set_floor(function, None):
                return None  # not delivered (the actuator logged it): tried again next tick
            self._sent.pop(function, None)
            self._known.add(function)
            if sent_floor is None:  # not a decision: whatever a previous lease holder left is gone
                log.debug("%s: floor cleared on taking the lease (%s)", function, floor.reason)
            else:
                self.metrics.decided(function, policy, raised=False)
                log.info("%s: floor cleared (%s)", function, floor.reason)
            return Action(function, CLEAR, None, policy)
        kind = self._change(sent_floor, sent_at, floor, now)
        if kind is None:
            return None
        if not await self.actuator.set_floor(function, floor):
            return None  # the floor sent before (if any) stays the one to compare with: retried next tick
        self._sent[function] = (floor, now)
        self._known.add(function)
        if kind == SET:
            raised = floor.instances > (sent_floor.instances if sent_floor is not None else 0)
            self.metrics.decided(function, policy, raised=raised)
            keep = "" if floor.idle_timeout_s is None else f", idle timeout {floor.idle_timeout_s:g} s"
            log.info(
                "%s: floor %d instance%s for %.0f s%s (%s)",
                function,
                floor.instances,
                "" if floor.instances == 1 else "s",
                floor.until - now,
                keep,
                floor.reason,
            )
        else:
            log.debug("%s: floor %d sent again, until %.3f (%s)", function, floor.instances, floor.until, floor.reason)
        return Action(function, kind, floor, policy)

    def _change(self, sent: Floor | None, sent_at: float, new: Floor, now: float) -> str | None:
        """SET when the new floor differs from the one sent, REFRESH when only its end must be sent
        again, None when the gateway's floor is as good."""
        if sent is None or sent.instances != new.instances or sent.idle_timeout_s != new.idle_timeout_s:
            return SET
        if new.until < sent.until - self.tick_s:
            return SET  # it ends sooner: the gateway would hold it too long
        if new.until > sent.until and sent.until - now <= self.refresh_margin_s:
            return REFRESH  # extended, and the one sent is about to run out
        if now - sent_at >= self.reassert_s:
            return REFRESH
        return None

    async def _forget(self, function: str) -> Action:
        log.info("%s left the registry: its floor is cleared and its demand records dropped", function)
        self._sent.pop(function, None)
        self._known.discard(function)
        self._pending.pop(function, None)
        self.histories.drop(function)
        await self.actuator.set_floor(function, None)  # not delivered: the function is gone anyway
        await asyncio.to_thread(self.store.forget, function)
        self.metrics.forget(function)
        return Action(function, FORGET, None, "")

    # -- Redis errors ------------------------------------------------------------------------------

    def _redis_failed(self, exc: RedisError) -> None:
        self.metrics.redis_errors.inc()
        if not self._redis_down:
            self._redis_down = True
            log.warning(
                "the pre-warm controller cannot reach Redis (%s): floors already set hold until they end; "
                "trying again every tick",
                exc or type(exc).__name__,
            )

    def _redis_back(self) -> None:
        if self._redis_down:
            self._redis_down = False
            log.info("the pre-warm controller reaches Redis again")
