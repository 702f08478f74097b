"""The gateway's scaling on a fake timeline: the scale pass (`scale_once`) and the request path decide
with `controller.scaling.decide`, and the floors the pre-warm controller sets are held by it.

Instances have no process (gateway_fakes.FakePool: READY at once), the registry is the session's
real redis-server, and the gateway's clocks are one `Timeline` the test moves: each step sets the
time, does one thing, runs a scale pass and counts the function's live instances.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
from gateway_fakes import EPOCH, FakePool, Timeline, settle

from kold.controller.scaling import Floor
from kold.gateway.activator import Gateway
from kold.gateway.pool import Instance
from kold.gateway.registry import Registry, RuntimeSpec, ScalingSpec

pytestmark = pytest.mark.redis

URI = "file:///x/snapshots/" + "3" * 32


def deploy(registry: Registry, name: str = "fn", **scaling: Any) -> str:
    rev = registry.create_revision(name, URI, scaling=ScalingSpec(**scaling), runtime=RuntimeSpec())
    registry.set_traffic(name, rev.revision_id)
    return rev.revision_id


@dataclass(frozen=True)
class Step:
    """At `t`: do one thing ("pass": nothing but the scale pass), then `live` instances must run."""

    t: float
    do: str
    live: int
    instances: int = 0  # floor: how many
    ttl: float = 0.0  # floor: until t + ttl
    idle: float | None = None  # floor: its idle timeout
    n: int = 1  # hold: how many requests


@dataclass(frozen=True)
class Case:
    name: str
    steps: tuple[Step, ...]
    spec: dict[str, Any] = field(default_factory=dict)


CASES = [
    Case(
        "an admin's scale to zero holds against the controller's floor until the function's next request",
        (
            Step(0, "floor", 1, instances=1, ttl=300),
            Step(1, "zero", 0),
            Step(2, "floor", 0, instances=1, ttl=300),  # the controller re-sends it: a measurement must find it cold
            Step(3, "request", 1),
            Step(4, "floor", 1, instances=1, ttl=300),  # after a request, floors count again
            Step(100, "pass", 1),
        ),
        {"idle_timeout_s": 10},
    ),
    Case(
        "with no floor and no minimum an idle instance goes after idle_timeout",
        (Step(0, "request", 1), Step(9.9, "pass", 1), Step(10, "pass", 0)),
        {"idle_timeout_s": 10},
    ),
    Case(
        "the reaper keeps what a floor holds past idle_timeout, and scales to zero when the floor expires",
        (Step(0, "floor", 2, instances=2, ttl=60), Step(30, "pass", 2), Step(59.9, "pass", 2), Step(60, "pass", 0)),
        {"idle_timeout_s": 10},
    ),
    Case(
        "a pre-warmed instance is held by the floor, not marked as just used: its idle time counts from READY",
        (Step(0, "floor", 1, instances=1, ttl=5), Step(5, "pass", 1), Step(9.9, "pass", 1), Step(10, "pass", 0)),
        {"idle_timeout_s": 10},
    ),
    Case(
        "a floor expiring leaves a recently used instance until its own idle_timeout",
        (
            Step(0, "floor", 1, instances=1, ttl=20),
            Step(15, "request", 1),
            Step(20, "pass", 1),
            Step(24.9, "pass", 1),
            Step(25, "pass", 0),
        ),
        {"idle_timeout_s": 10},
    ),
    Case(
        "clearing a floor applies at once",
        (Step(0, "floor", 2, instances=2, ttl=100), Step(20, "clear", 0)),
        {"idle_timeout_s": 10},
    ),
    Case(
        "a floor's own idle_timeout scales in the instances above it sooner than the spec's",
        (
            Step(0, "floor", 1, instances=1, ttl=100, idle=2),
            Step(1, "hold", 3, n=3),
            Step(5, "release", 3),
            Step(6.9, "pass", 3),
            Step(7, "pass", 1),
            Step(99, "pass", 1),
            Step(100, "pass", 0),
        ),
        {"idle_timeout_s": 60, "target_concurrency": 1},
    ),
    Case(
        "min_instances holds from the first pass and under an expired floor",
        (Step(0, "pass", 1), Step(0, "floor", 3, instances=3, ttl=30), Step(29, "pass", 3), Step(30, "pass", 1)),
        {"idle_timeout_s": 10, "min_instances": 1},
    ),
    Case(
        "a floor is capped at max_instances",
        (Step(0, "floor", 2, instances=5, ttl=30),),
        {"idle_timeout_s": 10, "max_instances": 2},
    ),
    Case(
        "a floor follows the function to its new serving revision, and the old revision's idle instance goes",
        (Step(0, "floor", 1, instances=1, ttl=100), Step(3, "deploy", 2), Step(9.9, "pass", 2), Step(10, "pass", 1)),
        {"idle_timeout_s": 10},
    ),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_scaling_timeline(case: Case, registry: Registry, tmp_path: Path) -> None:
    deploy(registry, **case.spec)

    async def scenario() -> list[int]:
        tl = Timeline()
        pool = FakePool(tmp_path)
        gw = Gateway(registry, pool, clock=tl.clock, wall=tl.wall)
        await gw.serving_revision("fn")
        held: list[Instance] = []
        seen = []
        for step in case.steps:
            tl.t = step.t
            if step.do == "floor":
                gw.set_floor("fn", Floor(step.instances, EPOCH + step.t + step.ttl, "test", step.idle))
            elif step.do == "clear":
                gw.set_floor("fn", None)
            elif step.do == "request":
                inst, *_ = await gw.acquire("fn")
                gw.release(inst)
            elif step.do == "hold":
                for _ in range(step.n):
                    held.append((await gw.acquire("fn"))[0])
            elif step.do == "release":
                for inst in held:
                    gw.release(inst)
                held.clear()
            elif step.do == "zero":
                rev = await gw.serving_revision("fn")
                await gw.scale_to_zero("fn", [rev.revision_id])
            elif step.do == "deploy":
                await asyncio.to_thread(deploy, registry, **case.spec)
                gw.invalidate("fn")
                await settle(gw)
            gw.scale_once()
            await settle(gw)
            seen.append(len(pool.live("fn")))
        await gw.close()
        return seen

    seen = asyncio.run(scenario())
    assert seen == [s.live for s in case.steps], [
        (s.t, s.do, s.live, got) for s, got in zip(case.steps, seen, strict=True)
    ]


def test_floor_reads_back_in_unix_time_until_it_expires(registry: Registry, tmp_path: Path) -> None:
    """The controller speaks Unix time: what it set reads back unchanged, whatever the gateway's clock."""
    deploy(registry)

    async def scenario() -> None:
        tl = Timeline(5000.0)  # the monotonic clock is nowhere near the wall clock
        gw = Gateway(registry, FakePool(tmp_path), clock=tl.clock, wall=tl.wall)
        await gw.serving_revision("fn")
        floor = Floor(1, tl.wall() + 30, "periodic arrivals", 5.0)
        gw.set_floor("fn", floor)
        assert gw.floor("fn") == floor and gw.floor("other") is None
        tl.t += 29.9
        assert gw.floor("fn") == floor
        tl.t += 0.1
        assert gw.floor("fn") is None
        with pytest.raises(ValueError, match="instances must be an integer"):
            gw.set_floor("fn", Floor(1.5, tl.wall() + 30, "x"))  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="idle_timeout_s"):
            gw.set_floor("fn", Floor(1, tl.wall() + 30, "x", 0.0))
        with pytest.raises(ValueError, match="function name"):
            gw.set_floor("Not A Name", Floor(1, tl.wall() + 30, "x"))
        await settle(gw)
        await gw.close()

    asyncio.run(scenario())


def test_a_floor_set_before_the_function_was_seen_applies_once_it_is_read(registry: Registry, tmp_path: Path) -> None:
    deploy(registry)

    async def scenario() -> int:
        tl = Timeline()
        pool = FakePool(tmp_path)
        gw = Gateway(registry, pool, clock=tl.clock, wall=tl.wall)
        gw.set_floor("fn", Floor(2, tl.wall() + 60, "test"))
        await settle(gw)
        live = len(pool.live("fn"))
        await gw.close()
        return live

    assert asyncio.run(scenario()) == 2


def test_min_instances_apply_from_start_up(registry: Registry, tmp_path: Path) -> None:
    """Gateway.start() reads every function's serving revision and scales it: instances of a function
    with min_instances run before its first request; a function without one stays at zero."""
    deploy(registry, "always", min_instances=2)
    deploy(registry, "lazy")

    async def scenario() -> tuple[int, int]:
        pool = FakePool(tmp_path)
        gw = Gateway(registry, pool)
        await gw.start()
        for _ in range(200):
            if len(pool.live("always")) == 2:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.3)  # a scale pass or more: nothing else starts
        counts = len(pool.live("always")), len(pool.live("lazy"))
        await gw.close()
        return counts

    assert asyncio.run(scenario()) == (2, 0)


class FlakyRegistry(Registry):
    """A registry whose Redis is away for the first `down` reads of the function list."""

    def __init__(self, client: redis.Redis, prefix: str, down: int) -> None:
        super().__init__(client, prefix)
        self.down = down

    def list_functions(self) -> list[Any]:
        if self.down:
            self.down -= 1
            raise redis.ConnectionError("Redis is away (test)")
        return super().list_functions()


def test_start_up_tolerates_redis_being_away_and_applies_min_instances_once_it_is_back(
    registry: Registry, tmp_path: Path
) -> None:
    deploy(registry, "always", min_instances=1)
    flaky = FlakyRegistry(registry.redis, registry.prefix, down=2)

    async def scenario() -> int:
        pool = FakePool(tmp_path)
        gw = Gateway(flaky, pool)
        await gw.start()  # does not wait for, nor fail on, Redis
        for _ in range(300):
            if pool.live("always"):
                break
            await asyncio.sleep(0.02)
        live = len(pool.live("always"))
        await gw.close()
        return live

    assert asyncio.run(scenario()) == 1
    assert flaky.down == 0  # both failed reads were retried


def test_a_request_at_a_function_with_no_ready_instance_pokes_the_controller_with_its_arrival(
    registry: Registry, tmp_path: Path
) -> None:
    """The poke carries what the request's record will say (its Unix arrival, its concurrency at
    arrival), so the controller can plan with it before the record is written."""
    deploy(registry, "fn")
    deploy(registry, "other")

    async def scenario() -> tuple[list[tuple[str, float, int]], list[tuple[float, int]]]:
        pokes: list[tuple[str, float, int]] = []
        tl = Timeline(3.0)
        pool = FakePool(tmp_path)
        gw = Gateway(registry, pool, clock=tl.clock, wall=tl.wall, on_cold=lambda f, at, n: pokes.append((f, at, n)))
        await gw.serving_revision("fn")
        pool.gate = asyncio.Event()  # the start takes a while: both requests arrive before it is READY
        calls = [gw.begin("fn"), gw.begin("fn")]
        held = [asyncio.create_task(gw.acquire("fn", call=c)) for c in calls]
        await asyncio.sleep(0.01)
        pool.gate.set()
        for inst, *_ in await asyncio.gather(*held):
            gw.release(inst)
        tl.t = 4.0
        inst, *_ = await gw.acquire("fn", call=gw.begin("fn"))  # a READY instance: no poke
        gw.release(inst)
        gw.set_floor("other", Floor(1, gw.wall() + 60, "pre-warmed"))
        await settle(gw)
        inst, *_ = await gw.acquire("other")  # pre-warmed: warm, no poke
        gw.release(inst)
        await gw.close()
        return pokes, [(c.arrival, c.concurrency) for c in calls]

    pokes, records = asyncio.run(scenario())
    assert pokes == [("fn", EPOCH + 3.0, 1), ("fn", EPOCH + 3.0, 2)]
    assert [(at, n) for _, at, n in pokes] == records


def test_a_poke_that_fails_does_not_fail_the_request(registry: Registry, tmp_path: Path) -> None:
    deploy(registry, "fn")

    def broken(function: str, arrival: float, concurrency: int) -> None:
        raise RuntimeError("the controller is broken")

    async def scenario() -> bool:
        gw = Gateway(registry, FakePool(tmp_path), on_cold=broken)
        inst, _, cold, _ = await gw.acquire("fn")
        gw.release(inst)
        await gw.close()
        return cold

    assert asyncio.run(scenario())


def test_prewarm_and_idle_metrics(registry: Registry, tmp_path: Path) -> None:
    """Starts a floor asked for count as pre-warms (reactive ones do not); a pre-warmed instance's
    first request is one hit (its later ones are not); idle instance-seconds add up from READY, stop
    while a request runs, and are counted at scrapes and scale passes."""
    deploy(registry, "fn", idle_timeout_s=100, target_concurrency=1)

    async def scenario() -> dict[str, float | None]:
        tl = Timeline()
        gw = Gateway(registry, FakePool(tmp_path), clock=tl.clock, wall=tl.wall)
        await gw.serving_revision("fn")
        gw.set_floor("fn", Floor(1, tl.wall() + 1000, "test"))  # a pre-warm start at 0
        await settle(gw)
        tl.t = 5
        gw.refresh_metrics()  # 5 idle seconds so far
        first, *_ = await gw.acquire("fn")  # the pre-warmed instance: a hit
        second, *_ = await gw.acquire("fn")  # a reactive start (target 1): no pre-warm
        tl.t = 7
        gw.release(first)  # first idle again from 7; second idle from 7 too
        gw.release(second)
        again, *_ = await gw.acquire("fn")  # the pre-warmed one again: no second hit
        tl.t = 8
        gw.release(again)
        tl.t = 10
        gw.scale_once()  # counts up to 10
        sample = gw.metrics.get_sample_value
        labels = {"function": "fn"}
        out = {
            "starts": sample("kold_gateway_prewarm_starts_total", labels),
            "hits": sample("kold_gateway_prewarm_hits_total", labels),
            "idle": sample("kold_gateway_idle_instance_seconds_total", labels),
            "all_starts": sample("kold_gateway_instance_starts_total", labels),
        }
        await gw.close()
        return out

    got = asyncio.run(scenario())
    # idle: instance 1 from 0 to 5, then 8 to 10 (busy 5-8, as its second request took it at 7);
    # instance 2 from 7 (READY at 5 but busy at once) to 10
    assert got == {"starts": 1.0, "hits": 1.0, "idle": 5 + 2 + 3, "all_starts": 2.0}, got


def test_a_request_that_waits_for_a_scale_out_start_is_cold_though_another_instance_was_ready(
    registry: Registry, tmp_path: Path
) -> None:
    """Cold means what it means in the simulator: the instance that took the request became READY
    after the request arrived (it waited for a start), whatever else was READY meanwhile."""
    deploy(registry, "fn", target_concurrency=1, max_instances=2)

    async def scenario() -> list[tuple[bool, float]]:
        tl = Timeline()
        pool = FakePool(tmp_path)
        gw = Gateway(registry, pool, clock=tl.clock, wall=tl.wall)
        first, _, first_cold, first_wait = await gw.acquire("fn")  # READY at 0, as it arrived
        tl.t = 1.0
        pool.gate = asyncio.Event()
        second = asyncio.create_task(gw.acquire("fn"))  # the READY one is busy: a start for it
        await asyncio.sleep(0.01)
        tl.t = 3.0
        pool.gate.set()
        inst, _, second_cold, second_wait = await second
        gw.release(first)
        gw.release(inst)
        tl.t = 4.0
        _, _, third_cold, third_wait = await gw.acquire("fn")  # READY before it arrived: warm
        await gw.close()
        return [(first_cold, first_wait), (second_cold, second_wait), (third_cold, third_wait)]

    assert asyncio.run(scenario()) == [(True, 0.0), (True, 2.0), (False, 0.0)]


def test_idle_instance_seconds_count_the_start_as_the_simulator_does(registry: Registry, tmp_path: Path) -> None:
    """An instance is idle while it is alive with nothing in flight, from when its start was asked for:
    the seconds it spends starting count, as in the simulator, up to the request that takes it."""
    deploy(registry, "fn", idle_timeout_s=100)

    async def scenario() -> list[float]:
        tl = Timeline()
        pool = FakePool(tmp_path)
        gw = Gateway(registry, pool, clock=tl.clock, wall=tl.wall)
        await gw.serving_revision("fn")
        pool.gate = asyncio.Event()
        gw.set_floor("fn", Floor(1, tl.wall() + 1000, "test"))  # asked for at 0
        await asyncio.sleep(0.01)
        tl.t = 2.0
        gw.refresh_metrics()  # starting since 0
        seen = [gw.metrics.get_sample_value("kold_gateway_idle_instance_seconds_total", {"function": "fn"}) or 0.0]
        tl.t = 3.0
        pool.gate.set()  # READY at 3
        await settle(gw)
        tl.t = 5.0
        inst, *_ = await gw.acquire("fn")  # busy from 5 to 6
        tl.t = 6.0
        gw.release(inst)
        tl.t = 10.0
        gw.scale_once()
        seen.append(gw.metrics.get_sample_value("kold_gateway_idle_instance_seconds_total", {"function": "fn"}) or 0.0)
        await gw.close()
        return seen

    assert asyncio.run(scenario()) == [2.0, 5.0 + 4.0]


def test_one_garbled_revision_does_not_stop_start_up_scaling_of_the_others(
    registry: Registry, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    garbled = deploy(registry, "broken", min_instances=1)
    registry.redis.set(registry._rev_key(garbled), "{not json")
    deploy(registry, "always", min_instances=1)

    async def scenario() -> int:
        pool = FakePool(tmp_path)
        gw = Gateway(registry, pool)
        await gw.start()
        for _ in range(200):
            if pool.live("always"):
                break
            await asyncio.sleep(0.02)
        live = len(pool.live("always"))
        await gw.close()
        return live

    assert asyncio.run(scenario()) == 1
    assert any("broken" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records), caplog.text


class CountingRegistry(Registry):
    """A registry that counts the reads of a function."""

    def __init__(self, client: redis.Redis, prefix: str) -> None:
        super().__init__(client, prefix)
        self.reads = 0

    def get_function(self, name: str) -> Any:
        self.reads += 1
        return super().get_function(name)


def test_a_floor_for_a_deleted_function_is_dropped_and_its_function_not_reread_more_than_once_a_second(
    registry: Registry, tmp_path: Path
) -> None:
    """Deleting a function drops its floor; a floor that arrives after (a controller's tick in flight)
    holds nothing and its function, which the registry says does not exist, is read again at most once
    a second by the scale pass (every 0.25 s), not at every pass."""
    rev_id = deploy(registry, "gone")
    counting = CountingRegistry(registry.redis, registry.prefix)

    async def scenario() -> tuple[Floor | None, int, int]:
        tl = Timeline()
        pool = FakePool(tmp_path)
        gw = Gateway(counting, pool, clock=tl.clock, wall=tl.wall)
        await gw.serving_revision("gone")
        gw.set_floor("gone", Floor(1, tl.wall() + 60, "test"))
        await settle(gw)
        await asyncio.to_thread(counting.delete_function, "gone")
        await gw.stop_function("gone", [rev_id])
        dropped = gw.floor("gone")
        counting.reads = 0
        gw.set_floor("gone", Floor(1, tl.wall() + 60, "late"))  # read once: it does not exist
        await settle(gw)
        for k in range(1, 9):  # 2 s of scale passes
            tl.t = k * 0.25
            gw.scale_once()
            await settle(gw)
        live = len(pool.live("gone"))
        await gw.close()
        return dropped, counting.reads, live

    dropped, reads, live = asyncio.run(scenario())
    assert dropped is None and live == 0
    assert reads == 3, reads  # at 0 (the floor), 1 and 2


def test_removing_a_function_stops_what_its_floor_started_while_it_drained(registry: Registry, tmp_path: Path) -> None:
    """The floor goes before the drain, so no scale pass starts an instance of a function being removed;
    a start already under way is stopped too, and a floor sent meanwhile is ignored."""
    rev_id = deploy(registry)

    async def scenario() -> list[Instance]:
        tl = Timeline()
        pool = FakePool(tmp_path)
        gw = Gateway(registry, pool, clock=tl.clock, wall=tl.wall)
        await gw.serving_revision("fn")
        gw.set_floor("fn", Floor(1, tl.wall() + 300, "test"))
        await settle(gw)
        removal = asyncio.ensure_future(gw.stop_function("fn", [rev_id]))
        gw.set_floor("fn", Floor(2, tl.wall() + 300, "late"))  # the controller has not noticed yet
        gw.scale_once()
        await removal
        await settle(gw)
        live = pool.live("fn")
        await gw.close()
        return live

    assert asyncio.run(scenario()) == []
