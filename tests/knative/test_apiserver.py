"""The fake API server, driven by the official `kubernetes` client exactly as kold drives a cluster:
every verb, every patch content type, watches, selectors, and the errors a real API server answers with."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, config, watch
from kubernetes.client.rest import ApiException

from .apimachinery import ApiError, field_selector, json_patch, label_selector, leaves, merge_patch, remove_path
from .apiserver import FakeApiServer

GROUP, VERSION, PLURAL, NS = "serving.knative.dev", "v1", "services", "kold-test"
MERGE = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"
APPLY = "application/apply-patch+yaml"


@pytest.fixture
def api(kubeconfig: Path) -> Iterator[client.CustomObjectsApi]:
    api_client = config.new_client_from_config(config_file=str(kubeconfig), context="fake")
    yield client.CustomObjectsApi(api_client)
    api_client.close()


def service(name: str, image: str = "img:1", labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "Service",
        "metadata": {"name": name, "labels": labels or {}},
        "spec": {"template": {"spec": {"containers": [{"image": image}]}}},
    }


def create(api: client.CustomObjectsApi, body: dict[str, Any]) -> dict[str, Any]:
    return api.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, body)


def get(api: client.CustomObjectsApi, name: str) -> dict[str, Any]:
    return api.get_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, name)


def patch(api: client.CustomObjectsApi, name: str, body: Any, content_type: str, **kw: Any) -> dict[str, Any]:
    return api.patch_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, name, body, _content_type=content_type, **kw)


def status_of(exc: ApiException) -> dict[str, Any]:
    return json.loads(exc.body)


def test_create_get_list_replace_delete(api: client.CustomObjectsApi, apiserver: FakeApiServer) -> None:
    created = create(api, service("a"))
    meta = created["metadata"]
    assert meta["namespace"] == NS and meta["generation"] == 1 and meta["uid"] and meta["creationTimestamp"]
    assert int(meta["resourceVersion"]) > 0
    assert get(api, "a") == created
    listed = api.list_namespaced_custom_object(GROUP, VERSION, NS, PLURAL)
    assert listed["kind"] == "ServiceList" and [o["metadata"]["name"] for o in listed["items"]] == ["a"]

    created["metadata"]["labels"] = {"x": "1"}
    relabelled = api.replace_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "a", created)
    assert relabelled["metadata"]["generation"] == 1  # metadata only: no new generation
    assert int(relabelled["metadata"]["resourceVersion"]) > int(meta["resourceVersion"])
    relabelled["spec"]["template"]["spec"]["containers"][0]["image"] = "img:2"
    respecced = api.replace_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "a", relabelled)
    assert respecced["metadata"]["generation"] == 2
    assert respecced["metadata"]["uid"] == meta["uid"]

    gone = api.delete_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "a")
    assert gone["kind"] == "Status" and gone["status"] == "Success" and gone["details"]["name"] == "a"
    assert apiserver.objects(PLURAL) == []
    methods = [(r.method, r.resource.name if r.resource else None) for r in apiserver.requests]
    assert methods == [("POST", None), ("GET", "a"), ("GET", None), ("PUT", "a"), ("PUT", "a"), ("DELETE", "a")]


def test_errors_are_kubernetes_status_objects(api: client.CustomObjectsApi) -> None:
    with pytest.raises(ApiException) as missing:
        get(api, "nope")
    assert missing.value.status == 404
    assert status_of(missing.value) == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": 'services.serving.knative.dev "nope" not found',
        "reason": "NotFound",
        "details": {"name": "nope", "group": GROUP, "kind": "services"},
        "code": 404,
    }
    created = create(api, service("a"))
    with pytest.raises(ApiException) as exists:
        create(api, service("a"))
    assert exists.value.status == 409 and status_of(exists.value)["reason"] == "AlreadyExists"

    stale = dict(created)
    patch(api, "a", {"metadata": {"labels": {"moved": "on"}}}, MERGE)
    with pytest.raises(ApiException) as conflict:
        api.replace_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "a", stale)
    assert conflict.value.status == 409 and status_of(conflict.value)["reason"] == "Conflict"
    assert "the object has been modified" in status_of(conflict.value)["message"]

    no_rv = service("a")
    with pytest.raises(ApiException) as invalid:
        api.replace_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "a", no_rv)
    assert invalid.value.status == 422 and status_of(invalid.value)["reason"] == "Invalid"
    assert status_of(invalid.value)["details"]["causes"][0]["field"] == "metadata.resourceVersion"


def test_merge_and_json_patch(api: client.CustomObjectsApi, apiserver: FakeApiServer) -> None:
    create(api, service("a", labels={"keep": "1", "drop": "1"}))
    merged = patch(api, "a", {"metadata": {"labels": {"drop": None, "new": "2"}}}, MERGE)
    assert merged["metadata"]["labels"] == {"keep": "1", "new": "2"}
    ops = [
        {"op": "replace", "path": "/spec/template/spec/containers/0/image", "value": "img:9"},
        {"op": "add", "path": "/metadata/annotations", "value": {"a/b": "c"}},
        {"op": "remove", "path": "/metadata/labels/keep"},
    ]
    patched = patch(api, "a", ops, JSON_PATCH)
    assert patched["spec"]["template"]["spec"]["containers"][0]["image"] == "img:9"
    assert patched["metadata"]["annotations"] == {"a/b": "c"}
    assert patched["metadata"]["labels"] == {"new": "2"}
    assert patched["metadata"]["generation"] == 2
    with pytest.raises(ApiException) as failed_test:
        patch(api, "a", [{"op": "test", "path": "/metadata/name", "value": "b"}], JSON_PATCH)
    assert failed_test.value.status == 422
    sent = apiserver.calls("PATCH", PLURAL, "a")
    assert [r.content_type for r in sent] == [MERGE, JSON_PATCH, JSON_PATCH]
    assert sent[0].body == {"metadata": {"labels": {"drop": None, "new": "2"}}}
    with pytest.raises(ApiException) as missing:
        patch(api, "b", {"metadata": {"labels": {"x": "1"}}}, MERGE)
    assert missing.value.status == 404


def test_strategic_merge_is_refused_for_custom_resources(api: client.CustomObjectsApi) -> None:
    create(api, service("a"))
    with pytest.raises(ApiException) as refused:
        patch(api, "a", {"metadata": {"labels": {"x": "1"}}}, "application/strategic-merge-patch+json")
    assert refused.value.status == 415 and status_of(refused.value)["reason"] == "UnsupportedMediaType"


def test_apply_creates_then_updates_and_needs_a_field_manager(
    api: client.CustomObjectsApi, apiserver: FakeApiServer
) -> None:
    # An apply that creates answers 201 Created, as Kubernetes does; CustomObjectsApi maps only 200 to a
    # body, so the official client returns None here: a caller must read the object back.
    assert patch(api, "a", service("a"), APPLY, field_manager="kold", force=True) is None
    assert apiserver.calls("PATCH", PLURAL)[-1].body == service("a")
    created = get(api, "a")
    assert created["metadata"]["generation"] == 1 and created["metadata"]["uid"]
    updated = patch(api, "a", service("a", image="img:2"), APPLY, field_manager="kold", force=True)
    assert updated["metadata"]["uid"] == created["metadata"]["uid"]
    assert updated["spec"]["template"]["spec"]["containers"][0]["image"] == "img:2"
    assert updated["metadata"]["generation"] == 2
    again = patch(api, "a", service("a", image="img:2"), APPLY, field_manager="kold", force=True)
    assert again == updated  # a no-op write is skipped, as on Kubernetes: same resourceVersion, no event
    stale = service("a", image="img:3")
    stale["metadata"]["resourceVersion"] = created["metadata"]["resourceVersion"]
    with pytest.raises(ApiException) as precondition:
        patch(api, "a", stale, APPLY, field_manager="kold", force=True)
    assert precondition.value.status == 409
    with pytest.raises(ApiException) as no_manager:
        patch(api, "a", service("a"), APPLY)
    assert no_manager.value.status == 400
    assert [r.query.get("fieldManager") for r in apiserver.calls("PATCH", PLURAL)] == ["kold"] * 4 + [None]


def test_apply_accepts_yaml(api: client.CustomObjectsApi, apiserver: FakeApiServer) -> None:
    """kubectl sends apply bodies as YAML (the Python client always sends JSON, which is YAML too)."""
    body = "apiVersion: serving.knative.dev/v1\nkind: Service\nmetadata:\n  name: y\n  labels: {a: b}\n"
    request = urllib.request.Request(
        f"{apiserver.url}/apis/{GROUP}/{VERSION}/namespaces/{NS}/{PLURAL}/y?fieldManager=kubectl",
        data=body.encode(),
        method="PATCH",
        headers={"Content-Type": APPLY, "Authorization": f"Bearer {apiserver.token}"},
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.status == 201
        assert json.loads(response.read())["metadata"]["labels"] == {"a": "b"}
    assert apiserver.calls("PATCH", PLURAL, "y")[0].body["metadata"]["labels"] == {"a": "b"}
    assert get(api, "y")["metadata"]["labels"] == {"a": "b"}


def test_apply_conflicts_with_another_managers_field_unless_forced(api: client.CustomObjectsApi) -> None:
    patch(api, "a", service("a", labels={"team": "x"}), APPLY, field_manager="kold")
    other = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Service", "metadata": {"name": "a", "labels": {"team": "y"}}}
    with pytest.raises(ApiException) as conflict:
        patch(api, "a", other, APPLY, field_manager="ops")
    body = status_of(conflict.value)
    assert conflict.value.status == 409 and body["reason"] == "Conflict"
    assert body["details"]["causes"][0]["field"] == ".metadata.labels.team"
    assert 'conflict with "kold"' in body["message"]
    same = {**other, "metadata": {"name": "a", "labels": {"team": "x"}}}
    patch(api, "a", same, APPLY, field_manager="ops")  # the same value: shared, not a conflict
    forced = patch(api, "a", other, APPLY, field_manager="ops", force=True)
    assert forced["metadata"]["labels"] == {"team": "y"}


def test_apply_removes_the_fields_a_manager_stops_applying(api: client.CustomObjectsApi) -> None:
    patch(api, "a", service("a", labels={"one": "1", "two": "2"}), APPLY, field_manager="kold")
    patch(api, "a", {"metadata": {"labels": {"mine": "m"}}}, MERGE)  # another manager's label stays
    again = patch(api, "a", service("a", labels={"one": "1"}), APPLY, field_manager="kold")
    assert again["metadata"]["labels"] == {"one": "1", "mine": "m"}


def test_status_subresource_changes_only_status(api: client.CustomObjectsApi) -> None:
    create(api, {**service("a"), "status": {"ignored": True}})
    assert "status" not in get(api, "a")
    updated = api.patch_namespaced_custom_object_status(
        GROUP, VERSION, NS, PLURAL, "a", {"status": {"x": 1}, "spec": {"changed": True}}
    )
    assert updated["status"] == {"x": 1} and "changed" not in updated["spec"]
    assert updated["metadata"]["generation"] == 1
    main = patch(api, "a", {"status": {"x": 2}, "metadata": {"labels": {"l": "v"}}}, MERGE)
    assert main["status"] == {"x": 1} and main["metadata"]["labels"] == {"l": "v"}


def test_forbidden_and_unauthorized(api: client.CustomObjectsApi, apiserver: FakeApiServer, tmp_path: Path) -> None:
    create(api, service("a"))
    apiserver.deny("patch", "services")
    with pytest.raises(ApiException) as denied:
        patch(api, "a", {"metadata": {"labels": {"x": "1"}}}, MERGE)
    assert denied.value.status == 403
    body = status_of(denied.value)
    assert body["reason"] == "Forbidden" and 'cannot patch resource "services"' in body["message"]
    assert body["details"] == {"name": "a", "group": GROUP, "kind": "services"}
    assert get(api, "a")["metadata"]["name"] == "a"  # other verbs still allowed
    apiserver.allow("patch", "services")
    patch(api, "a", {"metadata": {"labels": {"x": "1"}}}, MERGE)

    wrong = apiserver.kubeconfig(tmp_path / "wrong")
    wrong.write_text(wrong.read_text().replace(apiserver.token, "not-the-token"))
    bad_client = config.new_client_from_config(config_file=str(wrong), context="fake")
    try:
        with pytest.raises(ApiException) as unauthorized:
            client.CustomObjectsApi(bad_client).get_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "a")
    finally:
        bad_client.close()
    assert unauthorized.value.status == 401 and status_of(unauthorized.value)["reason"] == "Unauthorized"


def test_selectors(api: client.CustomObjectsApi) -> None:
    create(api, service("a", labels={"app": "kold", "tier": "gpu"}))
    create(api, service("b", labels={"app": "kold", "tier": "cpu"}))
    create(api, service("c", labels={"app": "other"}))

    def names(**kw: str) -> list[str]:
        listed = api.list_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, **kw)
        return [o["metadata"]["name"] for o in listed["items"]]

    assert names(label_selector="app=kold") == ["a", "b"]
    assert names(label_selector="app==kold,tier!=gpu") == ["b"]
    assert names(label_selector="tier") == ["a", "b"]
    assert names(label_selector="!tier") == ["c"]
    assert names(label_selector="tier in (gpu, tpu)") == ["a"]
    assert names(label_selector="tier notin (gpu)") == ["b", "c"]  # as on Kubernetes: no label is "not in"
    assert names(label_selector="tier,tier notin (gpu)") == ["b"]
    assert names(field_selector="metadata.name=c") == ["c"]
    assert names(field_selector="metadata.name!=c", label_selector="app=kold") == ["a", "b"]
    with pytest.raises(ApiException) as bad:
        names(label_selector="app in kold")
    assert bad.value.status == 400
    with pytest.raises(ApiException) as unsupported:
        names(field_selector="spec.x=1")
    assert unsupported.value.status == 400


def test_load_kube_config_and_the_core_api(kubeconfig: Path) -> None:
    config.load_kube_config(config_file=str(kubeconfig), context="fake")
    core = client.CoreV1Api()
    try:
        made = core.create_namespaced_config_map(NS, {"metadata": {"name": "cm"}, "data": {"k": "v"}})
        assert made.metadata.resource_version and made.data == {"k": "v"}
        assert core.read_namespaced_config_map("cm", NS).data == {"k": "v"}
        _, active = config.list_kube_config_contexts(config_file=str(kubeconfig))
        assert active["context"]["namespace"] == NS
    finally:
        core.api_client.close()
        client.Configuration.set_default(None)  # load_kube_config set a process-wide default: drop it


def test_watch_replays_after_a_resource_version_then_delivers_new_events(
    api: client.CustomObjectsApi, apiserver: FakeApiServer
) -> None:
    first = create(api, service("a"))
    create(api, service("b"))
    patch(api, "a", {"metadata": {"labels": {"x": "1"}}}, MERGE)
    seen: list[tuple[str, str]] = []

    def later() -> None:
        time.sleep(0.2)
        api.delete_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "a")

    writer = threading.Thread(target=later)
    writer.start()
    w = watch.Watch()
    for event in w.stream(
        api.list_namespaced_custom_object,
        GROUP,
        VERSION,
        NS,
        PLURAL,
        resource_version=first["metadata"]["resourceVersion"],
        timeout_seconds=5,
    ):
        seen.append((event["type"], event["object"]["metadata"]["name"]))
        if event["type"] == "DELETED":
            w.stop()
    writer.join()
    assert seen == [("ADDED", "b"), ("MODIFIED", "a"), ("DELETED", "a")]


def test_watch_without_a_version_starts_with_the_current_objects_and_honours_selectors(
    api: client.CustomObjectsApi,
) -> None:
    create(api, service("a"))
    create(api, service("b"))
    w = watch.Watch()
    events = [
        (e["type"], e["object"]["metadata"]["name"])
        for e in w.stream(
            api.list_namespaced_custom_object,
            GROUP,
            VERSION,
            NS,
            PLURAL,
            field_selector="metadata.name=b",
            timeout_seconds=1,
        )
    ]
    assert events == [("ADDED", "b")]


def test_watch_too_old_is_410_gone(api: client.CustomObjectsApi, apiserver: FakeApiServer) -> None:
    first = create(api, service("a"))
    patch(api, "a", {"metadata": {"labels": {"x": "1"}}}, MERGE)
    apiserver.compact()
    with pytest.raises(ApiException) as gone:
        for _ in watch.Watch().stream(
            api.list_namespaced_custom_object,
            GROUP,
            VERSION,
            NS,
            PLURAL,
            resource_version=first["metadata"]["resourceVersion"],
            timeout_seconds=5,
        ):
            pass
    assert gone.value.status == 410
    raw = api.list_namespaced_custom_object(
        GROUP, VERSION, NS, PLURAL, watch=True, resource_version="1", timeout_seconds=5, _preload_content=False
    )
    try:
        event = json.loads(raw.data.decode().splitlines()[0])
    finally:
        raw.release_conn()
    assert event["type"] == "ERROR"
    assert event["object"]["code"] == 410 and event["object"]["reason"] == "Expired"


def test_a_watch_ends_when_the_server_stops(kubeconfig: Path, apiserver: FakeApiServer) -> None:
    api_client = config.new_client_from_config(config_file=str(kubeconfig), context="fake")
    api = client.CustomObjectsApi(api_client)
    ended = threading.Event()

    def consume() -> None:
        try:
            for _ in watch.Watch().stream(
                api.list_namespaced_custom_object, GROUP, VERSION, NS, PLURAL, timeout_seconds=60
            ):
                pass
        finally:
            ended.set()

    before = threading.active_count()
    consumer = threading.Thread(target=consume)
    consumer.start()
    deadline = time.monotonic() + 5
    while not apiserver.calls("GET", PLURAL) and time.monotonic() < deadline:
        time.sleep(0.01)
    apiserver.stop()
    assert ended.wait(5), "the watch did not end when the server stopped"
    consumer.join(5)
    api_client.close()
    assert threading.active_count() <= before


def test_python_side_writes_emit_events_and_only_client_writes_run_hooks(
    api: client.CustomObjectsApi, apiserver: FakeApiServer
) -> None:
    seen: list[tuple[str, str, str | None]] = []
    apiserver.on_write(
        "services.serving.knative.dev",
        lambda e: seen.append((e.type, e.object["metadata"]["resourceVersion"], e.old and e.old["metadata"]["name"])),
    )
    created = create(api, service("a"))
    rv = created["metadata"]["resourceVersion"]
    status = apiserver.set_status(PLURAL, NS, "a", {"phase": "x", "n": 1})
    assert status["status"] == {"phase": "x", "n": 1} and int(status["metadata"]["resourceVersion"]) > int(rv)
    assert apiserver.set_status(PLURAL, NS, "a", {"n": None})["status"] == {"phase": "x"}
    put = apiserver.put_object({**service("b"), "metadata": {"name": "b", "namespace": NS}})
    assert put["metadata"]["uid"] and put["metadata"]["generation"] == 1
    assert apiserver.delete_object(PLURAL, NS, "b") and not apiserver.delete_object(PLURAL, NS, "b")
    assert [(t, old) for t, _, old in seen] == [("ADDED", None), ("ADDED", None), ("DELETED", "b")]
    events = [
        (e["type"], e["object"]["metadata"]["name"], (e["object"].get("status") or {}).get("phase"))
        for e in watch.Watch().stream(
            api.list_namespaced_custom_object, GROUP, VERSION, NS, PLURAL, resource_version=rv, timeout_seconds=1
        )
    ]
    assert events == [("MODIFIED", "a", "x"), ("MODIFIED", "a", "x"), ("ADDED", "b", None), ("DELETED", "b", None)]
    assert [o["metadata"]["name"] for o in apiserver.objects(PLURAL, NS)] == ["a"]
    assert apiserver.get_object("services.serving.knative.dev", NS, "a") == get(api, "a")
    with pytest.raises(KeyError):
        apiserver.set_status(PLURAL, NS, "nope", {})


def test_deny_any_verb_list_and_watch(api: client.CustomObjectsApi, apiserver: FakeApiServer) -> None:
    apiserver.deny("*", "services.serving.knative.dev")
    with pytest.raises(ApiException) as listing:
        api.list_namespaced_custom_object(GROUP, VERSION, NS, PLURAL)
    assert listing.value.status == 403
    assert status_of(listing.value)["message"] == (
        f'services.serving.knative.dev is forbidden: User "{apiserver.user}" cannot list resource "services" '
        f'in API group "serving.knative.dev" in the namespace "{NS}"'
    )
    apiserver.allow("*", "services.serving.knative.dev")
    apiserver.deny("watch", "services")
    assert api.list_namespaced_custom_object(GROUP, VERSION, NS, PLURAL)["items"] == []
    with pytest.raises(ApiException) as watching:
        for _ in watch.Watch().stream(api.list_namespaced_custom_object, GROUP, VERSION, NS, PLURAL, timeout_seconds=1):
            pass
    assert watching.value.status == 403


def test_dry_run_generate_name_and_cluster_wide_list(api: client.CustomObjectsApi, apiserver: FakeApiServer) -> None:
    dry = api.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, service("a"), dry_run="All")
    assert dry["metadata"]["name"] == "a" and apiserver.objects(PLURAL) == []
    generated = create(api, {**service(""), "metadata": {"generateName": "fn-"}})
    assert generated["metadata"]["name"].startswith("fn-") and len(generated["metadata"]["name"]) > 3
    api.create_namespaced_custom_object(GROUP, VERSION, "other", PLURAL, service("b"))
    everywhere = api.list_cluster_custom_object(GROUP, VERSION, PLURAL)["items"]
    assert sorted((o["metadata"]["namespace"], o["metadata"]["name"]) for o in everywhere) == [
        ("kold-test", generated["metadata"]["name"]),
        ("other", "b"),
    ]
    with pytest.raises(ApiException) as nameless:
        create(api, {**service(""), "metadata": {}})
    assert nameless.value.status == 422


def test_requests_are_recorded_even_when_refused(apiserver: FakeApiServer) -> None:
    request = urllib.request.Request(f"{apiserver.url}/apis/{GROUP}/{VERSION}/namespaces/{NS}/{PLURAL}?limit=5")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=5)
    assert refused.value.code == 401
    assert json.loads(refused.value.read())["reason"] == "Unauthorized"
    refused.value.close()
    (recorded,) = apiserver.requests
    assert (recorded.method, recorded.query, recorded.resource and recorded.resource.plural) == (
        "GET",
        {"limit": "5"},
        PLURAL,
    )
    apiserver.clear_requests()
    assert apiserver.requests == []


# -- the pure parts (apimachinery.py) ---------------------------------------------------------------------


def test_merge_patch_is_rfc7386() -> None:
    target = {"a": {"b": 1, "c": [1, 2]}, "d": 1}
    assert merge_patch(target, {"a": {"b": None, "c": [3]}, "e": {"f": None}}) == {"a": {"c": [3]}, "d": 1, "e": {}}
    assert target == {"a": {"b": 1, "c": [1, 2]}, "d": 1}  # not modified in place
    assert merge_patch({"a": 1}, "x") == "x"


def test_json_patch_is_rfc6902() -> None:
    doc = {"a": [1, 2], "b": {"c": "d"}, "x/y": 1}
    ops = [
        {"op": "add", "path": "/a/-", "value": 3},
        {"op": "add", "path": "/a/0", "value": 0},
        {"op": "move", "from": "/b/c", "path": "/e"},
        {"op": "copy", "from": "/a", "path": "/f"},
        {"op": "remove", "path": "/x~1y"},
        {"op": "test", "path": "/e", "value": "d"},
    ]
    assert json_patch(doc, ops) == {"a": [0, 1, 2, 3], "b": {}, "e": "d", "f": [0, 1, 2, 3]}
    for bad in (
        [{"op": "replace", "path": "/missing", "value": 1}],
        [{"op": "remove", "path": "/a/9"}],
        [{"op": "frobnicate", "path": "/a"}],
        [{"op": "test", "path": "/e", "value": "z"}],
    ):
        with pytest.raises(ApiError) as failed:
            json_patch(doc, bad)
        assert failed.value.code == 422


def test_selectors_parse_and_refuse() -> None:
    obj = {"metadata": {"name": "n", "namespace": "s", "labels": {"a.io/b": "x", "c": ""}}}
    assert label_selector("a.io/b=x,c")(obj) and label_selector("")(obj)
    assert label_selector("a.io/b in (x,y),c notin (z)")(obj)
    assert not label_selector("a.io/b!=x")(obj) and not label_selector("!c")(obj)
    assert field_selector("metadata.name=n,metadata.namespace==s")(obj)
    assert not field_selector("metadata.name!=n")(obj)
    for bad in ("a in x", "=x", "a=(b)"):
        with pytest.raises(ApiError) as refused:
            label_selector(bad)
        assert refused.value.code == 400
    with pytest.raises(ApiError):
        field_selector("status.phase=Running")


def test_leaves_and_remove_path() -> None:
    obj = {"apiVersion": "v1", "metadata": {"name": "n", "labels": {"a": "1"}}, "spec": {"x": {"y": [1]}, "z": {}}}
    assert leaves(obj) == {("metadata", "labels", "a"): "1", ("spec", "x", "y"): [1], ("spec", "z"): {}}
    remove_path(obj, ("spec", "x", "y"))
    assert obj["spec"] == {"z": {}}  # the emptied map went with its leaf; the other stays
    remove_path(obj, ("spec", "nope", "deeper"))
    assert obj["spec"] == {"z": {}}
