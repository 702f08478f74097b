"""Helpers shared by the snapshot tests (a module of its own: `conftest` is not importable by name
once several test folders each have one)."""

from __future__ import annotations

from pathlib import Path

import torch

SMALL_CHUNK = 64 << 10  # many chunks even for the tiny model, so the pipeline really runs in parallel


def reference_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(str(path)))
    return out
