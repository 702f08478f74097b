"""The gateway as clients and operators rely on it: clients that leave, the OpenAI model routes, one
Date header, request ids, the error table, metrics, and bounded state under a long churn of instances.
Real redis, real runtime subprocesses, uvicorn on loopback."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from gateway_helpers import RUNTIME, Served, deploy, deploy_and_wait

from kold.gateway.errors import error_response
from kold.gateway.pool import FINISHED_KEPT_PER_REVISION, InstancePool, InstanceState
from kold.gateway.registry import Registry, RuntimeSpec, ScalingSpec

pytestmark = pytest.mark.redis

# a well-formed snapshot URI that names nothing: its instances fail to restore, so a request holds
MISSING_SNAPSHOT = "file:///nonexistent-kold-store/snapshots/" + "0" * 32


def _wait_for(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def _metric(text: str, name: str) -> float:
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " ")]
    assert values, f"{name} not in the metrics"
    return values[0]


def test_a_held_request_whose_client_leaves_is_no_longer_counted(
    registry: Registry, serve: Callable[..., Served]
) -> None:
    deploy(registry, "never", MISSING_SNAPSHOT, request_timeout_s=120, max_instances=1)
    s = serve(registry)
    body = {"model": "never", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    with pytest.raises(httpx.ReadTimeout):
        s.http.post("/v1/chat/completions", json=body, timeout=httpx.Timeout(1.5, connect=5))
    gw = s.app.state.gateway
    _wait_for(lambda: gw.functions["never"].waiting == 0, 5, "the held request is still counted")
    assert _metric(s.http.get("/metrics").text, "kold_gateway_waiting") == 0.0
    assert 'status="499"' in s.http.get("/metrics").text  # counted as a request the client closed


def test_a_client_that_leaves_a_non_streamed_request_cancels_the_generation(
    registry: Registry, serve: Callable[..., Served], tiny_snapshot: str
) -> None:
    s = serve(registry)
    deploy_and_wait(s, "long", tiny_snapshot)
    [inst] = [i for i in s.app.state.gateway.pool.instances() if i.state is InstanceState.READY]
    cancelled = "kold_cancelled_generations_total"
    before = _metric(httpx.get(f"{inst.url}/metrics").text, cancelled)
    # 120 tokens of a tiny model take a while on a busy CPU; the client gives up long before that
    body = {"model": "long", "prompt": "hello", "max_tokens": 120, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        s.http.post("/v1/completions", json=body, timeout=httpx.Timeout(0.05, connect=5))
    _wait_for(
        lambda: _metric(httpx.get(f"{inst.url}/metrics").text, cancelled) > before,
        10,
        "the runtime never saw the cancellation",
    )
    _wait_for(lambda: inst.in_flight == 0, 5, "the slot was not freed")


def test_openai_model_routes_date_header_and_request_id(
    registry: Registry, serve: Callable[..., Served], tiny_snapshot: str
) -> None:
    deploy(registry, "tiny", tiny_snapshot, request_timeout_s=60)
    s = serve(registry)
    client = openai.OpenAI(base_url=f"{s.url}/v1", api_key="unused", http_client=httpx.Client(trust_env=False))
    model = client.models.retrieve("tiny")
    assert model.id == "tiny" and model.owned_by == "kold" and model.created > 0
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")
    # the per-function base URL that `kold deploy` prints answers the models routes too
    own = openai.OpenAI(
        base_url=f"{s.url}/v1/functions/tiny/v1", api_key="unused", http_client=httpx.Client(trust_env=False)
    )
    assert [m.id for m in own.models.list()] == ["tiny"]
    assert own.models.retrieve("tiny").id == "tiny"
    assert s.http.get("/v1/functions/tiny/v1/models/other").status_code == 404
    assert s.http.get("/v1/functions/Not_A_Name/v1/models").status_code == 404

    body = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
    r = s.http.post("/v1/completions", json=body, headers={"X-Request-Id": "trace-42"})
    assert r.status_code == 200, r.text
    assert len(r.headers.get_list("date")) == 1, r.headers
    assert r.headers["x-request-id"] == "trace-42"
    pool = s.app.state.gateway.pool  # served behind the restore it is still cold: wait for READY
    _wait_for(lambda: any(i.state is InstanceState.READY for i in pool.instances()), 60, "never ready")
    # a request id that is not a plain token (it would go into log lines) is replaced by one of ours
    r = s.http.post("/v1/completions", json=body, headers={"X-Request-Id": "a b\tc"})
    assert r.headers["x-request-id"] not in ("a b\tc", "") and len(r.headers["x-request-id"]) == 32
    with s.http.stream("POST", "/v1/completions", json={**body, "stream": True}) as streamed:
        assert len(streamed.headers.get_list("date")) == 1 and len(streamed.headers["x-request-id"]) == 32
        streamed.read()

    metrics = s.http.get("/metrics").text
    assert "_created" not in metrics
    # the first was cold (it started the instance), the other two warm
    seen = [line for line in metrics.splitlines() if line.startswith("kold_gateway_request") and "_bucket" not in line]
    assert 'kold_gateway_request_duration_seconds_count{cold="1",function="tiny"} 1.0' in metrics, seen
    assert 'kold_gateway_request_duration_seconds_count{cold="0",function="tiny"} 2.0' in metrics, seen
    assert 'kold_gateway_requests_total{cold="0",function="tiny",status="200"} 2.0' in metrics, seen
    r = s.http.post("/v1/completions", json={**body, "model": "nope"})
    assert r.status_code == 404
    # a name that is no function is counted without its name: clients cannot grow the label set
    assert 'kold_gateway_requests_total{cold="0",function="",status="404"} 1.0' in s.http.get("/metrics").text


def test_admin_input_errors_are_4xx_and_internal_errors_a_logged_json_500(
    registry: Registry, serve: Callable[..., Served], caplog: pytest.LogCaptureFixture
) -> None:
    s = serve(registry)
    uri = "file:///x/snapshots/" + "1" * 32
    cases: list[tuple[dict[str, Any], str]] = [
        ({"snapshot_uri": "not a uri"}, "not a snapshot URI"),
        ({"snapshot_uri": uri, "scaling": {"max_instances": 0}}, "max_instances"),
        ({"snapshot_uri": uri, "scaling": {"warp": 9}}, "takes only these fields"),
        ({"snapshot_uri": uri, "scaling": "fast"}, "must be a JSON object"),
        ({"snapshot_uri": uri, "runtime": {"device": "tpu"}}, "device"),
    ]
    for body, message in cases:
        r = s.http.post("/admin/functions/fn/revisions", json=body)
        assert r.status_code == 400 and message in r.json()["error"]["message"], (body, r.text)
    r = s.http.post("/admin/functions/Bad_Name/revisions", json={"snapshot_uri": uri})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_name"
    r = s.http.post("/admin/functions/ghost/rollback", json={})
    assert r.status_code == 404, r.text
    deploy(registry, "one", uri)
    r = s.http.post("/admin/functions/one/rollback", json={})
    assert r.status_code == 409 and "no revision before" in r.json()["error"]["message"]

    # an unexpected ValueError inside is no client error: 500, with nothing of it in the body, logged
    with caplog.at_level("ERROR", logger="kold.gateway.errors"):
        response = error_response(ValueError("secret internals"))
    assert response.status_code == 500 and b"secret internals" not in response.body
    assert any(r.exc_info and "secret internals" in str(r.exc_info[1]) for r in caplog.records)


def test_a_long_churn_of_instances_leaves_bounded_state(tmp_path: Path) -> None:
    """Every start of a revision whose process exits at once (here: `false` as the interpreter) ends
    FAILED; hundreds of them must not grow the pool's table beyond the kept few."""

    class Rev:
        function = "churn"
        revision_id = "churn-00001"
        snapshot_uri = MISSING_SNAPSHOT
        runtime = RuntimeSpec()

    async def churn() -> tuple[int, int]:
        pool = InstancePool(tmp_path / "logs", python="/bin/false", start_method="spawn")
        for _ in range(200):
            inst = await pool.start(Rev())
            assert inst._waiter is not None
            await inst._waiter
        kept = len(pool.instances())
        pool.forget_revision(Rev.revision_id)
        left = len(pool.instances())
        await pool.close(1)
        return kept, left

    kept, left = asyncio.run(churn())
    assert kept <= FINISHED_KEPT_PER_REVISION + 1 and left == 0


def test_deleting_a_function_forgets_what_the_gateway_kept_for_it(
    registry: Registry, serve: Callable[..., Served], tiny_snapshot: str
) -> None:
    s = serve(registry)
    deploy_and_wait(s, "gone", tiny_snapshot)
    body = {"model": "gone", "prompt": "hi", "max_tokens": 1}
    assert s.http.post("/v1/completions", json=body).status_code == 200
    assert s.http.delete("/admin/functions/gone").status_code == 200
    gw = s.app.state.gateway
    assert "gone" not in gw.functions and not gw.pool.instances() and not gw._idle_since
    assert not [r for r in gw._revisions if r.startswith("gone-")]
    assert 'function="gone"' not in s.http.get("/metrics").text


def test_a_stream_cut_by_a_dying_instance_ends_with_an_error_event_and_done(
    registry: Registry, serve: Callable[..., Served], tiny_snapshot: str
) -> None:
    s = serve(registry)
    deploy_and_wait(s, "dies", tiny_snapshot)
    [inst] = [i for i in s.app.state.gateway.pool.instances() if i.state is InstanceState.READY]
    body = {"model": "dies", "prompt": "hello", "max_tokens": 120, "ignore_eos": True, "stream": True}
    events: list[str] = []
    with s.http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line:
                continue
            events.append(line)
            if len(events) == 1:
                assert inst.process is not None
                inst.process.kill()  # the instance dies mid-answer
    assert events[-1] == "data: [DONE]", events[-3:]
    error = json.loads(events[-2].removeprefix("data: "))["error"]
    assert error["code"] == "stream_cut" and "failed mid-answer" in error["message"]
    assert all(e.startswith("data: ") for e in events)  # every event whole: none cut in the middle
    assert 'kold_gateway_streams_cut_total{function="dies"} 1.0' in s.http.get("/metrics").text


def test_a_corrupt_snapshot_marks_its_revision_failed_with_back_off_and_a_rollback_recovers(
    registry: Registry, serve: Callable[..., Served], tmp_path: Path
) -> None:
    from kold.modelgen import write_random_model
    from kold.snapshot import build_snapshot
    from kold.snapshot.store import data_key

    good_dir = write_random_model(tmp_path / "good", "llama", "tiny", seed=5)
    bad_dir = write_random_model(tmp_path / "bad", "llama", "tiny", seed=6)
    store = (tmp_path / "store").as_uri()
    good = build_snapshot(good_dir, store, chunk_size=64 << 10)
    bad = build_snapshot(bad_dir, store, chunk_size=64 << 10)
    with open(tmp_path / "store" / data_key(bad.manifest.id), "r+b") as f:  # one byte of chunk 1, flipped
        f.seek(bad.manifest.chunk(1).offset + 7)
        byte = f.read(1)
        f.seek(bad.manifest.chunk(1).offset + 7)
        f.write(bytes([byte[0] ^ 0xFF]))

    s = serve(registry)
    deploy_and_wait(s, "flaky", good.uri)
    rev = registry.create_revision(
        "flaky", bad.uri, scaling=ScalingSpec(request_timeout_s=60), runtime=RuntimeSpec(**RUNTIME)
    )
    registry.set_traffic("flaky", rev.revision_id)  # traffic to the corrupt revision
    s.app.state.gateway.invalidate("flaky")
    body = {"model": "flaky", "prompt": "hi", "max_tokens": 2}
    r = s.http.post("/v1/completions", json=body)  # held while its starts fail, then told why
    assert r.status_code == 503, r.text
    error = r.json()["error"]
    assert error["code"] == "snapshot_corrupted" and "chunk 1" in error["message"], error
    assert int(r.headers["retry-after"]) >= 1
    # further requests fail at once with the same cause, and do not start an instance each
    starts = len(s.app.state.gateway.pool.instances(rev.revision_id))
    for _ in range(6):
        again = s.http.post("/v1/completions", json=body)
        assert again.status_code == 503 and again.json()["error"]["code"] == "snapshot_corrupted"
        time.sleep(0.25)
    assert len(s.app.state.gateway.pool.instances(rev.revision_id)) <= starts + 1  # backed off
    described = s.http.get("/admin/functions/flaky").json()
    [bad_rev] = [x for x in described["revisions"] if x["id"] == rev.revision_id]
    assert bad_rev["start_failure"]["failed"] and bad_rev["start_failure"]["code"] == "snapshot_corrupted"
    assert any((i["failure"] or {}).get("code") == "snapshot_corrupted" for i in described["instances"])
    assert s.http.get("/admin/functions").json()["functions"][0]["failed"] == "snapshot_corrupted"
    # a rollback to the good revision recovers it
    assert s.http.post("/admin/functions/flaky/rollback", json={}).status_code == 200
    assert s.http.post("/v1/completions", json=body).status_code == 200


def test_key_scopes_auth_that_stays_on_and_instances_only_the_gateway_may_call(
    registry: Registry, serve: Callable[..., Served], tiny_snapshot: str
) -> None:
    s = serve(registry)
    deploy_and_wait(s, "guarded", tiny_snapshot)
    admin = s.http.post("/admin/keys", json={"label": "ops"}).json()  # the first key: admin by default
    as_admin = {"Authorization": f"Bearer {admin['secret']}"}
    assert admin["scope"] == "admin"
    app_key = s.http.post("/admin/keys", json={"label": "app", "scope": "invoke"}, headers=as_admin).json()
    as_app = {"Authorization": f"Bearer {app_key['secret']}"}
    body = {"model": "guarded", "prompt": "hi", "max_tokens": 2}
    assert s.http.post("/v1/completions", json=body, headers=as_app).status_code == 200
    # an invoke key may not mint keys, delete functions or read logs: 403, the SDK's PermissionDeniedError
    for method, path in [("POST", "/admin/keys"), ("DELETE", "/admin/functions/guarded"), ("GET", "/admin/keys")]:
        r = s.http.request(method, path, json={} if method == "POST" else None, headers=as_app)
        assert r.status_code == 403 and r.json()["error"]["code"] == "insufficient_scope", (path, r.text)
    assert s.http.get("/admin/functions/guarded", headers=as_admin).status_code == 200
    r = s.http.post("/admin/keys", json={"scope": "root"}, headers=as_admin)
    assert r.status_code == 400 and "scope" in r.json()["error"]["message"]

    # the last admin key cannot go while an invoke key remains; the last key only when auth is turned off
    r = s.http.delete(f"/admin/keys/{admin['key_id']}", headers=as_admin)
    assert r.status_code == 409 and "last admin key" in r.json()["error"]["message"]
    assert s.http.delete(f"/admin/keys/{app_key['key_id']}", headers=as_admin).status_code == 200
    r = s.http.delete(f"/admin/keys/{admin['key_id']}", headers=as_admin)
    assert r.status_code == 409 and "turns authentication off" in r.json()["error"]["message"]
    assert s.http.post("/v1/completions", json=body).status_code == 401  # still on
    r = s.http.delete(f"/admin/keys/{admin['key_id']}", params={"disable_auth": "1"}, headers=as_admin)
    assert r.status_code == 200
    assert s.http.post("/v1/completions", json=body).status_code == 200  # turned off, explicitly

    # the instance's own port answers its gateway only
    [inst] = [i for i in s.app.state.gateway.pool.instances() if i.state is InstanceState.READY]
    r = httpx.post(f"{inst.url}/v1/completions", json={**body, "model": "guarded"}, trust_env=False)
    assert r.status_code == 401 and r.json()["error"]["code"] == "instance_token_required"
    token = s.app.state.gateway.pool.instance_headers
    r = httpx.post(f"{inst.url}/v1/completions", json={**body, "model": "guarded"}, headers=token, trust_env=False)
    assert r.status_code == 200, r.text
    assert httpx.get(f"{inst.url}/readyz", trust_env=False).status_code == 200  # probes stay open


def test_metrics_can_be_put_behind_a_key(registry: Registry, tmp_path: Path) -> None:
    from gateway_helpers import instance_env

    from kold.gateway.app import build_app

    pool = InstancePool(tmp_path / "logs", env=instance_env(tmp_path))
    s = Served(build_app(registry, pool, require_keys=True, metrics_need_key=True))
    try:
        key = registry.create_key("scraper", "admin")
        assert s.http.get("/metrics").status_code == 401
        assert s.http.get("/metrics", headers={"Authorization": f"Bearer {key.secret}"}).status_code == 200
        assert s.http.get("/healthz").status_code == 200
    finally:
        s.close()


def test_the_pool_starts_no_instance_that_does_not_fit_the_node(
    registry: Registry, tiny_snapshot: str, tmp_path: Path
) -> None:
    """A node of 2 CPUs and instances of 1 CPU each: a burst that wants 4 instances gets 2, every request
    is served by them; another function waits for room, gets a 503 that says why at its timeout, and
    starts once the first scales in. A revision that can never fit is refused at deploy."""
    from gateway_helpers import instance_env

    from kold.gateway.app import build_app
    from kold.gateway.capacity import NodeCapacity

    pool = InstancePool(tmp_path / "logs", env=instance_env(tmp_path))
    s = Served(build_app(registry, pool, require_keys=False, capacity=NodeCapacity(cpus=2, memory_bytes=8 << 30)))
    try:
        rev = registry.create_revision(
            "wide",
            tiny_snapshot,
            scaling=ScalingSpec(max_instances=4, target_concurrency=1, idle_timeout_s=2, request_timeout_s=60),
            runtime=RuntimeSpec(**RUNTIME, cpus=1.0),
        )
        registry.set_traffic("wide", rev.revision_id)
        body = {"model": "wide", "prompt": "hi", "max_tokens": 8, "ignore_eos": True}
        with ThreadPoolExecutor(8) as ex:
            results = list(ex.map(lambda _: s.http.post("/v1/completions", json=body), range(8)))
        assert [r.status_code for r in results] == [200] * 8, [r.text for r in results if r.status_code != 200]
        assert len({r.headers["x-kold-instance"] for r in results}) == 2
        assert len(pool.instances(rev.revision_id)) == 2  # not 4: the node has room for 2

        other = registry.create_revision(
            "other",
            tiny_snapshot,
            scaling=ScalingSpec(request_timeout_s=1),
            runtime=RuntimeSpec(**RUNTIME, cpus=1.0),
        )
        registry.set_traffic("other", other.revision_id)
        r = s.http.post("/v1/completions", json={**body, "model": "other"})
        assert r.status_code == 503 and "no room on this node" in r.json()["error"]["message"], r.text
        assert "Retry-After" in r.headers and not pool.instances(other.revision_id)
        _wait_for(lambda: not [i for i in pool.instances(rev.revision_id) if i.alive], 30, "wide did not scale in")
        patient = registry.create_revision(
            "other", tiny_snapshot, scaling=ScalingSpec(request_timeout_s=60), runtime=RuntimeSpec(**RUNTIME, cpus=1.0)
        )
        registry.set_traffic("other", patient.revision_id)
        s.app.state.gateway.invalidate("other")
        r = s.http.post("/v1/completions", json={**body, "model": "other"}, timeout=60)
        assert r.status_code == 200, r.text

        huge = {"snapshot_uri": tiny_snapshot, "runtime": {**RUNTIME, "memory_bytes": 64 << 30}}
        r = s.http.post("/admin/functions/huge/revisions", json=huge)
        assert r.status_code == 400 and "can never fit" in r.json()["error"]["message"], r.text
    finally:
        s.close()


def test_no_instance_scales_in_while_its_function_has_a_backlog(registry: Registry, tmp_path: Path) -> None:
    """Two idle instances past their idle timeout beside a busy one: while two requests are held for the
    function, all three are needed (target_concurrency 1) and none scales in; once the backlog is gone,
    the idle ones do."""
    from kold.gateway.activator import Gateway
    from kold.gateway.pool import Instance

    uri = "file:///x/snapshots/" + "2" * 32
    rev = registry.create_revision(
        "busy", uri, scaling=ScalingSpec(max_instances=3, target_concurrency=1, idle_timeout_s=1)
    )
    registry.set_traffic("busy", rev.revision_id)

    async def scenario() -> list[str]:
        pool = InstancePool(tmp_path / "logs")
        gw = Gateway(registry, pool)
        await gw.serving_revision("busy")
        insts = []
        for n in (1, 2, 3):
            inst = Instance(id=f"{rev.revision_id}-{n}", revision_id=rev.revision_id, port=0, url="", log_path=tmp_path)
            inst.state = InstanceState.READY
            pool._register(inst)
            insts.append(inst)
        insts[0].in_flight = 1
        for inst in insts[1:]:
            gw._idle_since[inst.id] = time.monotonic() - 10
        gw.state("busy").waiting = 2
        gw.scale_once()
        held = [i.state.value for i in insts]
        gw.state("busy").waiting = 0
        gw.scale_once()
        await asyncio.gather(*gw._starts)
        return held + [i.state.value for i in insts]

    states = asyncio.run(scenario())
    assert states[:3] == ["ready"] * 3, states  # a backlog: nobody is idle
    assert states[3] == "ready" and states[4:] == ["stopped", "stopped"], states


def test_scale_to_zero_on_demand_makes_the_next_request_cold(
    registry: Registry, serve: Callable[..., Served], tiny_snapshot: str
) -> None:
    s = serve(registry)
    deploy_and_wait(s, "zero", tiny_snapshot)  # idle timeout 60 s: it would stay warm
    body = {"model": "zero", "prompt": "hi", "max_tokens": 2}
    assert s.http.post("/v1/completions", json=body).headers["x-kold-cold"] == "0"
    r = s.http.post("/admin/functions/zero/scale-to-zero")
    assert r.status_code == 200 and r.json() == {"function": "zero", "stopped": 1}
    assert not [i for i in s.app.state.gateway.pool.instances() if i.alive]
    again = s.http.post("/v1/completions", json=body)
    assert again.status_code == 200 and again.headers["x-kold-cold"] == "1"
    assert s.http.post("/admin/functions/nope/scale-to-zero").status_code == 404
