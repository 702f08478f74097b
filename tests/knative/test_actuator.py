"""KnativeActuator through the real `kubernetes` client against the fake API server and the Knative sim:
what a floor writes on the serving Revision (and never on the Service), the bases it keeps and gives
back, the warm-up request from zero (to a loopback HTTP server standing in for the activator), a floor
moving to a newer Revision, the node agents' wants in a real Redis, and failures that never raise."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis

from kold.controller.nodes import NodeWants
from kold.controller.scaling import Floor
from kold.knative import names
from kold.knative.actuator import KnativeActuator, clear_patch, floor_patch, held_until, serving_revision
from kold.knative.cluster import Cluster, ClusterConfig
from kold.knative.service import FunctionDeploy, render_service
from tests.knative.apiserver import MERGE, FakeApiServer
from tests.knative.conftest import NAMESPACE
from tests.knative.knative_sim import KnativeSim

T = TypeVar("T")
UNTIL = 1_900_000_000.0
FLOOR = Floor(2, UNTIL, "every 600 s: pre-warmed")
KOLD_KEYS = (names.FLOOR, names.BASE_MIN_SCALE, names.BASE_SCALE_DOWN_DELAY)


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


@pytest.fixture
def cluster(kubeconfig: Path) -> Iterator[Cluster]:
    with Cluster(ClusterConfig(kubeconfig=str(kubeconfig))) as c:
        yield c


def deploy(cluster: Cluster, knative: KnativeSim, name: str = "tiny", **changes: Any) -> str:
    """Deploy a function as `kold deploy --target knative` renders it; the name of its ready Revision.
    Unless the test gave its own, warm-up requests go to a loopback port nothing listens on (refused at
    once), never to a cluster-local name a resolver would be asked about."""
    if knative.address_base is None:
        knative.address_base = "http://127.0.0.1:9"
    fields: dict[str, Any] = {
        "name": name,
        "image": "registry.example/kold-runtime:1",
        "snapshot_uri": f"s3://models/{name}/snapshots/abc",
        "snapshot_id": "abc",
        "snapshot_bytes": 1 << 30,
        "namespace": NAMESPACE,
        "idle_timeout_s": 60.0,
    }
    cluster.apply_service(render_service(FunctionDeploy(**(fields | changes))))
    knative.settle()
    ready = serving_revision(cluster.get_service(name))
    assert ready is not None
    return ready


def annotations(cluster: Cluster, revision: str) -> dict[str, str]:
    return dict(cluster.get_revision(revision)["metadata"].get("annotations") or {})


def writes(apiserver: FakeApiServer) -> list[tuple[str, str]]:
    """Every non-read request as (method, resource plural)."""
    return [(r.method, r.resource.plural if r.resource else r.path) for r in apiserver.requests if r.method != "GET"]


# -- what a floor writes -----------------------------------------------------------------------------


def test_a_floor_raises_the_ready_revisions_min_scale_by_a_merge_patch_and_never_writes_the_service(
    apiserver: FakeApiServer, knative: KnativeSim, cluster: Cluster
) -> None:
    rev = deploy(cluster, knative)
    template_before = cluster.get_service("tiny")["spec"]["template"]
    apiserver.clear_requests()

    async def scenario() -> bool:
        actuator = KnativeActuator(cluster)
        try:
            return await actuator.set_floor("tiny", FLOOR)
        finally:
            await actuator.aclose()

    assert run(scenario()) is True
    ann = annotations(cluster, rev)
    assert ann[names.MIN_SCALE] == "2"
    assert ann[names.BASE_MIN_SCALE] == "0", "the revision's own min-scale, kept to give back"
    assert json.loads(ann[names.FLOOR]) == {"instances": 2, "until": UNTIL, "reason": "every 600 s: pre-warmed"}
    patches = apiserver.calls("PATCH", "revisions", rev)
    assert len(patches) == 1 and patches[0].content_type == MERGE
    assert set(patches[0].body) == {"metadata"} and set(patches[0].body["metadata"]) == {"annotations"}
    assert writes(apiserver) == [("PATCH", "revisions")], "the Service (its spec.template) is never written"
    assert cluster.get_service("tiny")["spec"]["template"] == template_before
    assert [r["metadata"]["name"] for r in knative.revisions("tiny", NAMESPACE)] == [rev], "no new Revision"


def test_every_annotation_a_floor_writes_is_one_knative_keeps_off_the_revisions_pods(
    apiserver: FakeApiServer, knative: KnativeSim, cluster: Cluster
) -> None:
    """Knative copies a Revision's annotations into its Deployment's pod template (a rollout of every
    pod) except those under `autoscaling.knative.dev` (v1.21+, knative/serving#16186): a floor that
    wrote anything else would restart the pods it is meant to keep warm."""
    rev = deploy(cluster, knative)
    apiserver.clear_requests()

    async def scenario() -> None:
        actuator = KnativeActuator(cluster)
        assert await actuator.set_floor("tiny", Floor(2, UNTIL, "pre-warm", idle_timeout_s=120.0))
        assert await actuator.set_floor("tiny", None)
        await actuator.aclose()

    run(scenario())
    written = {key for p in apiserver.calls("PATCH", "revisions", rev) for key in p.body["metadata"]["annotations"]}
    assert names.FLOOR in written and names.MIN_SCALE in written
    outside = sorted(key for key in written if not key.startswith("autoscaling.knative.dev"))
    assert outside == [], f"these would roll the revision's pods on every floor: {outside}"


def test_the_base_is_remembered_across_floors_and_given_back_on_clear(
    apiserver: FakeApiServer, knative: KnativeSim, cluster: Cluster
) -> None:
    rev = deploy(cluster, knative, min_instances=1)

    async def scenario() -> None:
        actuator = KnativeActuator(cluster)
        assert await actuator.set_floor("tiny", Floor(3, UNTIL, "a"))
        assert annotations(cluster, rev)[names.MIN_SCALE] == "3"
        assert await actuator.set_floor("tiny", Floor(2, UNTIL + 60, "b"))  # kold's 3 is not taken for the base
        ann = annotations(cluster, rev)
        assert (ann[names.MIN_SCALE], ann[names.BASE_MIN_SCALE]) == ("2", "1")
        assert await actuator.set_floor("tiny", Floor(0, UNTIL, "keep-alive only", idle_timeout_s=5.0))
        assert annotations(cluster, rev)[names.MIN_SCALE] == "1", "a floor never lowers the revision's own"
        assert await actuator.set_floor("tiny", None)
        await actuator.aclose()

    run(scenario())
    ann = annotations(cluster, rev)
    assert ann[names.MIN_SCALE] == "1" and ann[names.SCALE_DOWN_DELAY] == "60s"
    assert not set(KOLD_KEYS) & ann.keys()


def test_a_revision_without_a_min_scale_gets_none_back(knative: KnativeSim, cluster: Cluster) -> None:
    rev = deploy(cluster, knative)
    cluster.patch_revision_annotations(rev, {names.MIN_SCALE: None, names.SCALE_DOWN_DELAY: None})

    async def scenario() -> None:
        actuator = KnativeActuator(cluster)
        assert await actuator.set_floor("tiny", Floor(1, UNTIL, "a", idle_timeout_s=30.0))
        ann = annotations(cluster, rev)
        assert (ann[names.MIN_SCALE], ann[names.BASE_MIN_SCALE]) == ("1", "")
        assert names.SCALE_DOWN_DELAY not in ann and names.BASE_SCALE_DOWN_DELAY not in ann
        assert await actuator.set_floor("tiny", None)
        await actuator.aclose()

    run(scenario())
    ann = annotations(cluster, rev)
    assert names.MIN_SCALE not in ann and names.SCALE_DOWN_DELAY not in ann
    assert not set(KOLD_KEYS) & ann.keys()


def test_a_floors_idle_timeout_never_touches_scale_down_delay() -> None:
    """The KPA sizes a revision's scale-down delay window once, when its decider is made (`New` in
    pkg/autoscaler/scaling/autoscaler.go; `Update` swaps only the DeciderSpec): a patched value would
    do nothing on a live Revision. The floor ends at its until, as the gateway's does."""
    revision = {"metadata": {"annotations": {names.MIN_SCALE: "0", names.SCALE_DOWN_DELAY: "60s"}}}
    patch = floor_patch(revision, Floor(1, UNTIL, "r", idle_timeout_s=7200.0))
    assert names.SCALE_DOWN_DELAY not in patch and names.BASE_SCALE_DOWN_DELAY not in patch
    assert held_until(Floor(1, UNTIL, "r", idle_timeout_s=7200.0)) == UNTIL
    assert held_until(Floor(1, UNTIL, "r")) == UNTIL


def test_a_scale_down_delay_an_earlier_kold_changed_is_given_back(knative: KnativeSim, cluster: Cluster) -> None:
    first = deploy(cluster, knative, idle_timeout_s=45.0)
    serving = deploy(cluster, knative, idle_timeout_s=50.0)  # a second revision, serving now
    left = {names.SCALE_DOWN_DELAY: "3600s", names.BASE_SCALE_DOWN_DELAY: "45s", names.BASE_MIN_SCALE: "0"}
    cluster.patch_revision_annotations(first, left)
    cluster.patch_revision_annotations(serving, left | {names.BASE_SCALE_DOWN_DELAY: "50s"})

    async def scenario() -> None:
        actuator = KnativeActuator(cluster)
        assert await actuator.set_floor("tiny", Floor(1, UNTIL, "a", idle_timeout_s=10.0))
        await actuator.aclose()

    run(scenario())
    ann = annotations(cluster, serving)  # the floor's revision: its own delay back, the floor held
    assert ann[names.SCALE_DOWN_DELAY] == "50s" and names.BASE_SCALE_DOWN_DELAY not in ann
    assert ann[names.MIN_SCALE] == "1" and names.FLOOR in ann
    ann = annotations(cluster, first)  # the older one: cleared
    assert ann[names.SCALE_DOWN_DELAY] == "45s" and not set(KOLD_KEYS) & ann.keys()


def test_a_floor_above_max_scale_stops_at_max_scale(knative: KnativeSim, cluster: Cluster) -> None:
    rev = deploy(cluster, knative, max_instances=2)

    async def scenario() -> None:
        actuator = KnativeActuator(cluster)
        assert await actuator.set_floor("tiny", Floor(5, UNTIL, "a rising concurrency"))
        await actuator.aclose()

    run(scenario())
    ann = annotations(cluster, rev)
    assert ann[names.MIN_SCALE] == "2", "the webhook refuses min-scale above max-scale"
    assert json.loads(ann[names.FLOOR])["instances"] == 5, "the floor as asked is still shown"


def test_the_pure_patches_leave_a_revision_without_kolds_annotations_alone() -> None:
    revision = {"metadata": {"annotations": {names.MIN_SCALE: "1"}}}
    assert clear_patch(revision) == {}
    patch = floor_patch(revision, Floor(0, UNTIL, "r"))
    assert patch[names.MIN_SCALE] == "1" and names.SCALE_DOWN_DELAY not in patch


# -- a floor's end -------------------------------------------------------------------------------------


def test_a_floor_that_runs_out_gives_the_revision_its_own_back_and_a_renewed_one_does_not(
    knative: KnativeSim, cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    """A Revision's min-scale never runs out by itself (the gateway's floor does, and the loop sends
    nothing for a floor that ran out), so the actuator ends it at `until`."""
    rev = deploy(cluster, knative)
    now = 1_000.0

    async def scenario() -> None:
        nonlocal now
        actuator = KnativeActuator(cluster, clock=lambda: now, expiry_poll_s=0.01)
        assert await actuator.set_floor("tiny", Floor(2, 1_060.0, "a", idle_timeout_s=30.0))
        assert await actuator.set_floor("tiny", Floor(2, 1_120.0, "extended"))  # replaces the first
        now = 1_061.0
        await asyncio.sleep(0.1)
        assert annotations(cluster, rev)[names.MIN_SCALE] == "2", "the first floor's end is not the floor's"
        now = 1_121.0
        await wait_until(lambda: any(r.getMessage().startswith("tiny: floor ended (extended)") for r in caplog.records))
        await actuator.aclose()

    with caplog.at_level(logging.INFO, logger="kold.knative.actuator"):
        run(scenario())
    ann = annotations(cluster, rev)
    assert ann[names.MIN_SCALE] == "0" and ann[names.SCALE_DOWN_DELAY] == "60s"
    assert not set(KOLD_KEYS) & ann.keys()


def test_a_floor_ends_at_its_until_whatever_its_keep_alive(knative: KnativeSim, cluster: Cluster) -> None:
    """The Revision's min-scale is given back at the floor's until (the gateway's floor ends then too);
    the idle pods then go on the Revision's own scale-down-delay, which is never changed."""
    rev = deploy(cluster, knative)
    now = 1_000.0

    async def scenario() -> None:
        nonlocal now
        actuator = KnativeActuator(cluster, clock=lambda: now, expiry_poll_s=0.01)
        assert await actuator.set_floor("tiny", Floor(2, 1_060.0, "a", idle_timeout_s=30.0))
        now = 1_059.0
        await asyncio.sleep(0.1)
        assert annotations(cluster, rev)[names.MIN_SCALE] == "2", "held until its until"
        now = 1_061.0
        await wait_until(lambda: names.FLOOR not in annotations(cluster, rev))
        await actuator.aclose()

    run(scenario())
    ann = annotations(cluster, rev)
    assert ann[names.MIN_SCALE] == "0" and ann[names.SCALE_DOWN_DELAY] == "60s", "the delay was never changed"


def test_a_floor_whose_end_cannot_be_written_is_ended_once_the_cluster_allows_it(
    apiserver: FakeApiServer, knative: KnativeSim, cluster: Cluster
) -> None:
    rev = deploy(cluster, knative)
    now = 1_000.0

    async def scenario() -> None:
        nonlocal now
        actuator = KnativeActuator(cluster, clock=lambda: now, expiry_poll_s=0.01)
        assert await actuator.set_floor("tiny", Floor(1, 1_010.0, "a"))
        apiserver.deny("patch", "revisions")
        now = 1_011.0
        await asyncio.sleep(0.1)
        assert names.FLOOR in annotations(cluster, rev)
        apiserver.allow("patch", "revisions")
        await wait_until(lambda: names.FLOOR not in annotations(cluster, rev))
        await actuator.aclose()

    run(scenario())


# -- the warm-up request -----------------------------------------------------------------------------


class Activator:
    """A loopback HTTP server standing in for the activator: records each request (path, headers) and
    answers once `release` is set, as the activator holds a request until a pod is ready."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, str]]] = []
        self.release = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.seen.append((self.path, {k.lower(): v for k, v in self.headers.items()}))
                outer.release.wait(10)
                body = b'{"status": "ready"}'
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def activator() -> Iterator[Activator]:
    server = Activator()
    yield server
    server.close()


async def wait_until(check: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.02)


def test_a_floor_from_zero_sends_one_warm_up_request_through_the_activator_and_none_while_pods_run(
    knative: KnativeSim, cluster: Cluster, activator: Activator, caplog: pytest.LogCaptureFixture
) -> None:
    knative.address_base = activator.url
    rev = deploy(cluster, knative)  # the sim's revisions start at zero replicas

    async def scenario() -> None:
        actuator = KnativeActuator(cluster)
        assert await actuator.set_floor("tiny", FLOOR)
        await wait_until(lambda: len(activator.seen) == 1)
        assert await actuator.set_floor("tiny", Floor(3, UNTIL, "more"))  # still at zero, one in flight
        assert await actuator.set_floor("tiny", Floor(0, UNTIL, "none", idle_timeout_s=5.0))
        await asyncio.sleep(0.2)
        assert len(activator.seen) == 1, "one warm-up in flight per function"
        activator.release.set()
        await wait_until(lambda: not actuator._warmups)
        knative.set_replicas(rev, 1, NAMESPACE)
        assert await actuator.set_floor("tiny", Floor(2, UNTIL + 1, "again"))
        await asyncio.sleep(0.2)
        await actuator.aclose()

    with caplog.at_level(logging.INFO, logger="kold.knative.actuator"):
        run(scenario())
    assert len(activator.seen) == 1, "a revision with pods needs no warm-up"
    path, headers = activator.seen[0]
    assert path == f"/{NAMESPACE}/tiny/readyz"
    assert headers["x-kold-warmup"] == "1"
    assert any("warm-up request answered 200" in r.getMessage() for r in caplog.records)


def test_a_warm_up_that_is_not_answered_in_time_is_let_go_and_logged(
    knative: KnativeSim, cluster: Cluster, activator: Activator, caplog: pytest.LogCaptureFixture
) -> None:
    knative.address_base = activator.url
    deploy(cluster, knative)

    async def scenario() -> None:
        actuator = KnativeActuator(cluster, warmup_timeout_s=0.2)
        assert await actuator.set_floor("tiny", FLOOR)
        await wait_until(lambda: not actuator._warmups)
        await actuator.aclose()

    with caplog.at_level(logging.INFO, logger="kold.knative.actuator"):
        run(scenario())
    assert len(activator.seen) == 1
    assert any("not answered within 0.2 s" in r.getMessage() for r in caplog.records)


def test_a_warm_up_that_cannot_reach_the_service_is_warned_of_once_per_function(
    knative: KnativeSim, cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    deploy(cluster, knative)  # its address: a loopback port nothing listens on

    def failures(level: int) -> list[str]:
        return [r.getMessage() for r in caplog.records if r.levelno == level and "warm-up request to" in r.getMessage()]

    async def scenario() -> None:
        actuator = KnativeActuator(cluster)
        assert await actuator.set_floor("tiny", FLOOR)
        await wait_until(lambda: len(failures(logging.WARNING)) == 1)
        assert await actuator.set_floor("tiny", Floor(3, UNTIL, "more"))
        await wait_until(lambda: len(failures(logging.DEBUG)) == 1)
        await actuator.aclose()

    with caplog.at_level(logging.DEBUG, logger="kold.knative.actuator"):
        run(scenario())
    (warning,) = failures(logging.WARNING)
    assert warning.startswith("tiny: warm-up request to http://127.0.0.1:9/") and "the floor holds" in warning


# -- a newer revision ----------------------------------------------------------------------------------


def test_a_newer_ready_revision_takes_the_floor_and_the_old_one_gets_its_own_back(
    knative: KnativeSim, cluster: Cluster
) -> None:
    old = deploy(cluster, knative)

    async def scenario() -> str:
        actuator = KnativeActuator(cluster)
        assert await actuator.set_floor("tiny", FLOOR)
        knative.fail = "never"  # the next revision is still starting: the floor stays where traffic is
        cluster.apply_service(
            render_service(
                FunctionDeploy(
                    name="tiny",
                    image="registry.example/kold-runtime:2",
                    snapshot_uri="s3://models/tiny/snapshots/def",
                    snapshot_id="def",
                    snapshot_bytes=1 << 30,
                    namespace=NAMESPACE,
                )
            )
        )
        assert await actuator.set_floor("tiny", FLOOR)
        assert annotations(cluster, old)[names.MIN_SCALE] == "2"
        knative.fail = None
        new = deploy(cluster, knative, image="registry.example/kold-runtime:3")
        assert await actuator.set_floor("tiny", Floor(2, UNTIL + 30, "next"))
        await actuator.aclose()
        return new

    new = run(scenario())
    assert new != old
    assert annotations(cluster, new)[names.MIN_SCALE] == "2" and names.FLOOR in annotations(cluster, new)
    ann = annotations(cluster, old)
    assert ann[names.MIN_SCALE] == "0" and not set(KOLD_KEYS) & ann.keys()


def test_a_controller_that_restarts_clears_a_floor_an_earlier_one_left_on_an_old_revision(
    knative: KnativeSim, cluster: Cluster
) -> None:
    old = deploy(cluster, knative)

    async def first() -> None:
        actuator = KnativeActuator(cluster)
        assert await actuator.set_floor("tiny", FLOOR)
        await actuator.aclose()

    run(first())
    new = deploy(cluster, knative, image="registry.example/kold-runtime:2")

    async def scenario() -> None:
        actuator = KnativeActuator(cluster)  # a fresh one: it knows nothing of the first's floor
        assert await actuator.set_floor("tiny", FLOOR)
        await actuator.aclose()

    run(scenario())
    assert not set(KOLD_KEYS) & annotations(cluster, old).keys()
    assert annotations(cluster, new)[names.MIN_SCALE] == "2"


# -- failures ------------------------------------------------------------------------------------------


def test_forbidden_and_missing_give_false_logged_once_per_function_and_never_raise(
    apiserver: FakeApiServer, knative: KnativeSim, cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    deploy(cluster, knative)

    async def scenario() -> list[bool]:
        actuator = KnativeActuator(cluster)
        apiserver.deny("patch", "revisions")
        results = [await actuator.set_floor("tiny", FLOOR) for _ in range(3)]
        apiserver.allow("patch", "revisions")
        results.append(await actuator.set_floor("tiny", FLOOR))
        results += [await actuator.set_floor("ghost", FLOOR) for _ in range(2)]
        await actuator.aclose()
        return results

    with caplog.at_level(logging.INFO, logger="kold.knative.actuator"):
        assert run(scenario()) == [False, False, False, True, False, False]
    messages = [r.getMessage() for r in caplog.records if "warm-up" not in r.getMessage()]
    assert len(messages) == 3, messages
    assert messages[0].startswith("tiny: floor not delivered") and "patch" in messages[0]
    assert messages[1] == "tiny: its floor reaches the cluster again"
    assert messages[2].startswith("ghost: floor not delivered")


def test_a_function_with_no_ready_revision_is_not_floored_and_says_so_once(
    knative: KnativeSim, cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    knative.fail = "image-pull"
    cluster.apply_service(
        render_service(
            FunctionDeploy(
                name="broken",
                image="nope",
                snapshot_uri="s3://b/s",
                snapshot_id="s",
                snapshot_bytes=1,
                namespace=NAMESPACE,
            )
        )
    )
    knative.settle()

    async def scenario() -> list[bool]:
        actuator = KnativeActuator(cluster)
        results = [await actuator.set_floor("broken", FLOOR) for _ in range(2)]
        results.append(await actuator.set_floor("broken", None))  # nothing was floored: nothing to clear
        await actuator.aclose()
        return results

    with caplog.at_level(logging.WARNING, logger="kold.knative.actuator"):
        assert run(scenario()) == [False, False, True]
    assert [r.getMessage() for r in caplog.records] == [
        "broken: floor not delivered to Knative: its Knative Service has no ready revision yet (retrying)"
    ]
    (rev,) = knative.revisions("broken", NAMESPACE)
    assert not set(KOLD_KEYS) & (rev["metadata"].get("annotations") or {}).keys()


def test_clearing_a_function_that_is_gone_is_done(cluster: Cluster) -> None:
    async def scenario() -> bool:
        actuator = KnativeActuator(cluster)
        try:
            return await actuator.set_floor("ghost", None)
        finally:
            await actuator.aclose()

    assert run(scenario()) is True


def test_a_function_that_is_removed_and_forgotten_leaves_nothing_behind(
    apiserver: FakeApiServer, knative: KnativeSim, cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    """The loop clears a function it forgets (FORGET); the actuator keeps no lock, failure or warm-up
    record for it after that, however many functions come and go."""
    names_ = [f"fn{i}" for i in range(3)]
    for name in names_:
        deploy(cluster, knative, name)  # warm-ups go to a loopback port nothing listens on: they fail

    async def scenario() -> KnativeActuator:
        actuator = KnativeActuator(cluster)
        for name in names_:
            assert await actuator.set_floor(name, FLOOR)
        await wait_until(lambda: not actuator._warmups)
        assert actuator._warmups_failing == set(names_)
        apiserver.deny("get", "services")
        assert not await actuator.set_floor("fn0", Floor(3, UNTIL, "more"))
        assert actuator._failing == {"fn0": {"forbidden"}}
        apiserver.allow("get", "services")
        for name in names_:
            cluster.delete_service(name)
            knative.settle()
            assert await actuator.set_floor(name, None)  # what the loop's FORGET sends
        await actuator.aclose()
        return actuator

    with caplog.at_level(logging.DEBUG, logger="kold.knative.actuator"):
        actuator = run(scenario())
    assert actuator._locks == {} and actuator._failing == {} and actuator._warmups_failing == set()
    assert actuator._floors == {} and actuator._held == {}


def test_a_clear_of_a_function_still_deployed_keeps_its_warm_up_warning_said(
    knative: KnativeSim, cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    """A warm-up that cannot reach the Service is warned of once per function, not once per floor."""
    deploy(cluster, knative)

    def warnings() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "warm-up" in r.getMessage()]

    async def scenario() -> None:
        actuator = KnativeActuator(cluster)
        for until in (UNTIL, UNTIL + 1):
            assert await actuator.set_floor("tiny", Floor(1, until, "a"))
            await wait_until(lambda: not actuator._warmups)
            assert await actuator.set_floor("tiny", None)
        await actuator.aclose()

    with caplog.at_level(logging.DEBUG, logger="kold.knative.actuator"):
        run(scenario())
    assert len(warnings()) == 1


# -- the node agents -----------------------------------------------------------------------------------


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, socket_connect_timeout=1)
    yield client
    client.close()


@pytest.mark.redis
def test_a_floor_wants_the_revisions_snapshot_on_the_nodes_until_it_ends_and_a_clear_unwants_it(
    knative: KnativeSim, cluster: Cluster, redis_client: redis.Redis
) -> None:
    deploy(cluster, knative)
    prefix = f"kold-knative-test-{time.monotonic_ns()}:"
    wants = NodeWants(redis_client, prefix)
    try:

        async def scenario() -> None:
            actuator = KnativeActuator(cluster, wants=wants)
            assert await actuator.set_floor("tiny", FLOOR)
            (want,) = wants.wanted(now=UNTIL - 1)
            assert (want.function, want.uri, want.until, want.nbytes) == (
                "tiny",
                "s3://models/tiny/snapshots/abc",
                UNTIL,
                1 << 30,
            )
            assert await actuator.set_floor("tiny", None)
            await actuator.aclose()

        run(scenario())
        assert wants.wanted(now=UNTIL - 1) == []
    finally:
        redis_client.delete(wants.wants_key)


@pytest.mark.redis
def test_a_redis_that_is_away_never_fails_a_floor_and_is_logged_once(
    knative: KnativeSim, cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    rev = deploy(cluster, knative)
    away = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)  # nothing listens on port 1

    async def scenario() -> list[bool]:
        actuator = KnativeActuator(cluster, wants=NodeWants(away))
        results = [await actuator.set_floor("tiny", FLOOR), await actuator.set_floor("tiny", FLOOR)]
        await actuator.aclose()
        return results

    with caplog.at_level(logging.WARNING, logger="kold.knative.actuator"):
        assert run(scenario()) == [True, True]
    assert annotations(cluster, rev)[names.MIN_SCALE] == "2"
    messages = [r.getMessage() for r in caplog.records if "node agents" in r.getMessage()]
    assert len(messages) == 1 and "floors still hold" in messages[0]
