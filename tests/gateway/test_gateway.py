"""The gateway app end to end: real redis, real runtime subprocesses, uvicorn on a loopback port."""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest
from gateway_helpers import Served, deploy, deploy_and_wait

from kold.controller.demand import DemandStore
from kold.gateway.registry import Registry

pytestmark = pytest.mark.redis


def chat(s: Served, name: str, **extra: Any) -> httpx.Response:
    body = {"model": name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, **extra}
    return s.http.post("/v1/chat/completions", json=body)


def live_instances(s: Served) -> list[Any]:
    pool = s.app.state.gateway.pool
    return [i for i in pool.instances() if i.state.value in ("starting", "ready")]


def test_scale_from_zero_then_warm_then_to_zero(
    registry: Registry, serve: Callable[..., Served], tiny_snapshot: str
) -> None:
    deploy(registry, "tiny", tiny_snapshot, idle_timeout_s=1.5, request_timeout_s=60)
    s = serve(registry)
    r = chat(s, "tiny")
    assert r.status_code == 200, r.text
    assert r.headers["x-kold-cold"] == "1" and r.headers["x-kold-instance"].startswith("tiny-")
    assert r.json()["choices"][0]["message"]["role"] == "assistant"
    r2 = s.http.post("/v1/functions/tiny/v1/completions", json={"model": "x", "prompt": "hello", "max_tokens": 2})
    assert r2.status_code == 200, r2.text
    assert r2.headers["x-kold-cold"] == "0" and r2.headers["x-kold-instance"] == r.headers["x-kold-instance"]
    # the openai client, streaming
    client = openai.OpenAI(base_url=f"{s.url}/v1", api_key="unused", http_client=httpx.Client(trust_env=False))
    chunks = list(
        client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3, stream=True
        )
    )
    assert chunks and all(c.object == "chat.completion.chunk" for c in chunks)
    desc = s.http.get("/admin/functions/tiny").json()
    assert desc["instances"][0]["state"] == "ready" and desc["instances"][0]["cold_start"]["event"] == "startup"
    metrics = s.http.get("/metrics").text
    assert 'kold_gateway_requests_total{cold="1",function="tiny",status="200"} 1.0' in metrics
    assert 'kold_gateway_requests_total{cold="0",function="tiny",status="200"} 2.0' in metrics
    assert 'kold_gateway_wait_seconds_count{cold="1",function="tiny"} 1.0' in metrics
    assert 'kold_gateway_instances{function="tiny",state="ready"} 1.0' in metrics
    # scale to zero after the idle timeout
    deadline = time.monotonic() + 15
    while live_instances(s):
        assert time.monotonic() < deadline, "did not scale to zero"
        time.sleep(0.2)
    metrics = s.http.get("/metrics").text
    ready = [
        line
        for line in metrics.splitlines()
        if line.startswith('kold_gateway_instances{function="tiny",state="ready"}')
    ]
    assert ready in ([], ['kold_gateway_instances{function="tiny",state="ready"} 0.0'])
    assert 'kold_gateway_instance_stops_total{function="tiny"} 1.0' in metrics
    # invocations recorded off the critical path, through the demand store on the registry's Redis
    demand = DemandStore(registry.redis, registry.prefix)
    deadline = time.monotonic() + 5
    while len(demand.invocations("tiny")) < 3:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    first, *warm = demand.invocations("tiny")
    assert first.cold and first.outcome == "ok" and not any(r.cold for r in warm)
    # the non-streamed answers carry usage; the stream asked for none
    assert first.tokens_in is not None and first.tokens_in > 0 and first.tokens_out is not None
    assert (warm[-1].tokens_in, warm[-1].tokens_out) == (None, None)
    assert [r.concurrency for r in (first, *warm)] == [1, 1, 1]
    [cold_start] = demand.cold_starts("tiny")
    assert cold_start.revision.startswith("tiny-") and cold_start.total_s > 0


def test_burst_at_cold_function_scales_out_to_what_it_needs_and_spreads_evenly(
    registry: Registry, serve: Callable[..., Served], tiny_snapshot: str
) -> None:
    """20 concurrent requests at a cold function with target_concurrency 4 need 5 instances; max_instances
    caps that at 2. Exactly 2 start (a gateway that never scaled out, or started more, fails), no request
    fails, and the two share the burst evenly instead of the first one up taking most of it. Each request
    generates 96 tokens, so the burst outlasts the ~0.1 s between the two instances becoming ready."""
    requests, target, cap = 20, 4, 2
    deploy(registry, "burst", tiny_snapshot, max_instances=cap, target_concurrency=target, request_timeout_s=90)
    s = serve(registry)
    with ThreadPoolExecutor(requests) as ex:
        results = list(ex.map(lambda _: chat(s, "burst", max_tokens=96, ignore_eos=True), range(requests)))
    assert [r.status_code for r in results] == [200] * requests, [r.text for r in results if r.status_code != 200]
    needed = min(cap, math.ceil(requests / target))
    started = [i.id for i in s.app.state.gateway.pool.instances()]
    assert len(started) == needed, started
    assert f'kold_gateway_instance_starts_total{{function="burst"}} {needed}.0' in s.http.get("/metrics").text
    served = Counter(r.headers["x-kold-instance"] for r in results)
    assert sorted(served) == sorted(started), served  # every instance started took a share
    share = requests / needed
    assert all(abs(n - share) <= share / 4 for n in served.values()), f"uneven spread: {dict(served)}"


def test_errors_and_auth(registry: Registry, serve: Callable[..., Served]) -> None:
    s = serve(registry)
    r = chat(s, "nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = s.http.post("/v1/chat/completions", content=b"{not json")
    assert r.status_code == 400 and "error" in r.json()
    assert s.http.get("/admin/functions").status_code == 200  # no keys: open
    secret = s.http.post("/admin/keys", json={"label": "t"}).json()["secret"]
    time.sleep(0.1)
    r = s.http.get("/admin/functions")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert s.http.get("/admin/functions", headers={"Authorization": "Bearer kold_wrong"}).status_code == 401
    assert s.http.get("/admin/functions", headers={"Authorization": f"Bearer {secret}"}).status_code == 200
    assert s.http.get("/healthz").status_code == 200
    # a key revoked through the gateway stops working at once there (its recent check is not reused)
    second = s.http.post("/admin/keys", json={"label": "u"}, headers={"Authorization": f"Bearer {secret}"}).json()
    assert s.http.get("/admin/functions", headers={"Authorization": f"Bearer {second['secret']}"}).status_code == 200
    revoked = s.http.delete(f"/admin/keys/{second['key_id']}", headers={"Authorization": f"Bearer {secret}"})
    assert revoked.status_code == 200, revoked.text
    assert s.http.get("/admin/functions", headers={"Authorization": f"Bearer {second['secret']}"}).status_code == 401


def test_require_keys_closes_without_keys(registry: Registry, serve: Callable[..., Served]) -> None:
    s = serve(registry, require_keys=True)
    assert s.http.get("/v1/models").status_code == 401


def test_deploy_new_revision_then_rollback(
    registry: Registry, serve: Callable[..., Served], tiny_snapshot: str
) -> None:
    s = serve(registry)
    first = deploy_and_wait(s, "fn", tiny_snapshot)
    assert chat(s, "fn").headers["x-kold-instance"].startswith(first + "-")
    second = deploy_and_wait(s, "fn", tiny_snapshot)
    assert registry.get_function("fn").serving_revision == second  # type: ignore[union-attr]
    resp = chat(s, "fn")
    assert resp.headers["x-kold-instance"].startswith(second + "-") and resp.headers["x-kold-cold"] == "0"
    r = s.http.post("/admin/functions/fn/rollback", json={})
    assert r.json()["serving"] == first
    assert chat(s, "fn").headers["x-kold-instance"].startswith(first + "-")
    logs = s.http.get("/admin/functions/fn/logs?tail=5").json()["instances"]
    assert len(logs) == 2 and all(entry["log"] for entry in logs)
    assert s.http.delete("/admin/functions/fn").status_code == 200
    assert registry.get_function("fn") is None and not live_instances(s)


def test_crashed_instance_is_replaced(registry: Registry, serve: Callable[..., Served], tiny_snapshot: str) -> None:
    deploy(registry, "crash", tiny_snapshot, request_timeout_s=60)
    s = serve(registry)
    first = chat(s, "crash")
    assert first.status_code == 200, first.text
    (inst,) = live_instances(s)
    assert inst.process is not None
    inst.process.kill()
    deadline = time.monotonic() + 10
    while inst.state.value != "failed":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    r = chat(s, "crash")
    assert r.status_code == 200, r.text
    assert r.headers["x-kold-instance"] != inst.id and r.headers["x-kold-cold"] == "1"


def test_prewarm_starts_an_instance_before_demand(
    registry: Registry, serve: Callable[..., Served], tiny_snapshot: str
) -> None:
    """The controller's actuator: an instance started ahead of the request makes the request warm."""
    deploy(registry, "early", tiny_snapshot, max_instances=2, idle_timeout_s=60, request_timeout_s=60)
    s = serve(registry)
    assert s.http.post("/admin/functions/early/prewarm", json={"instances": 5}).json()["started"] == 2  # capped
    assert s.http.post("/admin/functions/early/prewarm", json={"instances": 1}).json()["started"] == 0
    deadline = time.monotonic() + 60
    while not [i for i in live_instances(s) if i.state.value == "ready"]:
        assert time.monotonic() < deadline, "prewarmed instance never became ready"
        time.sleep(0.1)
    r = chat(s, "early")
    assert r.status_code == 200 and r.headers["x-kold-cold"] == "0"
    bad = s.http.post("/admin/functions/early/prewarm", json={"instances": "many"})
    assert bad.status_code == 400
    assert s.http.post("/admin/functions/nope/prewarm", json={}).status_code == 404


def test_a_controller_floor_starts_a_real_instance_ahead_of_the_request(
    registry: Registry, serve: Callable[..., Served], tiny_snapshot: str
) -> None:
    """The pre-warm controller speaks to the gateway through floors only (set_floor, or this PUT from
    another process): the instance a floor starts serves the next request warm, a pre-warm hit."""
    deploy(registry, "floored", tiny_snapshot, idle_timeout_s=60, request_timeout_s=60)
    s = serve(registry)
    r = s.http.put("/admin/functions/floored/floor", json={"instances": 1, "ttl_s": 120, "reason": "forecast"})
    assert r.status_code == 200, r.text
    deadline = time.monotonic() + 60
    while not [i for i in live_instances(s) if i.state.value == "ready"]:
        assert time.monotonic() < deadline, "the floor's instance never became ready"
        time.sleep(0.1)
    r = chat(s, "floored")
    assert r.status_code == 200 and r.headers["x-kold-cold"] == "0"
    metrics = s.http.get("/metrics").text
    assert 'kold_gateway_prewarm_starts_total{function="floored"} 1.0' in metrics
    assert 'kold_gateway_prewarm_hits_total{function="floored"} 1.0' in metrics
