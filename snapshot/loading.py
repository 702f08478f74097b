"""`load_into(module, snapshot)`: bind restored tensors to a model built on the meta device.

The model is built with no storage (`torch.device("meta")`), then every parameter and persistent
buffer is *assigned* the snapshot's view (`load_state_dict(assign=True)`): no allocation, no second
copy. Names, shapes and dtypes must match exactly; anything else is a `TensorMismatchError` that
names the tensor, because a silently cast or skipped weight produces a model that runs and is wrong.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from kold.snapshot.errors import TensorMismatchError

if TYPE_CHECKING:
    import torch

    from kold.snapshot.restorer import RestoredSnapshot

MAX_LISTED = 5


def _listing(names: list[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:MAX_LISTED])
    return shown + (f" and {len(names) - MAX_LISTED} more" if len(names) > MAX_LISTED else "")


def load_into(
    module: torch.nn.Module,
    snapshot: RestoredSnapshot | Mapping[str, torch.Tensor],
    *,
    tied: Mapping[str, str] | None = None,
) -> torch.nn.Module:
    """Assign the snapshot's tensors to `module`'s parameters and buffers, checking every one.

    `tied` maps a module key to the key it shares storage with (e.g. {"lm_head.weight":
    "model.embed_tokens.weight"} for tied embeddings), for checkpoints that store such weights once.
    """
    import torch

    tensors = snapshot if isinstance(snapshot, Mapping) else snapshot.tensors
    label = "state dict" if isinstance(snapshot, Mapping) else f"snapshot {snapshot.ref.snapshot_id}"
    tied = dict(tied or {})
    expected = module.state_dict(keep_vars=True)

    missing = [k for k in expected if k not in tensors and tied.get(k) not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing from the {label}: {_listing(missing)}")
        if unexpected:
            parts.append(f"not in the model: {_listing(unexpected)}")
        raise TensorMismatchError(f"{label} does not fit {type(module).__name__}: " + "; ".join(parts))

    assigned: dict[str, torch.Tensor] = {}
    for key, target in expected.items():
        source_key = key if key in tensors else tied[key]
        value = tensors[source_key]
        if tuple(value.shape) != tuple(target.shape):
            raise TensorMismatchError(
                f"{label}: tensor {source_key!r} has shape {tuple(value.shape)} but "
                f"{type(module).__name__}.{key} expects {tuple(target.shape)}"
            )
        if value.dtype != target.dtype:
            raise TensorMismatchError(
                f"{label}: tensor {source_key!r} is {value.dtype} but {type(module).__name__}.{key} "
                f"expects {target.dtype} (build the model with the snapshot's dtype; kold never casts silently)"
            )
        assigned[key] = value
    with torch.no_grad():
        module.load_state_dict(assigned, strict=True, assign=True)
    for name, param in module.named_parameters():
        param.requires_grad_(False)  # inference weights: no autograd bookkeeping
        if param.device.type == "meta":
            raise TensorMismatchError(f"{label}: parameter {name!r} is still on the meta device after loading")
    return module
