"""The admin API's floor endpoints (what `kold controller`'s HTTP actuator calls) and what `describe`
shows of pre-warming, against a served gateway app whose instances have no process
(gateway_fakes.FakePool) and the session's real redis-server."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from gateway_fakes import FakePool
from gateway_helpers import Served

from kold.controller.policies.registry import DEFAULT_POLICY
from kold.controller.scaling import Floor
from kold.gateway.activator import Gateway
from kold.gateway.app import build_app
from kold.gateway.floors import MAX_FLOOR_INSTANCES, floor_to_json
from kold.gateway.registry import Registry, RuntimeSpec, ScalingSpec

pytestmark = pytest.mark.redis

URI = "file:///x/snapshots/" + "5" * 32


@pytest.fixture
def served(registry: Registry, tmp_path: Path) -> Iterator[tuple[Served, FakePool]]:
    rev = registry.create_revision("fn", URI, scaling=ScalingSpec(max_instances=3), runtime=RuntimeSpec())
    registry.set_traffic("fn", rev.revision_id)
    pool = FakePool(tmp_path)
    s = Served(build_app(registry, pool, require_keys=False, gateway=Gateway(registry, pool)))
    yield s, pool
    s.close()


def wait_live(pool: FakePool, n: int) -> None:
    deadline = time.monotonic() + 10
    while len(pool.live("fn")) != n:
        assert time.monotonic() < deadline, f"{len(pool.live('fn'))} live instances, not {n}"
        time.sleep(0.02)


def test_a_floor_put_starts_its_instances_at_once_and_reads_back(served: tuple[Served, FakePool]) -> None:
    s, pool = served
    before = time.time()
    r = s.http.put("/admin/functions/fn/floor", json={"instances": 2, "ttl_s": 60, "reason": "periodic"})
    assert r.status_code == 200, r.text
    floor = r.json()["floor"]
    assert floor["instances"] == 2 and floor["reason"] == "periodic" and floor["idle_timeout_s"] is None
    assert before + 60 <= floor["until"] <= time.time() + 60
    wait_live(pool, 2)
    desc = s.http.get("/admin/functions/fn").json()
    assert desc["prewarm"] == DEFAULT_POLICY and desc["floor"] == floor
    metrics = s.http.get("/metrics").text
    assert 'kold_gateway_prewarm_starts_total{function="fn"} 2.0' in metrics
    assert 'kold_gateway_idle_instance_seconds_total{function="fn"}' in metrics
    # an exact Unix `until` and a keep-alive of its own, as the controller sends them
    until = time.time() + 30
    body = {"instances": 1, "until": until, "reason": "forecast", "idle_timeout_s": 5}
    r = s.http.put("/admin/functions/fn/floor", json=body)
    assert r.json()["floor"] == body
    assert s.http.get("/admin/functions/fn").json()["floor"] == body
    # cleared: describe shows none (the instances idle for less than the idle timeout stay)
    r = s.http.delete("/admin/functions/fn/floor")
    assert r.status_code == 200 and r.json() == {"function": "fn", "floor": None}
    assert s.http.get("/admin/functions/fn").json()["floor"] is None
    # a floor whose time has passed holds nothing
    r = s.http.put("/admin/functions/fn/floor", json={"instances": 1, "until": time.time() - 1})
    assert r.status_code == 200 and r.json()["floor"] is None


BAD = [
    ({"instances": "many", "ttl_s": 5}, "instances"),
    ({"instances": -1, "ttl_s": 5}, "instances"),
    ({"instances": True, "ttl_s": 5}, "instances"),
    ({"ttl_s": 5}, "instances"),
    ({"instances": 1}, "until"),
    ({"instances": 1, "until": 2e9, "ttl_s": 5}, "until"),
    ({"instances": 1, "until": "tomorrow"}, "until"),
    ({"instances": 1, "ttl_s": 0}, "ttl_s"),
    ({"instances": 1, "ttl_s": "long"}, "ttl_s"),
    ({"instances": 1, "ttl_s": 5, "reason": 7}, "reason"),
    ({"instances": 1, "ttl_s": 5, "reason": "two\nlines"}, "reason"),
    ({"instances": 1, "ttl_s": 5, "idle_timeout_s": 0}, "idle_timeout_s"),
    ({"instances": 1, "ttl_s": 5, "idle_timeout_s": "soon"}, "idle_timeout_s"),
    ({"instances": 1, "ttl_s": 5, "instnaces": 2}, "instnaces"),
]


@pytest.mark.parametrize(("body", "field"), BAD, ids=[f"{f}: {b}" for b, f in BAD])
def test_a_bad_floor_body_is_a_400_that_names_the_field(
    served: tuple[Served, FakePool], body: dict[str, Any], field: str
) -> None:
    s, pool = served
    r = s.http.put("/admin/functions/fn/floor", json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == field and field in error["message"], error
    assert s.http.get("/admin/functions/fn").json()["floor"] is None and not pool.live("fn")


def test_floor_endpoints_refuse_what_is_not_a_floor_request(served: tuple[Served, FakePool]) -> None:
    s, _ = served
    r = s.http.put("/admin/functions/fn/floor", content=b"[1, 2]")
    assert r.status_code == 400 and "error" in r.json()
    r = s.http.put("/admin/functions/fn/floor", content=b"{not json")
    assert r.status_code == 400 and "error" in r.json()
    assert s.http.put("/admin/functions/nope/floor", json={"instances": 1, "ttl_s": 5}).status_code == 404
    assert s.http.delete("/admin/functions/nope/floor").status_code == 404
    assert s.http.post("/admin/functions/fn/floor", json={}).status_code == 405


def test_floors_need_an_admin_key(served: tuple[Served, FakePool]) -> None:
    s, _ = served
    admin = s.http.post("/admin/keys", json={"label": "a"}).json()["secret"]
    invoke = s.http.post(
        "/admin/keys", json={"label": "i", "scope": "invoke"}, headers={"Authorization": f"Bearer {admin}"}
    ).json()["secret"]
    body = {"instances": 1, "ttl_s": 5}
    assert s.http.put("/admin/functions/fn/floor", json=body).status_code == 401
    r = s.http.put("/admin/functions/fn/floor", json=body, headers={"Authorization": f"Bearer {invoke}"})
    assert r.status_code == 403
    r = s.http.put("/admin/functions/fn/floor", json=body, headers={"Authorization": f"Bearer {admin}"})
    assert r.status_code == 200 and r.json()["floor"]["instances"] == 1
    r = s.http.delete("/admin/functions/fn/floor", headers={"Authorization": f"Bearer {invoke}"})
    assert r.status_code == 403


def test_admin_prewarm_holds_its_instances_with_a_floor(served: tuple[Served, FakePool]) -> None:
    """POST .../prewarm still starts instances ahead of demand, now as a floor for the revision's idle
    timeout: describe shows it, and the scale pass cannot take the instances back meanwhile."""
    s, pool = served
    r = s.http.post("/admin/functions/fn/prewarm", json={"instances": 5})
    assert r.status_code == 202 and r.json() == {"function": "fn", "started": 3}  # max_instances
    wait_live(pool, 3)
    floor = s.http.get("/admin/functions/fn").json()["floor"]
    assert floor["instances"] == 3 and floor["reason"] == "pre-warmed by an admin"
    assert s.http.post("/admin/functions/fn/prewarm", json={"instances": "many"}).status_code == 400


def test_a_revision_names_its_prewarm_policy(served: tuple[Served, FakePool]) -> None:
    s, _ = served
    body = {"snapshot_uri": URI, "scaling": {"prewarm": "fixed-keepalive:minutes=5"}, "wait": True}
    r = s.http.post("/admin/functions/fn/revisions", json=body)
    assert r.status_code == 201, r.text
    desc = s.http.get("/admin/functions/fn").json()
    assert desc["prewarm"] == "fixed-keepalive:minutes=5"
    assert desc["revisions"][-1]["scaling"]["prewarm"] == "fixed-keepalive:minutes=5"
    bad = s.http.post("/admin/functions/fn/revisions", json={**body, "scaling": {"prewarm": "psychic"}})
    assert bad.status_code == 400
    error = bad.json()["error"]
    assert error["param"] == "scaling" and "unknown prewarm policy 'psychic'" in error["message"], error


def test_admin_prewarm_beyond_the_floor_limit_is_a_400_naming_instances(registry: Registry, tmp_path: Path) -> None:
    rev = registry.create_revision("big", URI, scaling=ScalingSpec(max_instances=5000), runtime=RuntimeSpec())
    registry.set_traffic("big", rev.revision_id)
    pool = FakePool(tmp_path)
    s = Served(build_app(registry, pool, require_keys=False, gateway=Gateway(registry, pool)))
    try:
        r = s.http.post("/admin/functions/big/prewarm", json={"instances": 5000})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == "instances" and str(MAX_FLOOR_INSTANCES) in error["message"], error
        assert not pool.live("big") and s.http.get("/admin/functions/big").json()["floor"] is None
    finally:
        s.close()


def test_a_floor_reads_as_json_in_unix_time() -> None:
    assert floor_to_json(Floor(2, 1_700_000_060.0, "forecast", 5.0)) == {
        "instances": 2,
        "until": 1_700_000_060.0,
        "reason": "forecast",
        "idle_timeout_s": 5.0,
    }
