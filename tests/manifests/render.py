"""The manifests as `kubectl kustomize` renders them, shared by the manifest tests."""

from __future__ import annotations

import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
MANIFESTS = REPO / "manifests"
OVERLAYS = ("cpu", "gpu", "minio")

KUBECTL = shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed (it renders the kustomizations)")

Doc = dict[str, Any]


@cache
def render(overlay: str) -> tuple[Doc, ...]:
    """The overlay's objects as `kubectl kustomize` renders them (cached: each render is a subprocess)."""
    assert KUBECTL is not None
    result = subprocess.run(
        [KUBECTL, "kustomize", str(MANIFESTS / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"kubectl kustomize {overlay} failed: {result.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def knative_services(docs: tuple[Doc, ...]) -> list[Doc]:
    return [d for d in docs if d.get("apiVersion") == "serving.knative.dev/v1" and d.get("kind") == "Service"]


def built_in(docs: tuple[Doc, ...]) -> list[Doc]:
    """Every object of a Kubernetes built-in kind (everything but Knative's)."""
    return [d for d in docs if not str(d.get("apiVersion", "")).endswith(".knative.dev/v1")]


def the(docs: tuple[Doc, ...], kind: str, name: str) -> Doc:
    """The one object of `kind` named `name`."""
    (found,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


def env_of(container: Doc) -> dict[str, Any]:
    """A container's env by name: the value, or the valueFrom object."""
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}
