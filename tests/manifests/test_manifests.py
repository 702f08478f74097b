"""The Knative manifests render, and what they render is what Knative's API server would accept.

No cluster runs here, so the checks are offline: every overlay is rendered with `kubectl kustomize`,
every Knative Service is validated against Knative's own CRD schema (shared/knative/service.yaml), and
the annotation rules that Knative's admission webhook enforces in Go (which no schema expresses) are
checked by `webhook_errors` below. Built-in kinds (Deployment, DaemonSet, Role, ...) are validated
against Kubernetes' OpenAPI schemas in test_builtin_kinds.py; the node agent, the function's node
mount and the controller's RBAC in test_node_agent_manifests.py.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from .render import OVERLAYS, REPO, Doc, knative_services, needs_kubectl, render

# the project's shared copy of Knative's CRD when the checkout has one, else the copy kept beside these tests
# (tests/manifests/knative/SOURCE.md): a clean clone validates against the same bytes
_SHARED_CRD = REPO.parent / "shared" / "knative" / "service.yaml"
KNATIVE_CRD = _SHARED_CRD if _SHARED_CRD.is_file() else Path(__file__).resolve().parent / "knative" / "service.yaml"


def _strict(node: Any) -> Any:
    """The schema with `additionalProperties: false` on every object node that lists its properties and
    does not preserve unknown fields: the API server's strict field validation, which rejects what a
    plain JSON-Schema validator would accept (the CRD never says additionalProperties itself)."""
    if isinstance(node, dict):
        out = {k: _strict(v) for k, v in node.items()}
        if "properties" in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out.setdefault("additionalProperties", False)
        return out
    if isinstance(node, list):
        return [_strict(v) for v in node]
    return node


@cache
def service_schema() -> Doc:
    """Knative's Service v1 openAPIV3Schema, made strict."""
    crd = yaml.safe_load(KNATIVE_CRD.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return _strict(version["schema"]["openAPIV3Schema"])


def schema_errors(ksvc: Doc) -> list[str]:
    validator = jsonschema.Draft7Validator(service_schema())
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(ksvc)]


# Go's time.ParseDuration syntax (what Knative parses these annotations with)
_GO_DURATION = re.compile(r"^(?:\d+(?:\.\d+)?(?:ns|us|µs|ms|s|m|h))+$")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_CLASS_METRICS = {
    "kpa.autoscaling.knative.dev": {"concurrency", "rps"},
    "hpa.autoscaling.knative.dev": {"cpu", "memory"},
}
_A = "autoscaling.knative.dev/"


def go_duration_s(text: str) -> float:
    if text == "0":
        return 0.0
    if not _GO_DURATION.match(text):
        raise ValueError(f"{text!r} is not a duration (examples: 60s, 5m, 1h30m)")
    return sum(float(n) * _UNIT_S[unit] for n, unit in _DURATION_PART.findall(text))


def webhook_errors(annotations: dict[str, str]) -> list[str]:
    """The annotation rules of Knative's admission webhook (pkg/apis/autoscaling/annotation_validation.go,
    restated, not copied) that the CRD schema cannot express; an empty list when all hold."""
    errors: list[str] = []

    def number(key: str) -> float | None:
        if key not in annotations:
            return None
        try:
            return float(annotations[key])
        except ValueError:
            errors.append(f"{key}: {annotations[key]!r} is not a number")
            return None

    def duration(key: str, low: float, high: float) -> None:
        if key not in annotations:
            return
        try:
            seconds = go_duration_s(annotations[key])
        except ValueError as e:
            errors.append(f"{key}: {e}")
            return
        if not low <= seconds <= high:
            errors.append(f"{key}: {annotations[key]} is outside [{low}s, {high}s]")

    klass = annotations.get(_A + "class", "kpa.autoscaling.knative.dev")
    metric = annotations.get(_A + "metric")
    if klass in _CLASS_METRICS and metric is not None and metric not in _CLASS_METRICS[klass]:
        errors.append(f"{_A}metric: {metric!r} is not allowed with class {klass}")
    duration(_A + "window", 6, 3600)
    duration(_A + "scale-down-delay", 0, 3600)
    duration(_A + "scale-to-zero-pod-retention-period", 0, 3600)
    target = number(_A + "target")
    if target is not None and target < 0.01:
        errors.append(f"{_A}target: {target} must be above 0 (at least 0.01)")
    low, high = number(_A + "min-scale"), number(_A + "max-scale")
    for key, value in ((_A + "min-scale", low), (_A + "max-scale", high)):
        if value is not None and (value < 0 or value != int(value)):
            errors.append(f"{key}: {value} must be a whole number >= 0")
    if low is not None and high is not None and high != 0 and low > high:  # max-scale 0: no limit
        errors.append(f"{_A}min-scale {low:g} is above max-scale {high:g}")
    initial = number(_A + "initial-scale")
    if initial is not None and (initial < 0 or initial != int(initial)):
        errors.append(f"{_A}initial-scale: {initial} must be a whole number >= 0")
    panic_window = number(_A + "panic-window-percentage")
    if panic_window is not None and not 1 <= panic_window <= 100:
        errors.append(f"{_A}panic-window-percentage: {panic_window} is outside [1, 100]")
    panic_threshold = number(_A + "panic-threshold-percentage")
    if panic_threshold is not None and not 110 <= panic_threshold <= 1000:
        errors.append(f"{_A}panic-threshold-percentage: {panic_threshold} is outside [110, 1000]")
    if "serving.knative.dev/progress-deadline" in annotations:
        duration("serving.knative.dev/progress-deadline", 1e-9, float("inf"))
    return errors


# config-defaults' max-revision-timeout-seconds as Knative ships it (shared/knative/defaults.yaml): the
# webhook refuses a revision timeout above it unless the cluster's operator raised it
MAX_REVISION_TIMEOUT_S = 600


def timeout_errors(pod: Doc, max_timeout_s: int = MAX_REVISION_TIMEOUT_S) -> list[str]:
    """The webhook's revision timeout rules: timeoutSeconds in [0, max], responseStartTimeoutSeconds and
    idleTimeoutSeconds in [0, timeoutSeconds] (pkg/apis/serving/v1/revision_validation.go)."""
    errors = []
    timeout = pod.get("timeoutSeconds", 300)
    if isinstance(timeout, int) and not 0 <= timeout <= max_timeout_s:
        errors.append(f"timeoutSeconds: expected 0 <= {timeout} <= {max_timeout_s} (max-revision-timeout-seconds)")
    for key in ("responseStartTimeoutSeconds", "idleTimeoutSeconds"):
        value = pod.get(key)
        if isinstance(value, int) and isinstance(timeout, int) and not 0 <= value <= timeout:
            errors.append(f"{key}: expected 0 <= {value} <= {timeout} (timeoutSeconds)")
    return errors


def all_errors(ksvc: Doc) -> list[str]:
    template = ksvc.get("spec", {}).get("template", {})
    annotations = template.get("metadata", {}).get("annotations", {})
    return schema_errors(ksvc) + webhook_errors(annotations) + timeout_errors(template.get("spec", {}))


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_overlay_renders_one_function(overlay: str) -> None:
    (ksvc,) = knative_services(render(overlay))
    assert ksvc["metadata"]["namespace"] == "kold"


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rendered_functions_pass_the_crd_schema_and_the_webhook_rules(overlay: str) -> None:
    for ksvc in knative_services(render(overlay)):
        assert all_errors(ksvc) == []


@needs_kubectl
def test_the_runtime_container_follows_the_knative_contract() -> None:
    (ksvc,) = knative_services(render("cpu"))
    spec = ksvc["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert "PORT" not in env  # Knative sets it
    assert container["ports"] == [{"name": "http1", "containerPort": 8080}]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["args"][:4] == ["runtime", "serve", "--snapshot", "$(KOLD_SNAPSHOT_URI)"]
    assert env["KOLD_RUNTIME_DEVICE"] == "cpu" and env["KOLD_REDIS_URL"]
    assert {"secretRef": {"name": "kold-s3"}} in container["envFrom"]
    (mount,) = container["volumeMounts"]
    (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    # the node agent's tier (test_node_agent_manifests.py has the rest)
    assert mount["mountPath"] == "/kold-node" and volume["hostPath"]["path"] == "/dev/shm/kold-node"
    annotations = ksvc["spec"]["template"]["metadata"]["annotations"]
    # longer than Knative's default 600 s, which a long first load can pass
    assert go_duration_s(annotations["serving.knative.dev/progress-deadline"]) > 600
    assert annotations[_A + "min-scale"] == "0"


@needs_kubectl
def test_the_gpu_overlay_asks_for_one_gpu_and_tolerates_its_taint() -> None:
    (ksvc,) = knative_services(render("gpu"))
    spec = ksvc["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert {e["name"]: e.get("value") for e in container["env"]}["KOLD_RUNTIME_DEVICE"] == "cuda"
    assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
    cpu_spec = knative_services(render("cpu"))[0]["spec"]["template"]["spec"]
    assert "tolerations" not in cpu_spec and "nvidia.com/gpu" not in cpu_spec["containers"][0]["resources"]["limits"]


@needs_kubectl
def test_redis_runs_as_non_root_and_is_reachable_by_the_url_the_pods_use() -> None:
    docs = render("cpu")
    (redis,) = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "kold-redis"]
    assert redis["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    (container,) = redis["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "redis:7-alpine"
    (service,) = [d for d in docs if d["kind"] == "Service" and d["apiVersion"] == "v1"]
    assert service["metadata"]["name"] == "kold-redis" and service["spec"]["ports"][0]["port"] == 6379


@needs_kubectl
def test_the_minio_overlay_brings_the_s3_secret_the_function_reads() -> None:
    docs = render("minio")
    (secret,) = [d for d in docs if d["kind"] == "Secret"]
    assert secret["metadata"]["name"] == "kold-s3"
    literals = secret.get("stringData") or secret["data"]
    assert "KOLD_S3_ENDPOINT" in literals
    assert [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "kold-minio"]
    assert not [d for d in render("cpu") if d["kind"] == "Secret"]  # bring your own outside the demo


@dataclass(frozen=True)
class Broken:
    name: str
    annotations: dict[str, str] = field(default_factory=dict)
    spec: dict[str, Any] = field(default_factory=dict)
    expect: str = ""


BROKEN = [
    Broken("min-scale above max-scale is rejected", {_A + "min-scale": "5", _A + "max-scale": "2"}, expect="min-scale"),
    Broken("a window under 6 seconds is rejected", {_A + "window": "5s"}, expect="window"),
    Broken("a window over an hour is rejected", {_A + "window": "2h"}, expect="window"),
    Broken("a target of zero is rejected", {_A + "target": "0"}, expect="target"),
    Broken("a negative initial-scale is rejected", {_A + "initial-scale": "-1"}, expect="initial-scale"),
    Broken("the kpa class with a cpu metric is rejected", {_A + "metric": "cpu"}, expect="metric"),
    Broken(
        "the hpa class with a concurrency metric is rejected",
        {_A + "class": "hpa.autoscaling.knative.dev"},
        expect="metric",
    ),
    Broken(
        "a progress deadline that is no duration is rejected",
        {"serving.knative.dev/progress-deadline": "30 minutes"},
        expect="progress-deadline",
    ),
    Broken(
        "a revision timeout over Knative's default maximum is rejected",
        spec={"timeoutSeconds": 900},
        expect="max-revision-timeout-seconds",
    ),
    Broken(
        "a response start timeout over the revision timeout is rejected",
        spec={"timeoutSeconds": 300, "responseStartTimeoutSeconds": 400},
        expect="responseStartTimeoutSeconds",
    ),
    Broken("an unknown field under spec.template.spec is rejected", spec={"replicas": 3}, expect="replicas"),
    Broken("a container concurrency that is no integer is rejected", spec={"containerConcurrency": "16"}, expect="16"),
]


@needs_kubectl
@pytest.mark.parametrize("case", BROKEN, ids=lambda c: c.name)
def test_a_broken_function_fails_validation(case: Broken) -> None:
    ksvc = copy.deepcopy(knative_services(render("cpu"))[0])
    ksvc["spec"]["template"]["metadata"]["annotations"].update(case.annotations)
    ksvc["spec"]["template"]["spec"].update(case.spec)
    errors = all_errors(ksvc)
    assert errors, "validation accepted a broken manifest"
    assert any(case.expect in e for e in errors), errors


def test_max_scale_zero_means_no_limit_and_accepts_any_min_scale() -> None:
    assert webhook_errors({_A + "min-scale": "5", _A + "max-scale": "0"}) == []


@pytest.mark.parametrize(("text", "seconds"), [("1800s", 1800.0), ("1h30m", 5400.0), ("0", 0.0), ("1.5m", 90.0)])
def test_go_durations_parse_as_knative_reads_them(text: str, seconds: float) -> None:
    assert go_duration_s(text) == seconds


def test_the_default_revision_timeout_maximum_is_knatives() -> None:
    defaults = REPO.parent / "shared" / "knative" / "defaults.yaml"
    if not defaults.is_file():  # a clean clone keeps only the Service CRD
        return
    text = yaml.safe_load(defaults.read_text())["data"]["_example"]
    assert f'max-revision-timeout-seconds: "{MAX_REVISION_TIMEOUT_S}"' in text


def test_the_kept_copy_of_knatives_crd_is_the_recorded_one() -> None:
    import hashlib

    kept = Path(__file__).resolve().parent / "knative" / "service.yaml"
    recorded = re.search(r"sha256 `([0-9a-f]{64})`", (kept.parent / "SOURCE.md").read_text())
    assert recorded and hashlib.sha256(kept.read_bytes()).hexdigest() == recorded.group(1)
