"""Every built-in object the overlays render is one Kubernetes' API server would accept.

Kubernetes' own OpenAPI schemas (as JSON Schema, bundled by `kubernetes-validate`, so this works offline)
in their strict form: an unknown field is an error, as under the API server's strict field validation
(`kubectl apply --validate=strict`, the default since Kubernetes 1.27). Two rules the API server checks
in Go, which no schema expresses, are restated: a workload's selector must match its pod template's
labels, and a RoleBinding must name a Role and a ServiceAccount the manifests define.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import resources
from typing import Any

import kubernetes_validate
import pytest

from .render import OVERLAYS, Doc, built_in, needs_kubectl, render

# Knative Serving v1.17 (the first with hostPath volumes) needs Kubernetes 1.30, v1.18 and later 1.31:
# the oldest API the manifests must pass, and the newest the package knows
KUBERNETES_VERSIONS = ("1.30.0", ".".join(kubernetes_validate.latest_version().split(".")[:2]) + ".0")
WORKLOADS = ("Deployment", "DaemonSet", "StatefulSet", "ReplicaSet", "Job")


def openapi_errors(doc: Doc, version: str) -> list[str]:
    """[] when `doc` passes Kubernetes' strict schema for its kind at `version`, else the error."""
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [f"{doc['kind']}/{doc['metadata'].get('name')}: {exc.message}"]
    except kubernetes_validate.SchemaNotFoundError as exc:
        return [f"{doc['kind']}/{doc['metadata'].get('name')}: no schema: {exc}"]
    return []


def rule_errors(doc: Doc) -> list[str]:
    """The API server's checks on a workload that its schema cannot express."""
    errors: list[str] = []
    if doc["kind"] in WORKLOADS:
        spec = doc.get("spec", {})
        selector = spec.get("selector", {}).get("matchLabels", {})
        labels = spec.get("template", {}).get("metadata", {}).get("labels", {})
        if not selector:
            errors.append(f"{doc['kind']}/{doc['metadata']['name']}: spec.selector.matchLabels is empty")
        elif not selector.items() <= labels.items():
            errors.append(f"{doc['kind']}/{doc['metadata']['name']}: selector does not match template labels")
    return errors


def binding_errors(docs: tuple[Doc, ...]) -> list[str]:
    """Each RoleBinding's Role and ServiceAccounts are defined alongside it."""
    roles = {d["metadata"]["name"] for d in docs if d["kind"] == "Role"}
    accounts = {d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount"}
    errors = []
    for binding in (d for d in docs if d["kind"] == "RoleBinding"):
        if binding["roleRef"]["name"] not in roles:
            errors.append(f"RoleBinding/{binding['metadata']['name']}: no Role {binding['roleRef']['name']}")
        for subject in binding["subjects"]:
            if subject["kind"] == "ServiceAccount" and subject["name"] not in accounts:
                errors.append(f"RoleBinding/{binding['metadata']['name']}: no ServiceAccount {subject['name']}")
    return errors


@needs_kubectl
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_built_in_kinds_pass_kubernetes_openapi_schemas(overlay: str, version: str) -> None:
    docs = render(overlay)
    errors = [e for doc in built_in(docs) for e in openapi_errors(doc, version) + rule_errors(doc)]
    assert errors + binding_errors(docs) == []


@needs_kubectl
def test_every_kind_the_overlays_ship_is_checked() -> None:
    kinds = {d["kind"] for overlay in OVERLAYS for d in built_in(render(overlay))}
    assert kinds == {"ServiceAccount", "Role", "RoleBinding", "Deployment", "DaemonSet", "Service", "Secret"}


# -- broken objects fail ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Broken:
    name: str
    kind: str
    object_name: str
    breaks: Callable[[Doc], Any]
    expect: str


def _pod(doc: Doc) -> Doc:
    spec: Doc = doc["spec"]["template"]["spec"]
    return spec


def _drop(path: tuple[str, ...]) -> Callable[[Doc], Any]:
    def drop(doc: Doc) -> None:
        node = doc
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]

    return drop


BROKEN = [
    Broken("a DaemonSet without a selector", "DaemonSet", "kold-node-agent", _drop(("spec", "selector")), "selector"),
    Broken(
        "a DaemonSet whose selector misses its pods",
        "DaemonSet",
        "kold-node-agent",
        lambda d: d["spec"]["selector"]["matchLabels"].update({"app.kubernetes.io/name": "other"}),
        "does not match",
    ),
    Broken(
        "an unknown field in a pod spec (strict)",
        "DaemonSet",
        "kold-node-agent",
        lambda d: _pod(d).update(hostPathVolumes=True),
        "hostPathVolumes",
    ),
    Broken(
        "a container port that is a string",
        "DaemonSet",
        "kold-node-agent",
        lambda d: _pod(d)["containers"][0]["ports"][0].update(containerPort="9095"),
        "9095",
    ),
    Broken(
        "a hostPath without its path",
        "DaemonSet",
        "kold-node-agent",
        lambda d: _pod(d)["volumes"][0]["hostPath"].pop("path"),
        "path",
    ),
    Broken(
        "an env var from the downward API without a field path",
        "DaemonSet",
        "kold-node-agent",
        lambda d: _pod(d)["containers"][0]["env"][0]["valueFrom"]["fieldRef"].pop("fieldPath"),
        "fieldPath",
    ),
    Broken(
        "a Deployment without a pod template", "Deployment", "kold-controller", _drop(("spec", "template")), "template"
    ),
    Broken("a Role rule without verbs", "Role", "kold-controller", lambda d: d["rules"][0].pop("verbs"), "verbs"),
    Broken("a RoleBinding without a roleRef", "RoleBinding", "kold-controller", _drop(("roleRef",)), "roleRef"),
    Broken(
        "a ServiceAccount with a misspelt field",
        "ServiceAccount",
        "kold-node-agent",
        lambda d: d.update(automountServiceAccountTokens=False),
        "automountServiceAccountTokens",
    ),
    Broken(
        "a Service port that is not a number",
        "Service",
        "kold-redis",
        lambda d: d["spec"]["ports"][0].update(port="redis"),
        "redis",
    ),
]


@needs_kubectl
@pytest.mark.parametrize("case", BROKEN, ids=lambda c: c.name)
def test_a_broken_built_in_object_fails_validation(case: Broken) -> None:
    docs = render("cpu")
    (original,) = [d for d in docs if d["kind"] == case.kind and d["metadata"]["name"] == case.object_name]
    doc = copy.deepcopy(original)
    case.breaks(doc)
    errors = openapi_errors(doc, KUBERNETES_VERSIONS[0]) + rule_errors(doc)
    assert errors, "validation accepted a broken manifest"
    assert any(case.expect in e for e in errors), errors
    assert openapi_errors(original, KUBERNETES_VERSIONS[0]) + rule_errors(original) == []


def test_a_role_binding_to_an_undefined_role_or_account_fails() -> None:
    docs: tuple[Doc, ...] = (
        {"kind": "Role", "metadata": {"name": "a"}},
        {"kind": "ServiceAccount", "metadata": {"name": "sa"}},
        {
            "kind": "RoleBinding",
            "metadata": {"name": "b"},
            "roleRef": {"name": "missing"},
            "subjects": [{"kind": "ServiceAccount", "name": "nobody"}],
        },
    )
    assert binding_errors(docs) == ["RoleBinding/b: no Role missing", "RoleBinding/b: no ServiceAccount nobody"]


# -- the kinds kold may ship, and offline ----------------------------------------------------------


def _pvc(access_modes: Any) -> Doc:
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": "p"},
        "spec": {"accessModes": access_modes, "resources": {"requests": {"storage": "1Gi"}}},
    }


# (a minimal valid object, the same object broken): the kinds the overlays do not ship today but might
OTHER_KINDS: list[tuple[Doc, Doc]] = [
    (
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"k": "v"}},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"k": 1}},
    ),
    (
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}, "stringData": {"k": "v"}},
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}, "immutable": "yes"},
    ),
    (_pvc(["ReadWriteOnce"]), _pvc("ReadWriteOnce")),
]


@pytest.mark.parametrize(("good", "bad"), OTHER_KINDS, ids=lambda d: d["kind"])
def test_the_other_kinds_kold_may_ship_have_schemas_and_are_checked(good: Doc, bad: Doc) -> None:
    assert openapi_errors(good, KUBERNETES_VERSIONS[0]) == []
    assert openapi_errors(bad, KUBERNETES_VERSIONS[0]) != []


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_the_schemas_are_bundled_and_refer_to_nothing_online(version: str) -> None:
    folder = resources.files("kubernetes_validate") / "kubernetes-json-schema" / f"v{version}-local-strict"
    for name in ("daemonset-apps-v1.json", "deployment-apps-v1.json", "role-rbac-v1.json", "_definitions.json"):
        schema = json.loads((folder / name).read_text())
        assert not [ref for ref in _refs(schema) if "://" in ref], name
