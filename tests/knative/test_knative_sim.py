"""The Knative stand-in: Revisions from Service writes, conditions over time (seen through a watch, as kold's
readiness wait sees them), Knative's failure reasons, replica counts, and cleanup on delete."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, config, watch

from .apiserver import FakeApiServer
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


def create(api: client.CustomObjectsApi, body: dict[str, Any]) -> dict[str, Any]:
    return api.create_namespaced_custom_object(GROUP, VERSION, NS, "services", body)


def get(api: client.CustomObjectsApi, plural: str, name: str) -> dict[str, Any]:
    return api.get_namespaced_custom_object(GROUP, VERSION, NS, plural, name)


def test_an_image_pull_failure_reads_as_knatives(api: client.CustomObjectsApi, knative: KnativeSim) -> None:
    knative.fail = "image-pull"
    created = create(api, service("fn", image="registry.example.com/missing:1"))
    seen = wait_ready(api, "fn", created["metadata"]["resourceVersion"])
    ready = conditions(seen[-1])["Ready"]
    assert ready[:2] == ("False", "RevisionFailed")
    assert ready[2].startswith(
        'Revision "fn-00001" failed with message: Unable to fetch image "registry.example.com/missing:1"'
    )
    assert conditions(seen[-1])["ConfigurationsReady"][:2] == ("False", "RevisionFailed")
    assert conditions(seen[-1])["RoutesReady"][:2] == ("False", "RevisionMissing")
    assert "latestReadyRevisionName" not in seen[-1]["status"] and "traffic" not in seen[-1]["status"]
    rev = conditions(get(api, "revisions", "fn-00001"))
    assert rev["Ready"][:2] == ("False", "ContainerMissing") and rev["Ready"][2].startswith("Unable to fetch image")


def test_a_progress_deadline_failure_reads_as_knatives(api: client.CustomObjectsApi, knative: KnativeSim) -> None:
    knative.fail = "progress-deadline"
    created = create(api, service("fn"))
    seen = wait_ready(api, "fn", created["metadata"]["resourceVersion"])
    assert conditions(seen[-1])["Ready"] == (
        "False",
        "RevisionFailed",
        'Revision "fn-00001" failed with message: Initial scale was never achieved.',
    )
    rev = conditions(get(api, "revisions", "fn-00001"))
    assert rev["Ready"] == ("False", "ProgressDeadlineExceeded", "Initial scale was never achieved")
    assert rev["ResourcesAvailable"][:2] == ("False", "ProgressDeadlineExceeded")


def test_never_stays_unknown(api: client.CustomObjectsApi, knative: KnativeSim) -> None:
    knative.fail = "never"
    create(api, service("fn"))
    knative.settle()  # nothing pending: it will never change
    status = get(api, "services", "fn")["status"]
    assert conditions({"status": status})["Ready"][:2] == ("Unknown", "RevisionMissing")
    assert status["latestCreatedRevisionName"] == "fn-00001" and "latestReadyRevisionName" not in status


def test_only_a_template_change_makes_a_revision(
    api: client.CustomObjectsApi, knative: KnativeSim, apiserver: FakeApiServer
) -> None:
    create(api, service("fn"))
    knative.settle()
    relabel = {"metadata": {"labels": {"extra": "1"}}}
    relabelled = api.patch_namespaced_custom_object(GROUP, VERSION, NS, "services", "fn", relabel)
    assert relabelled["metadata"]["generation"] == 1
    # kold's actuator: a floor is a merge patch on the Revision, which must not make a new one
    floor = {"metadata": {"annotations": {"autoscaling.knative.dev/min-scale": "2"}}}
    api.patch_namespaced_custom_object(GROUP, VERSION, NS, "revisions", "fn-00001", floor)
    knative.settle()
    assert [r["metadata"]["name"] for r in knative.revisions("fn", NS)] == ["fn-00001"]
    assert get(api, "revisions", "fn-00001")["metadata"]["annotations"]["autoscaling.knative.dev/min-scale"] == "2"
    assert apiserver.calls("PATCH", "services/status") == []  # kold never writes status

    changed = service("fn", image="registry.example.com/kold:2")
    api.patch_namespaced_custom_object(
        GROUP,
        VERSION,
        NS,
        "services",
        "fn",
        changed,
        _content_type="application/apply-patch+yaml",
        field_manager="kold",
        force=True,
    )
    knative.settle()
    assert [r["metadata"]["name"] for r in knative.revisions("fn", NS)] == ["fn-00001", "fn-00002"]
    status = get(api, "services", "fn")["status"]
    assert status["latestReadyRevisionName"] == "fn-00002" and status["observedGeneration"] == 2
    assert status["traffic"] == [{"revisionName": "fn-00002", "latestRevision": True, "percent": 100}]


def test_a_failed_new_revision_leaves_the_last_ready_one_serving(
    api: client.CustomObjectsApi, knative: KnativeSim
) -> None:
    create(api, service("fn"))
    knative.settle()
    knative.fail = "image-pull"
    current = get(api, "services", "fn")
    current["spec"]["template"]["spec"]["containers"][0]["image"] = "registry.example.com/missing:2"
    api.replace_namespaced_custom_object(GROUP, VERSION, NS, "services", "fn", current)
    knative.settle()
    status = get(api, "services", "fn")["status"]
    assert status["latestCreatedRevisionName"] == "fn-00002"
    assert status["latestReadyRevisionName"] == "fn-00001"
    assert status["traffic"][0]["revisionName"] == "fn-00001"
    assert conditions({"status": status})["Ready"][:2] == ("False", "RevisionFailed")
    assert conditions({"status": status})["RoutesReady"][0] == "True"


def test_replicas_address_base_and_named_revisions(apiserver: FakeApiServer, api: client.CustomObjectsApi) -> None:
    sim = KnativeSim(apiserver, ready_after_s=0.01, address_base="http://127.0.0.1:9/", replicas=1)
    try:
        body = service("fn")
        body["spec"]["template"]["metadata"]["name"] = "fn-blue"
        create(api, body)
        sim.settle()
        status = get(api, "services", "fn")["status"]
        assert status["address"]["url"] == "http://127.0.0.1:9/kold-test/fn"
        assert status["latestReadyRevisionName"] == "fn-blue"
        rev = get(api, "revisions", "fn-blue")
        assert rev["status"]["actualReplicas"] == 1 and conditions(rev)["Active"][0] == "True"
        scaled = sim.set_replicas("fn-blue", 0, NS)
        assert scaled["status"]["actualReplicas"] == 0
        assert conditions(scaled)["Active"][:2] == ("False", "NoTraffic")
        assert conditions(scaled)["Ready"][0] == "True"
        with pytest.raises(KeyError):
            sim.set_replicas("nope", 1, NS)
    finally:
        sim.close()
    assert sim.errors == []


def test_deleting_a_service_deletes_its_revisions(api: client.CustomObjectsApi, knative: KnativeSim) -> None:
    knative.ready_after_s = 5.0  # still pending when the Service goes
    create(api, service("fn"))
    api.delete_namespaced_custom_object(GROUP, VERSION, NS, "services", "fn")
    assert knative.revisions("fn", NS) == []
    knative.ready_after_s = 0.01
    again = create(api, service("fn"))  # a new Service of the same name starts over at 00001
    knative.settle(timeout_s=10)
    status = get(api, "services", "fn")["status"]
    assert status["latestReadyRevisionName"] == "fn-00001"
    assert (
        knative.revisions("fn", NS)[0]["metadata"]["labels"]["serving.knative.dev/serviceUID"]
        == again["metadata"]["uid"]
    )


def test_a_bad_fail_mode_is_refused(apiserver: FakeApiServer) -> None:
    with pytest.raises(ValueError, match="fail must be one of"):
        KnativeSim(apiserver, fail="oom")
