"""Fixtures for the snapshot engine: small generated models and fresh local stores."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from snapshot_helpers import reference_tensors

from kold.modelgen import write_random_model


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_model(tmp_path_factory.mktemp("models") / "tiny", "llama", "tiny", seed=1)


@pytest.fixture(scope="session")
def sharded_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model cut into several shards with an index, as big checkpoints are published."""
    return write_random_model(
        tmp_path_factory.mktemp("models") / "sharded", "llama", "tiny", seed=2, shard_bytes=60_000
    )


@pytest.fixture
def store_uri(tmp_path: Path) -> str:
    return (tmp_path / "store").as_uri()


@pytest.fixture
def reference(tiny_model: Path) -> dict[str, torch.Tensor]:
    return reference_tensors(tiny_model)
