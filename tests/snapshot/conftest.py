"""Fixtures for the snapshot engine: small generated models and fresh local stores."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kold.modelgen import write_random_llama

SMALL_CHUNK = 64 << 10  # many chunks even for the tiny model, so the pipeline really runs in parallel


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_llama(tmp_path_factory.mktemp("models") / "tiny", "tiny", seed=1)


@pytest.fixture(scope="session")
def sharded_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model cut into several shards with an index, as big checkpoints are published."""
    return write_random_llama(tmp_path_factory.mktemp("models") / "sharded", "tiny", seed=2, shard_bytes=60_000)


@pytest.fixture
def store_uri(tmp_path: Path) -> str:
    return (tmp_path / "store").as_uri()


def reference_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(str(path)))
    return out


@pytest.fixture
def reference(tiny_model: Path) -> dict[str, torch.Tensor]:
    return reference_tensors(tiny_model)
