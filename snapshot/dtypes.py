"""The dtypes a snapshot can carry, and their names in kold, torch and safetensors.

One table, so the builder, the manifest validator and the restore agree on every name and size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from kold.snapshot.errors import UnsupportedDtypeError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class DType:
    name: str  # kold's manifest name
    safetensors: str  # dtype string in a safetensors header
    torch_attr: str  # attribute of the torch module
    itemsize: int


DTYPES: tuple[DType, ...] = (
    DType("bf16", "BF16", "bfloat16", 2),
    DType("fp16", "F16", "float16", 2),
    DType("fp32", "F32", "float32", 4),
    DType("fp64", "F64", "float64", 8),
    DType("int8", "I8", "int8", 1),
    DType("uint8", "U8", "uint8", 1),
    DType("int16", "I16", "int16", 2),
    DType("int32", "I32", "int32", 4),
    DType("int64", "I64", "int64", 8),
    DType("bool", "BOOL", "bool", 1),
    DType("fp8_e4m3", "F8_E4M3", "float8_e4m3fn", 1),
    DType("fp8_e5m2", "F8_E5M2", "float8_e5m2", 1),
)

_BY_NAME = {d.name: d for d in DTYPES}
_BY_SAFETENSORS = {d.safetensors: d for d in DTYPES}
_BY_TORCH_ATTR = {d.torch_attr: d for d in DTYPES}


def by_name(name: str) -> DType:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise UnsupportedDtypeError(
            f"dtype {name!r} is not supported by the snapshot format (supported: {', '.join(_BY_NAME)})"
        ) from None


def from_safetensors(code: str, *, tensor: str = "") -> DType:
    try:
        return _BY_SAFETENSORS[code]
    except KeyError:
        where = f" (tensor {tensor!r})" if tensor else ""
        raise UnsupportedDtypeError(f"safetensors dtype {code!r}{where} is not supported") from None


def from_torch(dtype: torch.dtype, *, tensor: str = "") -> DType:
    attr = str(dtype).removeprefix("torch.")
    try:
        return _BY_TORCH_ATTR[attr]
    except KeyError:
        where = f" (tensor {tensor!r})" if tensor else ""
        raise UnsupportedDtypeError(f"torch dtype {dtype}{where} is not supported") from None


def to_torch(d: DType) -> torch.dtype:
    import torch

    result: torch.dtype = getattr(torch, d.torch_attr)
    return result
