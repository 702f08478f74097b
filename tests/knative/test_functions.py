"""KnativeFunctionSource through the real `kubernetes` client against the fake API server: one view per
kold Service (spec from the revision template, policy from `kold.dev/prewarm`), a Service that cannot be
read costs only itself (logged once), and an API failure is the tick's (it raises)."""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kold.controller.policies.registry import DEFAULT_POLICY
from kold.knative import names
from kold.knative.cluster import Cluster, ClusterConfig, Forbidden
from kold.knative.functions import KnativeFunctionSource
from kold.knative.service import FunctionDeploy, render_service
from tests.knative.apiserver import FakeApiServer
from tests.knative.conftest import NAMESPACE
from tests.knative.knative_sim import KnativeSim


@pytest.fixture
def cluster(kubeconfig: Path) -> Iterator[Cluster]:
    with Cluster(ClusterConfig(kubeconfig=str(kubeconfig))) as c:
        yield c


def service(name: str, **changes: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "name": name,
        "image": "registry.example/kold-runtime:1",
        "snapshot_uri": f"s3://models/{name}/snapshots/abc",
        "snapshot_id": "abc",
        "snapshot_bytes": 1 << 30,
        "namespace": NAMESPACE,
    }
    return render_service(FunctionDeploy(**(fields | changes)))


def test_each_kold_service_is_a_function_with_its_templates_scaling_and_its_prewarm_policy(
    apiserver: FakeApiServer, knative: KnativeSim, cluster: Cluster
) -> None:
    cluster.apply_service(
        service(
            "chat",
            min_instances=1,
            max_instances=6,
            target_concurrency=8,
            idle_timeout_s=90,
            prewarm="forecast:budget=300",
        )
    )
    cluster.apply_service(service("embed"))
    other = copy.deepcopy(service("not-kold"))
    del other["metadata"]["labels"][names.PART_OF]
    cluster.apply_service(other)
    knative.settle()

    views = {v.name: v for v in KnativeFunctionSource(cluster).list()}
    assert sorted(views) == ["chat", "embed"], "only Services labelled part-of=kold"
    chat = views["chat"]
    assert (chat.spec.min_instances, chat.spec.max_instances, chat.spec.target_concurrency) == (1, 6, 8)
    assert chat.spec.idle_timeout_s == 90 and chat.policy == "forecast:budget=300"
    assert views["embed"].policy == DEFAULT_POLICY
    (listed,) = [r for r in apiserver.calls("GET", "services") if r.resource and r.resource.name is None]
    assert listed.query.get("labelSelector") == names.KOLD_SELECTOR


def test_a_floor_on_the_revision_does_not_change_the_spec_the_policy_plans_with(
    knative: KnativeSim, cluster: Cluster
) -> None:
    cluster.apply_service(service("chat", min_instances=0))
    knative.settle()
    (rev,) = knative.revisions("chat", NAMESPACE)
    cluster.patch_revision_annotations(rev["metadata"]["name"], {names.MIN_SCALE: "3"})  # a floor
    (view,) = KnativeFunctionSource(cluster).list()
    assert view.spec.min_instances == 0


def test_a_service_that_cannot_be_read_costs_only_itself_and_is_logged_once(
    apiserver: FakeApiServer, knative: KnativeSim, cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    cluster.apply_service(service("good"))
    cluster.apply_service(service("edited", min_instances=2))
    knative.settle()
    source = KnativeFunctionSource(cluster)
    before = {v.name: v for v in source.list()}

    def edit(value: str) -> None:
        obj = apiserver.get_object("services", NAMESPACE, "edited")
        assert obj is not None
        obj["spec"]["template"]["metadata"]["annotations"][names.MIN_SCALE] = value
        apiserver.put_object(obj)
        knative.settle()

    edit("lots")  # a hand edit the webhook would refuse, but kold must survive
    with caplog.at_level(logging.INFO, logger="kold.knative.functions"):
        first = {v.name: v for v in source.list()}
        second = {v.name: v for v in source.list()}
        edit("1")
        third = {v.name: v for v in source.list()}
    assert first == second == before, "the view read before is kept: not taken for deleted"
    assert third["edited"].spec.min_instances == 1
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages
    assert "edited cannot be read" in messages[0] and names.MIN_SCALE in messages[0]
    assert "planned with the view read before" in messages[0]
    assert messages[1] == "Knative Service edited reads again"


def test_a_new_service_that_cannot_be_read_is_left_out_until_it_reads(
    apiserver: FakeApiServer, cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    bad = service("edited")
    bad["spec"]["template"]["metadata"]["annotations"][names.TARGET] = "-1"
    apiserver.put_object(bad)
    with caplog.at_level(logging.WARNING, logger="kold.knative.functions"):
        assert KnativeFunctionSource(cluster).list() == []
    assert "not planned" in caplog.records[0].getMessage()


def test_an_api_failure_is_the_ticks_problem(apiserver: FakeApiServer, cluster: Cluster) -> None:
    apiserver.deny("list", "services")
    with pytest.raises(Forbidden, match="list"):
        KnativeFunctionSource(cluster).list()
