"""kold.knative.service: a function's Knative Service, rendered and read back (pure, no cluster).

What is rendered must be what Knative's API server accepts: every variant is validated against
Knative's own CRD schema and the webhook's annotation rules with the validators of
tests/manifests/test_manifests.py (imported, so both test files check the same rules).
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from manifests.test_manifests import all_errors, go_duration_s

from kold.knative import names
from kold.knative.service import (
    MAX_SCALE_UNLIMITED,
    FunctionDeploy,
    InvalidFunctionError,
    container_concurrency,
    cpu_quantity,
    floor_of,
    memory_quantity,
    parse_go_duration,
    progress_deadline_s,
    render_service,
    scaling_of,
)

GIB = 1 << 30


def deploy(**changes: Any) -> FunctionDeploy:
    base = FunctionDeploy(
        name="tiny",
        image="registry.example/kold-runtime:1",
        snapshot_uri="s3://models/prod/snapshots/abc123",
        snapshot_id="abc123",
        snapshot_bytes=3 * GIB,
        namespace="ml",
        memory_bytes=6 * GIB,
        redis_url="redis://kold-redis:6379/0",
    )
    return dataclasses.replace(base, **changes)


def template(svc: dict[str, Any]) -> dict[str, Any]:
    return svc["spec"]["template"]


def container(svc: dict[str, Any]) -> dict[str, Any]:
    (c,) = template(svc)["spec"]["containers"]
    return c


def env(svc: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container(svc)["env"]}


VARIANTS = {
    "cpu, node cache": {},
    "cuda, node cache": {"device": "cuda"},
    "cpu, private tier": {"node_cache": False},
    "cuda, private tier, no redis": {"device": "cuda", "node_cache": False, "redis_url": None},
    "no memory, fractional cpus, prewarm": {"memory_bytes": None, "cpus": 1.5, "prewarm": "hybrid-histogram"},
    "min = max, long idle, huge snapshot": {
        "min_instances": 3,
        "max_instances": 3,
        "idle_timeout_s": 3600,
        "snapshot_bytes": 140 * 10**9,
    },
}


@pytest.mark.parametrize("changes", VARIANTS.values(), ids=list(VARIANTS))
def test_every_rendered_service_passes_knatives_crd_schema_and_webhook_rules(changes: dict[str, Any]) -> None:
    assert all_errors(render_service(deploy(**changes))) == []


def test_the_validators_do_catch_a_broken_render() -> None:
    # the check above can fail: the same validators refuse a rendered Service once it is broken
    svc = copy.deepcopy(render_service(deploy()))
    template(svc)["metadata"]["annotations"][names.MIN_SCALE] = "9"
    container(svc)["replicas"] = 2
    errors = all_errors(svc)
    assert any("min-scale" in e for e in errors) and any("replicas" in e for e in errors)


def test_labels_and_annotations_follow_the_shared_names() -> None:
    svc = render_service(deploy(prewarm="forecast:budget=300"))
    labels = {"app.kubernetes.io/part-of": "kold", "kold.dev/function": "tiny"}
    assert svc["apiVersion"] == "serving.knative.dev/v1" and svc["kind"] == "Service"
    assert svc["metadata"]["name"] == "tiny" and svc["metadata"]["namespace"] == "ml"
    assert svc["metadata"]["labels"] == labels and template(svc)["metadata"]["labels"] == labels
    assert svc["metadata"]["annotations"] == {
        "kold.dev/snapshot-uri": "s3://models/prod/snapshots/abc123",
        "kold.dev/snapshot-id": "abc123",
        "kold.dev/snapshot-bytes": str(3 * GIB),
        "kold.dev/prewarm": "forecast:budget=300",
    }
    # a Revision says which snapshot it serves
    assert template(svc)["metadata"]["annotations"]["kold.dev/snapshot-uri"] == "s3://models/prod/snapshots/abc123"
    assert "kold.dev/prewarm" not in render_service(deploy())["metadata"]["annotations"]  # absent: the default


def test_the_scaling_flags_become_kpa_annotations_and_timeouts() -> None:
    svc = render_service(
        deploy(min_instances=1, max_instances=7, target_concurrency=5, idle_timeout_s=90.5, request_timeout_s=120)
    )
    a = template(svc)["metadata"]["annotations"]
    assert a["autoscaling.knative.dev/class"] == "kpa.autoscaling.knative.dev"
    assert a["autoscaling.knative.dev/metric"] == "concurrency"
    assert (a["autoscaling.knative.dev/min-scale"], a["autoscaling.knative.dev/max-scale"]) == ("1", "7")
    assert a["autoscaling.knative.dev/target"] == "5"
    assert a["autoscaling.knative.dev/scale-down-delay"] == "91s"  # whole seconds, rounded up
    assert a["autoscaling.knative.dev/initial-scale"] == "1"
    assert go_duration_s(a["autoscaling.knative.dev/window"]) == 60
    spec = template(svc)["spec"]
    assert spec["timeoutSeconds"] == 120 and spec["responseStartTimeoutSeconds"] == 120
    assert spec["containerConcurrency"] == 10  # twice the target


@pytest.mark.parametrize(("target", "max_batch", "expected"), [(4, 8, 8), (8, 8, 16), (1, 1, 2), (2, 32, 32)])
def test_container_concurrency_is_twice_the_target_and_at_least_a_batch(
    target: int, max_batch: int, expected: int
) -> None:
    assert container_concurrency(target, max_batch) == expected


def test_the_runtime_container_serves_the_snapshot_by_the_knative_contract() -> None:
    svc = render_service(deploy(max_batch=4))
    c = container(svc)
    assert c["image"] == "registry.example/kold-runtime:1"
    assert c["args"][:8] == [
        "runtime",
        "serve",
        "--snapshot",
        "s3://models/prod/snapshots/abc123",
        "--host",
        "0.0.0.0",
        "--device",
        "cpu",
    ]
    assert c["args"][c["args"].index("--max-batch") + 1] == "4"
    assert c["args"][c["args"].index("--served-model-name") + 1] == "tiny"  # OpenAI clients use model=tiny
    assert "PORT" not in env(svc)  # Knative sets it from containerPort
    assert c["ports"] == [{"name": "http1", "containerPort": 8080}]
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["envFrom"] == [{"secretRef": {"name": "kold-s3"}}]
    assert env(svc)["KOLD_REDIS_URL"] == "redis://kold-redis:6379/0"
    assert c["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False


def test_the_last_pods_retention_is_rendered_as_the_manifests_template_sets_it() -> None:
    """Zero: the idle timeout and the pre-warm floors decide how long an idle pod stays, and a
    cluster-wide retention must not add to it; manifests/base/function.yaml says the same."""
    rendered = template(render_service(deploy()))["metadata"]["annotations"]
    manifest = yaml.safe_load((Path(__file__).parents[2] / "manifests" / "base" / "function.yaml").read_text())
    by_hand = template(manifest)["metadata"]["annotations"]
    assert rendered[names.SCALE_TO_ZERO_RETENTION] == by_hand[names.SCALE_TO_ZERO_RETENTION] == "0s"


def test_no_redis_url_means_no_redis_variable() -> None:
    """None renders no entry at all: an env entry would override the Secret's KOLD_REDIS_URL (envFrom)."""
    c = container(render_service(deploy(redis_url=None)))
    assert "KOLD_REDIS_URL" not in env(render_service(deploy(redis_url=None)))
    assert c["envFrom"] == [{"secretRef": {"name": "kold-s3"}}]


@pytest.mark.parametrize(
    "url",
    [
        "redis://:s3cret-pw@redis.ops:6379/0",
        "redis://app:s3cret-pw@redis.ops/1",
        "rediss://redis.ops/0?password=s3cret-pw",
    ],
)
def test_a_redis_url_with_a_password_is_refused_without_repeating_it(url: str) -> None:
    """It would be written in the Service, every Revision and --dry-run's output: it goes in the Secret."""
    with pytest.raises(InvalidFunctionError) as info:
        deploy(redis_url=url)
    message = str(info.value)
    assert "s3cret-pw" not in message and "\n" not in message
    assert "KOLD_REDIS_URL" in message and "kold-s3" in message and "--redis-url ''" in message


def test_a_redis_url_with_a_user_but_no_password_is_rendered() -> None:
    assert (
        env(render_service(deploy(redis_url="redis://app@redis.ops/0")))["KOLD_REDIS_URL"] == "redis://app@redis.ops/0"
    )


def test_the_node_cache_is_the_agents_hostpath_and_its_dirs() -> None:
    svc = render_service(deploy(node_cache=True))
    (volume,) = template(svc)["spec"]["volumes"]
    assert volume["hostPath"] == {"path": "/dev/shm/kold-node", "type": "DirectoryOrCreate"}
    # read-only, as Knative's defaulting makes a hostPath mount anyway: the agent writes, the pod maps
    assert container(svc)["volumeMounts"] == [{"name": volume["name"], "mountPath": "/kold-node", "readOnly": True}]
    assert env(svc)["KOLD_CACHE_SHM_DIR"] == "/kold-node/cache"
    assert env(svc)["KOLD_HOST_POOL_DIR"] == "/kold-node/pool"


def test_without_the_node_cache_the_tier_is_a_private_memory_emptydir_counted_in_the_pod() -> None:
    svc = render_service(deploy(node_cache=False, snapshot_bytes=3 * GIB, memory_bytes=6 * GIB))
    (volume,) = template(svc)["spec"]["volumes"]
    assert volume["emptyDir"]["medium"] == "Memory"
    tier_mi = 3 * 1024 + 64
    assert volume["emptyDir"]["sizeLimit"] == f"{tier_mi}Mi"
    (mount,) = container(svc)["volumeMounts"]
    assert mount["name"] == volume["name"] and env(svc)["KOLD_CACHE_SHM_DIR"] == mount["mountPath"]
    assert env(svc)["KOLD_CACHE_SHM_BYTES"] == str(tier_mi << 20)
    assert "KOLD_HOST_POOL_DIR" not in env(svc)
    resources = container(svc)["resources"]
    assert resources["requests"]["memory"] == resources["limits"]["memory"] == f"{6 * 1024 + tier_mi}Mi"


def test_cuda_asks_for_one_gpu_and_tolerates_its_taint_and_cpu_does_not() -> None:
    gpu = render_service(deploy(device="cuda"))
    assert container(gpu)["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container(gpu)["args"][container(gpu)["args"].index("--device") + 1] == "cuda"
    assert template(gpu)["spec"]["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]
    cpu = render_service(deploy(device="cpu"))
    assert "tolerations" not in template(cpu)["spec"]
    assert "nvidia.com/gpu" not in container(cpu)["resources"].get("limits", {})


def test_cpus_and_memory_become_resources() -> None:
    svc = render_service(deploy(cpus=2, memory_bytes=6 * GIB, snapshot_bytes=3 * GIB))
    resources = container(svc)["resources"]
    assert resources["requests"] == {"cpu": "2", "memory": "6144Mi"}
    assert resources["limits"] == {"memory": "6144Mi"}  # the node tier is the agent's memory, not the pod's
    bare = render_service(deploy(cpus=None, memory_bytes=None))
    assert "resources" not in container(bare)


@pytest.mark.parametrize(("cpus", "text"), [(1, "1"), (0.5, "500m"), (1.5, "1500m"), (0.0001, "1m"), (16, "16")])
def test_cpu_quantities(cpus: float, text: str) -> None:
    assert cpu_quantity(cpus) == text


def test_memory_quantities_round_up_to_whole_mib() -> None:
    assert memory_quantity(GIB) == "1024Mi" and memory_quantity(GIB + 1) == "1025Mi"


def test_the_progress_deadline_is_never_below_knatives_default() -> None:
    for size in (0, 1, 10**9, 3 * GIB):
        assert progress_deadline_s(size) == 600
    rendered = template(render_service(deploy(snapshot_bytes=0)))["metadata"]["annotations"]
    assert go_duration_s(rendered["serving.knative.dev/progress-deadline"]) == 600


def test_the_progress_deadline_grows_with_the_snapshot_by_the_documented_formula() -> None:
    # 140 GB (a 70B model in bf16): 2 x (180 s + 140e9 / 50e6 s) = 5960 s, rounded up to 6000 s
    assert progress_deadline_s(140 * 10**9) == 6000
    # 16 GB: 2 x (180 + 320) = 1000 -> 1020 (whole minutes)
    assert progress_deadline_s(16 * 10**9) == 1020
    sizes = [10**9 * n for n in range(0, 400, 7)]
    deadlines = [progress_deadline_s(s) for s in sizes]
    assert deadlines == sorted(deadlines) and all(d % 60 == 0 for d in deadlines)
    svc = render_service(deploy(snapshot_bytes=140 * 10**9))
    assert template(svc)["metadata"]["annotations"]["serving.knative.dev/progress-deadline"] == "6000s"


BAD = [
    ({"min_instances": 5, "max_instances": 2}, "--min-instances 5 is above --max-instances 2"),
    ({"min_instances": -1}, "--min-instances -1"),
    ({"max_instances": 0}, "--max-instances 0"),
    ({"target_concurrency": 0}, "--target-concurrency 0"),
    ({"idle_timeout_s": 3601}, "at most 1h"),
    ({"idle_timeout_s": -1}, "--idle-timeout -1"),
    ({"request_timeout_s": 0}, "--request-timeout 0"),
    ({"device": "cuda:1"}, "cpu or cuda"),
    ({"device": "tpu"}, "cpu or cuda"),
    ({"name": "Tiny"}, "lowercase"),
    ({"name": "9lives"}, "start with a lowercase letter"),
    ({"cpus": 0}, "--cpus 0"),
    ({"memory_bytes": 0}, "--memory 0"),
    ({"max_batch": 0}, "--max-batch 0"),
    ({"prewarm": "sometimes"}, "--prewarm: unknown prewarm policy"),
    ({"image": " "}, "--image"),
]


@pytest.mark.parametrize(("changes", "message"), BAD, ids=[m for _, m in BAD])
def test_what_knative_would_refuse_is_refused_in_one_line(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidFunctionError, match=message.replace("(", r"\(")) as info:
        deploy(**changes)
    assert "\n" not in str(info.value)


def test_scaling_reads_back_what_was_rendered() -> None:
    fn = deploy(
        min_instances=1,
        max_instances=6,
        target_concurrency=3,
        idle_timeout_s=300,
        request_timeout_s=240,
        prewarm="fixed-keepalive:minutes=10",
        snapshot_bytes=140 * 10**9,
    )
    scaling = scaling_of(render_service(fn))
    assert (scaling.name, scaling.min_instances, scaling.max_instances) == ("tiny", 1, 6)
    assert (scaling.target_concurrency, scaling.idle_timeout_s, scaling.request_timeout_s) == (3, 300.0, 240.0)
    assert scaling.prewarm == "fixed-keepalive:minutes=10"
    assert (scaling.snapshot_uri, scaling.snapshot_id) == ("s3://models/prod/snapshots/abc123", "abc123")
    assert scaling.snapshot_bytes == 140 * 10**9 and scaling.progress_deadline_s == 6000.0
    assert not scaling.unlimited


@pytest.mark.parametrize(("text", "seconds"), [("5m", 300.0), ("90s", 90.0), ("1h30m", 5400.0), ("0", 0.0)])
def test_scale_down_delay_is_read_as_knative_writes_it(text: str, seconds: float) -> None:
    svc = render_service(deploy())
    template(svc)["metadata"]["annotations"]["autoscaling.knative.dev/scale-down-delay"] = text
    assert scaling_of(svc).idle_timeout_s == seconds


def test_a_hand_made_service_reads_as_knatives_defaults() -> None:
    svc = {"metadata": {"name": "plain"}, "spec": {"template": {"spec": {"containers": [{"image": "x"}]}}}}
    scaling = scaling_of(svc)
    assert (scaling.min_instances, scaling.max_instances, scaling.target_concurrency) == (0, MAX_SCALE_UNLIMITED, 100)
    assert scaling.unlimited and scaling.idle_timeout_s == 0 and scaling.prewarm is None
    assert scaling.snapshot_uri is None and scaling.progress_deadline_s is None
    svc["spec"]["template"]["spec"]["containerConcurrency"] = 12  # no target: the hard cap is the target
    assert scaling_of(svc).target_concurrency == 12


def test_a_revision_reads_from_its_own_annotations_floor_included() -> None:
    svc = render_service(deploy(min_instances=0))
    revision = {
        "metadata": {
            "name": "tiny-00002",
            "annotations": {
                **template(svc)["metadata"]["annotations"],
                names.MIN_SCALE: "2",
                names.FLOOR: json.dumps({"instances": 2, "until": 1.7e9, "reason": "forecast"}),
                names.BASE_MIN_SCALE: "0",
            },
        },
        "spec": template(svc)["spec"],
    }
    assert scaling_of(revision).min_instances == 2  # what the controller raised it to
    assert floor_of(revision) == {"instances": 2, "until": 1.7e9, "reason": "forecast"}
    assert floor_of(svc) is None
    revision["metadata"]["annotations"][names.FLOOR] = "{not json"
    assert floor_of(revision) is None


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        (names.MIN_SCALE, "two", "min-scale: 'two' is not a number"),
        (names.MAX_SCALE, "1.5", "max-scale: '1.5' is not a whole number"),
        (names.SCALE_DOWN_DELAY, "5 minutes", "scale-down-delay: '5 minutes' is not a duration"),
        (names.TARGET, "-3", "target: '-3' is not a number >= 0"),
    ],
)
def test_a_hand_edited_annotation_that_is_malformed_is_named(key: str, value: str, message: str) -> None:
    svc = render_service(deploy())
    template(svc)["metadata"]["annotations"][key] = value
    with pytest.raises(InvalidFunctionError, match=message):
        scaling_of(svc)


@pytest.mark.parametrize("text", ["5m", "90s", "1h30m", "1.5m", "250ms", "0", "2h", "1h0m30s"])
def test_go_durations_agree_with_the_manifest_tests_reading(text: str) -> None:
    assert parse_go_duration(text) == pytest.approx(go_duration_s(text))


@pytest.mark.parametrize("text", ["5", "m", "", "1x", "5 m", "-5s", "1h 30m"])
def test_what_is_not_a_go_duration_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_go_duration(text)
