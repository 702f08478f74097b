"""The Knative stand-in: Revisions from Service writes, conditions over time (seen through a watch, as kold's
readiness wait sees them), Knative's failure reasons, replica counts, and cleanup on delete."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, config, watch

from .knative_sim import KnativeSim

GROUP, VERSION, NS = "serving.knative.dev", "v1", "kold-test"


@pytest.fixture
def api(kubeconfig: Path) -> Iterator[client.CustomObjectsApi]:
    api_client = config.new_client_from_config(config_file=str(kubeconfig), context="fake")
    yield client.CustomObjectsApi(api_client)
    api_client.close()


def service(name: str, image: str = "registry.example.com/kold:1") -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "Service",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/part-of": "kold"}},
        "spec": {
            "template": {
                "metadata": {
                    "labels": {"kold.dev/function": name},
                    "annotations": {"autoscaling.knative.dev/min-scale": "0"},
                },
                "spec": {"containers": [{"image": image}]},
            }
        },
    }


def conditions(obj: dict[str, Any]) -> dict[str, tuple[str, str, str]]:
    return {
        c["type"]: (c["status"], c.get("reason", ""), c.get("message", ""))
        for c in (obj.get("status") or {}).get("conditions", [])
    }


def wait_ready(api: client.CustomObjectsApi, name: str, since: str) -> list[dict[str, Any]]:
    """The Service's watch events until Ready is no longer Unknown (bounded by the watch's timeout)."""
    seen = []
    w = watch.Watch()
    for event in w.stream(
        api.list_namespaced_custom_object,
        GROUP,
        VERSION,
        NS,
        "services",
        field_selector=f"metadata.name={name}",
        resource_version=since,
        timeout_seconds=5,
    ):
        seen.append(event["object"])
        if conditions(event["object"]).get("Ready", ("Unknown",))[0] != "Unknown":
            w.stop()
    return seen


def test_a_service_becomes_ready_with_a_revision(api: client.CustomObjectsApi, knative: KnativeSim) -> None:
    created = api.create_namespaced_custom_object(GROUP, VERSION, NS, "services", service("fn"))
    revisions = knative.revisions("fn", NS)
    assert [r["metadata"]["name"] for r in revisions] == ["fn-00001"]  # there when the create returns
    rev = revisions[0]
    assert rev["metadata"]["labels"] == {
        "kold.dev/function": "fn",
        "serving.knative.dev/service": "fn",
        "serving.knative.dev/configuration": "fn",
        "serving.knative.dev/configurationGeneration": "1",
        "serving.knative.dev/serviceUID": created["metadata"]["uid"],
    }
    assert rev["metadata"]["annotations"] == {"autoscaling.knative.dev/min-scale": "0"}
    assert rev["spec"] == {"containers": [{"image": "registry.example.com/kold:1"}]}

    seen = wait_ready(api, "fn", created["metadata"]["resourceVersion"])
    assert conditions(seen[0])["Ready"][0] == "Unknown"
    assert seen[0]["status"]["latestCreatedRevisionName"] == "fn-00001"
    final = seen[-1]["status"]
    assert {k: v[0] for k, v in conditions(seen[-1]).items()} == {
        "ConfigurationsReady": "True",
        "Ready": "True",
        "RoutesReady": "True",
    }
    assert final["latestReadyRevisionName"] == "fn-00001"
    assert final["url"] == "http://fn.kold-test.example.com"
    assert final["address"]["url"] == "http://fn.kold-test.svc.cluster.local"
    assert final["traffic"] == [{"revisionName": "fn-00001", "latestRevision": True, "percent": 100}]
    assert final["observedGeneration"] == 1

    ready_rev = api.get_namespaced_custom_object(GROUP, VERSION, NS, "revisions", "fn-00001")
    assert ready_rev["status"]["actualReplicas"] == 0
    assert conditions(ready_rev)["Ready"][0] == "True"
    assert conditions(ready_rev)["Active"][:2] == ("False", "NoTraffic")
