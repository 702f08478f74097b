"""kold.knative.readiness.assess: a Service's state and its one line, from the status Knative writes (pure)."""

from __future__ import annotations

from typing import Any

import pytest

from kold.knative.readiness import FAILED, PENDING, READY, assess


def cond(kind: str, status: str, reason: str = "", message: str = "") -> dict[str, Any]:
    c = {"type": kind, "status": status}
    if reason:
        c["reason"] = reason
    if message:
        c["message"] = message
    return c


def service(generation: int = 2, observed: int | None = 2, conditions: list[Any] | None = None, **status: Any) -> Any:
    st: dict[str, Any] = {"conditions": conditions or [], **status}
    if observed is not None:
        st["observedGeneration"] = observed
    return {"metadata": {"name": "tiny", "generation": generation}, "status": st}


READY_CONDITIONS = [cond("ConfigurationsReady", "True"), cond("RoutesReady", "True"), cond("Ready", "True")]


def test_ready_when_the_current_generation_is_ready_with_its_url() -> None:
    p = assess(
        service(
            conditions=READY_CONDITIONS,
            url="http://tiny.ml.example.com",
            latestCreatedRevisionName="tiny-00002",
            latestReadyRevisionName="tiny-00002",
        )
    )
    assert p.state == READY and p.done and p.url == "http://tiny.ml.example.com"
    assert p.message == "Ready: http://tiny.ml.example.com" and p.revision == "tiny-00002"


def test_a_stale_ready_from_the_previous_generation_never_counts() -> None:
    # the spec was just applied (generation 3); the status is still the old revision's Ready=True
    p = assess(service(generation=3, observed=2, conditions=READY_CONDITIONS, url="http://tiny"))
    assert p.state == PENDING
    assert p.message == "waiting for Knative to take generation 3 (status is of generation 2)"
    assert assess(service(observed=None, conditions=READY_CONDITIONS)).state == PENDING


def test_ready_but_the_new_revision_is_not_the_ready_one_is_still_pending() -> None:
    p = assess(
        service(
            conditions=READY_CONDITIONS,
            latestCreatedRevisionName="tiny-00003",
            latestReadyRevisionName="tiny-00002",
        )
    )
    assert p.state == PENDING and p.message == "revision tiny-00003 is not ready yet (tiny-00002 is)"


def test_pending_names_the_condition_that_waits_and_why() -> None:
    p = assess(
        service(
            conditions=[
                cond("ConfigurationsReady", "Unknown", "RevisionMissing", "Configuration is waiting for a Revision"),
                cond("RoutesReady", "Unknown"),
                cond("Ready", "Unknown", "RevisionMissing"),
            ]
        )
    )
    assert p.state == PENDING and not p.done
    assert p.message == "ConfigurationsReady Unknown: RevisionMissing: Configuration is waiting for a Revision"
    assert assess(service(conditions=[])).message == "waiting for Knative to report the Ready condition"


def test_a_failed_image_pull_is_named_from_the_condition_underneath_ready() -> None:
    msg = 'Revision "tiny-00001" failed with message: Unable to fetch image "nope:1": manifest unknown.'
    p = assess(
        service(
            conditions=[
                cond("ConfigurationsReady", "False", "RevisionFailed", msg),
                cond("RoutesReady", "Unknown"),
                cond("Ready", "False", "RevisionFailed", msg),
            ]
        )
    )
    assert p.state == FAILED and p.done and p.condition == "ConfigurationsReady"
    assert p.message == f"ConfigurationsReady False: RevisionFailed: {msg}"
    assert p.kind == "image-pull"  # "Unable to fetch image" is Knative's image-pull failure
    assert "\n" not in p.message


@pytest.mark.parametrize(
    ("reason", "message", "kind"),
    [
        ("ContainerMissing", "Unable to fetch image", "image-pull"),
        ("RevisionFailed", 'failed with message: Back-off pulling image "x"', "image-pull"),
        ("ProgressDeadlineExceeded", "Initial scale was never achieved", "progress-deadline"),
        ("RevisionFailed", "Revision failed to become ready within its progress deadline", "progress-deadline"),
        ("RevisionFailed", "Container failed with: OOMKilled", "revision"),
    ],
)
def test_what_failed_is_classified_for_the_user(reason: str, message: str, kind: str) -> None:
    p = assess(service(conditions=[cond("Ready", "False", reason, message)]))
    assert p.state == FAILED and p.kind == kind


def test_a_multi_line_condition_message_is_one_line() -> None:
    p = assess(service(conditions=[cond("Ready", "False", "RevisionFailed", "first\nsecond\n  third")]))
    assert p.message == "Ready False: RevisionFailed: first second third"


def test_a_service_without_generation_fields_is_read_from_its_conditions() -> None:
    svc = {"metadata": {"name": "x"}, "status": {"conditions": READY_CONDITIONS, "url": "http://x"}}
    assert assess(svc).state == READY
    assert assess({"metadata": {"name": "x"}}).state == PENDING
