"""Fixtures for the Knative target's tests: a fake Kubernetes API server on loopback (apiserver.py), a
kubeconfig that points the official `kubernetes` client at it, and a stand-in for Knative's controllers
(knative_sim.py). Everything is per test, and torn down with its threads joined."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .apiserver import FakeApiServer
from .knative_sim import KnativeSim

NAMESPACE = "kold-test"
CONTEXT = "fake"


@pytest.fixture
def apiserver() -> Iterator[FakeApiServer]:
    """A fresh server per test; a hook that raised fails the test (a controller stand-in must not break)."""
    with FakeApiServer() as server:
        yield server
    assert not server.hook_errors, f"on_write hooks raised: {server.hook_errors!r}"


@pytest.fixture
def kubeconfig(apiserver: FakeApiServer, tmp_path: Path) -> Path:
    """A kubeconfig file whose context "fake" (namespace "kold-test") reaches `apiserver` with its token."""
    return apiserver.kubeconfig(tmp_path / "kubeconfig", namespace=NAMESPACE, context=CONTEXT)


@pytest.fixture
def knative(apiserver: FakeApiServer) -> Iterator[KnativeSim]:
    """Knative's controllers, simulated on `apiserver`: Services become Ready 0.2 s after each change.
    Set `knative.fail`, `.ready_after_s`, `.address_base` or `.replicas` before the write they should affect."""
    sim = KnativeSim(apiserver, ready_after_s=0.2)
    yield sim
    sim.close()
    assert not sim.errors, f"the Knative sim raised: {sim.errors!r}"
