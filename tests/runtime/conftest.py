"""Fixtures of the runtime tests: a tiny model snapshot with a real tokenizer, runtime processes."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from runtime_helpers import RuntimeProcess

# -- a tiny model snapshot -------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_snapshot(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny random Llama with a real tokenizer, published to a local store: its snapshot URI."""
    from kold.modelgen import write_random_model
    from kold.snapshot import build_snapshot

    root = tmp_path_factory.mktemp("runtime-model")
    model_dir = write_random_model(root / "tiny", "llama", "tiny", seed=3)
    result = build_snapshot(model_dir, (root / "store").as_uri(), chunk_size=64 << 10)
    return result.uri


@pytest.fixture
def start_runtime(tiny_snapshot: str, tmp_path: Path) -> Iterator[Callable[..., RuntimeProcess]]:
    """`start_runtime(*serve_args, env={...})`: a runtime process, killed at the end if still running."""
    started: list[RuntimeProcess] = []

    def start(*args: str, env: dict[str, str] | None = None) -> RuntimeProcess:
        process = RuntimeProcess(tiny_snapshot, tmp_path, *args, env=env)
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()


@pytest.fixture(scope="module")
def shared_runtime(tiny_snapshot: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RuntimeProcess]:
    """One ready runtime (4 slots, 128-token context) for the tests that do not stop it."""
    process = RuntimeProcess(
        tiny_snapshot,
        tmp_path_factory.mktemp("shared-runtime"),
        "--max-batch",
        "4",
        "--max-seq-len",
        "128",
        "--served-model-name",
        "tiny",
    )
    try:
        process.wait_listening()
        process.wait_ready()
        yield process
    finally:
        process.kill()
