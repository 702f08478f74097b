"""load_into: a meta-built module takes the restored views, with strict checks and no copies."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from kold.snapshot import build_snapshot, load_into, restore
from kold.snapshot.errors import TensorMismatchError


class Tiny(nn.Module):
    def __init__(self, vocab: int = 32, dim: int = 16, tie: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.proj = nn.Linear(dim, dim, bias=True)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.register_buffer("scale", torch.ones(dim))
        if tie:
            self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.proj(self.embed(ids)) * self.scale))


def _meta(**kwargs: object) -> Tiny:
    with torch.device("meta"):
        return Tiny(**kwargs)  # type: ignore[arg-type]


def _publish(tmp_path: Path, state: dict[str, torch.Tensor]) -> str:
    return build_snapshot(state, (tmp_path / "store").as_uri(), chunk_size=4096).uri


def test_loaded_model_matches_the_original_and_shares_the_buffer(tmp_path: Path) -> None:
    torch.manual_seed(0)
    original = Tiny()
    snap = restore(_publish(tmp_path, original.state_dict()))
    model = load_into(_meta(), snap)
    ids = torch.tensor([[1, 5, 7]])
    assert torch.equal(model(ids), original(ids))
    base, end = snap.buffer.data_ptr(), snap.buffer.data_ptr() + snap.buffer.numel()
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        assert base <= p.data_ptr() < end, f"{name} was copied"
        assert not p.requires_grad


def test_tied_weights_stored_once(tmp_path: Path) -> None:
    torch.manual_seed(0)
    original = Tiny(tie=True)
    state = {k: v for k, v in original.state_dict().items() if k != "head.weight"}
    snap = restore(_publish(tmp_path, state))
    model = load_into(_meta(tie=True), snap, tied={"head.weight": "embed.weight"})
    assert model.head.weight.data_ptr() == model.embed.weight.data_ptr()
    ids = torch.tensor([[3]])
    assert torch.equal(model(ids), original(ids))


def test_shape_mismatch_names_the_tensor(tmp_path: Path) -> None:
    snap = restore(_publish(tmp_path, Tiny(dim=16).state_dict()))
    with pytest.raises(TensorMismatchError, match=r"tensor 'scale' has shape \(16,\) but Tiny.scale expects \(8,\)"):
        load_into(_meta(dim=8), snap)


def test_dtype_mismatch_is_never_cast_silently(tmp_path: Path) -> None:
    snap = restore(_publish(tmp_path, Tiny().to(torch.bfloat16).state_dict()))
    with pytest.raises(
        TensorMismatchError, match=r"tensor 'scale' is torch.bfloat16 but Tiny.scale expects torch.float32"
    ):
        load_into(_meta(), snap)


def test_missing_and_unexpected_tensors_are_listed(tmp_path: Path) -> None:
    state = Tiny().state_dict()
    del state["proj.bias"]
    state["extra.weight"] = torch.zeros(2)
    snap = restore(_publish(tmp_path, state))
    with pytest.raises(
        TensorMismatchError, match=r"missing from the snapshot .*'proj.bias'.*not in the model: 'extra.weight'"
    ):
        load_into(_meta(), snap)


def test_plain_state_dicts_work_too() -> None:
    source = Tiny()
    model = load_into(_meta(), source.state_dict())
    assert torch.equal(model.proj.weight, source.proj.weight)
