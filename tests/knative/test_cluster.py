"""kold.knative.cluster and readiness.wait_ready through the real `kubernetes` client, against the fake
API server on loopback (tests/knative/apiserver.py) with Knative's controllers simulated (knative_sim.py).

What is asserted is what went over the wire (the recorded requests: verb, content type, fieldManager)
and what a user reads when the cluster says no (one line naming the verb, the resource, the namespace).
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from kold.knative import names
from kold.knative.cluster import (
    Cluster,
    ClusterConfig,
    Forbidden,
    Gone,
    KnativeError,
    NotFound,
    NotInstalled,
)
from kold.knative.readiness import FAILED, READY, Progress, WaitTimeoutError, wait_ready
from kold.knative.service import FunctionDeploy, render_service

from .apiserver import FakeApiServer
from .conftest import CONTEXT, NAMESPACE
from .knative_sim import KnativeSim

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def cluster(kubeconfig: Path) -> Iterator[Cluster]:
    with Cluster(ClusterConfig(kubeconfig=str(kubeconfig))) as c:
        yield c


def body(image: str = "registry.example/kold-runtime:1", **changes: Any) -> dict[str, Any]:
    fn = FunctionDeploy(
        name="tiny",
        image=image,
        snapshot_uri="s3://models/snapshots/abc",
        snapshot_id="abc",
        snapshot_bytes=1 << 20,
        **changes,
    )
    return render_service(fn)


def test_the_context_names_the_namespace_and_a_flag_overrides_it(kubeconfig: Path) -> None:
    with Cluster(ClusterConfig(kubeconfig=str(kubeconfig))) as c:
        assert c.namespace == NAMESPACE and CONTEXT in c.source
    with Cluster(ClusterConfig(kubeconfig=str(kubeconfig), namespace="other", context=CONTEXT)) as c:
        assert c.namespace == "other"


def test_apply_is_server_side_apply_by_kold_and_creates_the_service(
    apiserver: FakeApiServer, knative: KnativeSim, cluster: Cluster
) -> None:
    applied = cluster.apply_service(body())
    assert applied["metadata"]["name"] == "tiny" and applied["metadata"]["namespace"] == NAMESPACE
    (request,) = apiserver.calls("PATCH", "services", "tiny")
    assert request.content_type.startswith("application/apply-patch+yaml")
    assert request.query.get("fieldManager") == "kold" and request.query.get("force") == "true"
    assert request.body["metadata"]["labels"][names.FUNCTION] == "tiny"
    stored = apiserver.get_object("services", NAMESPACE, "tiny")
    assert stored is not None and stored["metadata"]["labels"] == {names.PART_OF: "kold", names.FUNCTION: "tiny"}
    assert [r["metadata"]["name"] for r in knative.revisions("tiny", NAMESPACE)] == ["tiny-00001"]


def test_a_second_apply_updates_it_and_knative_makes_a_second_revision(
    apiserver: FakeApiServer, knative: KnativeSim, cluster: Cluster
) -> None:
    cluster.apply_service(body())
    updated = cluster.apply_service(body(image="registry.example/kold-runtime:2"))
    assert updated["metadata"]["generation"] == 2
    assert len(apiserver.calls("PATCH", "services", "tiny")) == 2 and not apiserver.calls("PUT", "services")
    revisions = knative.revisions("tiny", NAMESPACE)
    assert [r["metadata"]["name"] for r in revisions] == ["tiny-00001", "tiny-00002"]
    assert revisions[-1]["spec"]["containers"][0]["image"] == "registry.example/kold-runtime:2"
    assert [s["metadata"]["name"] for s in cluster.list_services()] == ["tiny"]
    assert {r["metadata"]["name"] for r in cluster.list_revisions("tiny")} == {"tiny-00001", "tiny-00002"}


def test_without_server_side_apply_it_creates_then_replaces_keeping_others_annotations(
    apiserver: FakeApiServer, knative: KnativeSim, cluster: Cluster
) -> None:
    cluster.apply_service(body(), server_side=False)
    assert len(apiserver.calls("POST", "services")) == 1
    svc = apiserver.get_object("services", NAMESPACE, "tiny")
    assert svc is not None
    svc["metadata"]["annotations"]["team.example/owner"] = "ml-platform"
    apiserver.put_object(svc, "services")

    cluster.apply_service(body(image="registry.example/kold-runtime:2", prewarm="forecast"), server_side=False)
    (put,) = apiserver.calls("PUT", "services", "tiny")
    assert put.body["metadata"]["resourceVersion"]  # a replace names the version it read
    stored = apiserver.get_object("services", NAMESPACE, "tiny")
    assert stored is not None
    assert stored["metadata"]["annotations"]["team.example/owner"] == "ml-platform"
    assert stored["metadata"]["annotations"][names.PREWARM] == "forecast"
    assert stored["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.example/kold-runtime:2"


def test_a_stale_resource_version_in_the_replace_is_read_again_and_retried(
    apiserver: FakeApiServer, knative: KnativeSim, cluster: Cluster
) -> None:
    """Status writes (Knative's) land between kold's get and its replace: the replace gets 409 and is
    retried from a fresh read, instead of failing the deploy or overwriting what it did not read."""
    cluster.apply_service(body(), server_side=False)
    knative.settle()
    stop = threading.Event()

    def bump() -> None:  # Knative writing status, as fast as it can, until kold has had to retry once
        n = 0
        while not stop.is_set():
            n += 1
            apiserver.set_status("services", NAMESPACE, "tiny", {"bump": n})
            if len(apiserver.calls("PUT", "services", "tiny")) >= 2:
                return

    for attempt in range(40):
        apiserver.clear_requests()
        stop.clear()
        bumper = threading.Thread(target=bump)
        bumper.start()
        try:
            cluster.apply_service(body(image=f"registry.example/kold-runtime:{attempt}"), server_side=False)
        finally:
            stop.set()
            bumper.join()
        puts = apiserver.calls("PUT", "services", "tiny")
        stored = apiserver.get_object("services", NAMESPACE, "tiny")
        assert stored is not None
        assert (
            stored["spec"]["template"]["spec"]["containers"][0]["image"] == f"registry.example/kold-runtime:{attempt}"
        )
        if len(puts) >= 2:  # a 409 happened and the retry won
            assert len(apiserver.calls("GET", "services", "tiny")) >= 2
            assert puts[-1].body["metadata"]["resourceVersion"] != puts[0].body["metadata"]["resourceVersion"]
            return
    pytest.fail("no write ever landed between kold's get and its replace in 40 tries")


def test_403_names_the_user_the_verb_the_resource_and_the_namespace(apiserver: FakeApiServer, cluster: Cluster) -> None:
    apiserver.deny("patch", "services")
    with pytest.raises(Forbidden) as info:
        cluster.apply_service(body())
    assert str(info.value) == (
        f'forbidden: user "{apiserver.user}" cannot patch services.serving.knative.dev in namespace {NAMESPACE} '
        "— RBAC must allow it"
    )
    apiserver.deny("list", "services")
    with pytest.raises(Forbidden, match=r"cannot list services\.serving\.knative\.dev in namespace kold-test"):
        cluster.list_services()


def test_absent_objects_are_not_found_in_one_line(apiserver: FakeApiServer, cluster: Cluster) -> None:
    with pytest.raises(NotFound, match=f"^no service nope in namespace {NAMESPACE}$"):
        cluster.get_service("nope")
    with pytest.raises(NotFound, match=r"^no service nope"):
        cluster.delete_service("nope")
    with pytest.raises(NotFound, match=r"^no revision nope-00001"):
        cluster.get_revision("nope-00001")


def test_a_cluster_without_knative_serving_is_named(apiserver: FakeApiServer, tmp_path: Path) -> None:
    # an API server with nothing at the Knative paths: its 404 is no object's NotFound
    config = _kubeconfig(tmp_path, f"{apiserver.url}/not-knative", apiserver.token)
    with Cluster(ClusterConfig(kubeconfig=str(config))) as c:
        with pytest.raises(NotInstalled) as info:
            c.list_services()
        assert str(info.value).startswith(
            "Knative Serving is not installed on this cluster (no services.serving.knative.dev)"
        )
        with pytest.raises(NotInstalled):
            c.get_service("tiny")


def test_a_refused_connection_names_the_server_and_the_kubeconfig_context(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    config = _kubeconfig(tmp_path, f"http://127.0.0.1:{port}", "t")
    with Cluster(ClusterConfig(kubeconfig=str(config))) as c, pytest.raises(KnativeError) as info:
        c.list_services()
    assert str(info.value) == (
        f"cannot reach the Kubernetes API server at http://127.0.0.1:{port} "
        f"(kubeconfig {config}, context elsewhere): connection refused"
    )


def test_bad_credentials_and_bad_kubeconfigs_are_one_line(apiserver: FakeApiServer, tmp_path: Path) -> None:
    config = _kubeconfig(tmp_path, apiserver.url, "wrong-token")
    with Cluster(ClusterConfig(kubeconfig=str(config))) as c, pytest.raises(KnativeError, match=r"^unauthorized: "):
        c.list_services()
    with pytest.raises(KnativeError, match=r"kubeconfig .*: no context 'prod' \(contexts: elsewhere\)"):
        Cluster(ClusterConfig(kubeconfig=str(config), context="prod"))
    with pytest.raises(KnativeError, match=r"^kubeconfig /nonexistent/kubeconfig: no such file$"):
        Cluster(ClusterConfig(kubeconfig="/nonexistent/kubeconfig"))


def test_revision_annotations_are_merge_patched_and_none_deletes(
    apiserver: FakeApiServer, knative: KnativeSim, cluster: Cluster
) -> None:
    cluster.apply_service(body())
    patched = cluster.patch_revision_annotations("tiny-00001", {names.MIN_SCALE: "3", names.FLOOR: "{}"})
    assert patched["metadata"]["annotations"][names.MIN_SCALE] == "3"
    (request,) = apiserver.calls("PATCH", "revisions", "tiny-00001")
    assert request.content_type.startswith("application/merge-patch+json")
    cleared = cluster.patch_revision_annotations("tiny-00001", {names.FLOOR: None})
    assert names.FLOOR not in cleared["metadata"]["annotations"]
    assert cluster.get_revision("tiny-00001")["metadata"]["annotations"][names.MIN_SCALE] == "3"


def test_watch_yields_changes_and_an_expired_version_is_gone(
    apiserver: FakeApiServer, knative: KnativeSim, cluster: Cluster
) -> None:
    created = cluster.apply_service(body())
    events = []
    for kind, obj in cluster.watch_service("tiny", created["metadata"]["resourceVersion"], timeout_s=5):
        events.append(kind)
        if (obj.get("status") or {}).get("url"):
            break
    assert events and set(events) == {"MODIFIED"}
    apiserver.set_status("services", NAMESPACE, "tiny", {"bump": 1})
    apiserver.compact()
    with pytest.raises(Gone):
        list(cluster.watch_service("tiny", created["metadata"]["resourceVersion"], timeout_s=5))


def test_wait_ready_follows_the_conditions_to_ready(
    apiserver: FakeApiServer, knative: KnativeSim, cluster: Cluster
) -> None:
    seen: list[Progress] = []
    cluster.apply_service(body())
    progress = wait_ready(cluster, "tiny", 30, seen.append)
    assert progress.state == READY and progress.url == f"http://tiny.{NAMESPACE}.example.com"
    assert progress.revision == "tiny-00001"
    assert seen[-1] == progress and all(p.state != READY for p in seen[:-1])
    assert len({p.message for p in seen}) == len(seen)  # each change told once


def test_wait_ready_never_takes_the_previous_revisions_ready_for_the_new_one(
    apiserver: FakeApiServer, knative: KnativeSim, cluster: Cluster
) -> None:
    cluster.apply_service(body())
    assert wait_ready(cluster, "tiny", 30).state == READY
    knative.fail = "image-pull"
    knative.ready_after_s = 0.5
    cluster.apply_service(body(image="registry.example/missing:1"))
    progress = wait_ready(cluster, "tiny", 30)
    assert progress.state == FAILED and progress.kind == "image-pull" and progress.revision == "tiny-00002"
    assert "Unable to fetch image" in progress.message


def test_wait_ready_re_reads_when_the_watch_history_is_gone(
    apiserver: FakeApiServer, knative: KnativeSim, cluster: Cluster
) -> None:
    knative.ready_after_s = 1.0
    cluster.apply_service(body())
    compacted = []

    def compact_once(progress: Progress) -> None:
        if not compacted:  # between wait_ready's read and its watch: that version's history is gone
            apiserver.set_status("services", NAMESPACE, "tiny", {"bump": 1})
            apiserver.compact()
            compacted.append(progress)

    apiserver.clear_requests()
    assert wait_ready(cluster, "tiny", 30, compact_once).state == READY
    assert len(apiserver.calls("GET", "services", "tiny")) >= 2  # read again after the 410


def test_wait_ready_gives_up_at_its_deadline(apiserver: FakeApiServer, knative: KnativeSim, cluster: Cluster) -> None:
    knative.fail = "never"
    cluster.apply_service(body())
    with pytest.raises(WaitTimeoutError) as info:
        wait_ready(cluster, "tiny", 1.5)
    assert str(info.value).startswith("tiny was not Ready within 2 s: ")
    assert info.value.last.state == "pending"


def test_wait_ready_on_a_deleted_service_says_so(
    apiserver: FakeApiServer, knative: KnativeSim, cluster: Cluster
) -> None:
    knative.fail = "never"
    cluster.apply_service(body())
    threading.Timer(0.3, lambda: apiserver.delete_object("services", NAMESPACE, "tiny")).start()
    with pytest.raises(NotFound, match="deleted while kold waited"):
        wait_ready(cluster, "tiny", 30)


def _kubeconfig(tmp_path: Path, server: str, token: str) -> Path:
    path = tmp_path / "other-kubeconfig"
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": server}}],
                "users": [{"name": "u", "user": {"token": token}}],
                "contexts": [{"name": "elsewhere", "context": {"cluster": "c", "user": "u", "namespace": "ml"}}],
                "current-context": "elsewhere",
            }
        )
    )
    return path
