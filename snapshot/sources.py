"""Where a snapshot's tensors come from when it is built: a Hugging Face directory or a state dict.

Both are turned into the same list of `TensorSource`s that can copy their bytes into a caller's
buffer piece by piece, so the builder streams any model with memory bounded by one chunk. Safetensors
headers are parsed here directly (an 8-byte length and a JSON table, per the safetensors spec) so the
data can be read with `preadv` into the chunk buffer rather than materialised as tensors.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kold.snapshot import dtypes
from kold.snapshot.errors import ModelSourceError, UnsupportedDtypeError

if TYPE_CHECKING:
    import torch

# Small model files carried with the weights: config, tokenizer, chat template, generation config.
CARRIED_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken")
NOT_CARRIED = {"model.safetensors.index.json", "pytorch_model.bin.index.json"}
MAX_CARRIED_FILE_BYTES = 64 << 20
MAX_HEADER_BYTES = 100 << 20  # safetensors itself refuses headers over 100 MB


@dataclass(frozen=True)
class TensorSource:
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    # copy bytes [start, start + len(dest)) of this tensor into dest
    read: Callable[[int, memoryview], None]


@dataclass(frozen=True)
class ModelSource:
    tensors: tuple[TensorSource, ...]
    files: Mapping[str, bytes]
    metadata: Mapping[str, str]
    description: str
    close: Callable[[], None] = lambda: None


def _pread_exact(fd: int, dest: memoryview, offset: int, path: Path) -> None:
    done = 0
    while done < len(dest):
        n = os.preadv(fd, [dest[done:]], offset + done)
        if n == 0:
            raise ModelSourceError(f"{path}: file ends before the tensor data does (truncated shard?)")
        done += n


def read_safetensors_header(path: Path) -> tuple[dict[str, dict[str, object]], int]:
    """Return (tensor table, byte offset where the data section starts)."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ModelSourceError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (length,) = struct.unpack("<Q", head)
        if length > MAX_HEADER_BYTES:
            raise ModelSourceError(f"{path}: safetensors header of {length} bytes is not plausible")
        raw = f.read(length)
    if len(raw) != length:
        raise ModelSourceError(f"{path}: safetensors header is truncated")
    try:
        table = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelSourceError(f"{path}: safetensors header is not valid JSON ({exc})") from None
    if not isinstance(table, dict):
        raise ModelSourceError(f"{path}: safetensors header is not a JSON object")
    table.pop("__metadata__", None)
    return table, 8 + length


def _shard_paths(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (KeyError, TypeError, ValueError, UnicodeDecodeError) as exc:
            raise ModelSourceError(f"{index}: not a valid safetensors index ({exc})") from None
        names = sorted(set(weight_map.values()))
        for name in names:
            if "/" in name or "\\" in name or name.startswith(".."):
                raise ModelSourceError(f"{index}: shard name {name!r} is not a plain file name")
        paths = [model_dir / n for n in names]
        missing = [p.name for p in paths if not p.is_file()]
        if missing:
            raise ModelSourceError(f"{model_dir}: shards named in the index are missing: {', '.join(missing)}")
        return paths
    paths = sorted(model_dir.glob("*.safetensors"))
    if not paths:
        other = [p.name for p in model_dir.glob("*.bin")] + [p.name for p in model_dir.glob("*.pt")]
        hint = f" (found {', '.join(other)}: convert them to safetensors first)" if other else ""
        raise ModelSourceError(f"{model_dir}: no *.safetensors weights found{hint}")
    return paths


def from_model_dir(model_dir: Path) -> ModelSource:
    """Read a Hugging Face model directory: safetensors shards (with or without an index) + small files."""
    if not model_dir.is_dir():
        raise ModelSourceError(f"{model_dir}: not a directory")
    fds: list[int] = []
    tensors: list[TensorSource] = []
    seen: dict[str, Path] = {}
    try:
        for path in _shard_paths(model_dir):
            table, data_start = read_safetensors_header(path)
            fd = os.open(path, os.O_RDONLY)
            fds.append(fd)
            file_size = os.fstat(fd).st_size
            entries = []
            for name, info in table.items():
                if name in seen:
                    raise ModelSourceError(f"tensor {name!r} is in both {seen[name].name} and {path.name}")
                seen[name] = path
                entries.append(_safetensors_entry(path, fd, name, info, data_start, file_size))
            tensors.extend(t for _, t in sorted(entries, key=lambda e: e[0]))
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    files: dict[str, bytes] = {}
    for path in sorted(model_dir.iterdir()):
        if path.is_file() and path.suffix in CARRIED_SUFFIXES and path.name not in NOT_CARRIED:
            if path.stat().st_size > MAX_CARRIED_FILE_BYTES:
                raise ModelSourceError(f"{path}: {path.stat().st_size} bytes is too large to carry as a model file")
            files[path.name] = path.read_bytes()
    metadata = _metadata_from_config(files.get("config.json"))

    def close() -> None:
        for fd in fds:
            os.close(fd)

    return ModelSource(
        tensors=tuple(tensors),
        files=files,
        metadata=metadata,
        description=str(model_dir),
        close=close,
    )


def _safetensors_entry(
    path: Path, fd: int, name: str, info: object, data_start: int, file_size: int
) -> tuple[int, TensorSource]:
    if not isinstance(info, dict):
        raise ModelSourceError(f"{path}: header entry for {name!r} is not an object")
    try:
        dtype = dtypes.from_safetensors(str(info["dtype"]), tensor=name)
        shape = tuple(int(s) for s in info["shape"])
        begin, end = (int(x) for x in info["data_offsets"])
    except UnsupportedDtypeError as exc:
        raise ModelSourceError(f"{path}: {exc}") from None
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelSourceError(f"{path}: malformed header entry for {name!r} ({exc})") from None
    nbytes = end - begin
    if nbytes != math.prod(shape) * dtype.itemsize or begin < 0:
        raise ModelSourceError(f"{path}: tensor {name!r} has data_offsets that do not match its shape")
    if data_start + end > file_size:
        raise ModelSourceError(f"{path}: tensor {name!r} lies past the end of the file (truncated shard?)")
    base = data_start + begin

    def read(start: int, dest: memoryview) -> None:
        _pread_exact(fd, dest, base + start, path)

    return begin, TensorSource(name, dtype.name, shape, nbytes, read)


def from_state_dict(state_dict: Mapping[str, torch.Tensor], *, files: Mapping[str, bytes] | None = None) -> ModelSource:
    """A torch state dict (CPU or any device; moved to CPU one tensor at a time while building)."""
    tensors = []
    for name, tensor in state_dict.items():
        dtype = dtypes.from_torch(tensor.dtype, tensor=name)
        nbytes = tensor.numel() * tensor.element_size()

        def read(start: int, dest: memoryview, tensor: torch.Tensor = tensor) -> None:
            flat = tensor.detach().reshape(-1).contiguous().cpu().view(_torch_uint8())
            dest[:] = memoryview(flat.numpy().data)[start : start + len(dest)]

        tensors.append(TensorSource(name, dtype.name, tuple(tensor.shape), nbytes, read))
    return ModelSource(tuple(tensors), dict(files or {}), {}, "state_dict")


def _torch_uint8() -> torch.dtype:
    import torch

    return torch.uint8


def _metadata_from_config(raw: bytes | None) -> dict[str, str]:
    if not raw:
        return {}
    try:
        config = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelSourceError(f"config.json is not valid JSON ({exc})") from None
    meta = {}
    if isinstance(config, dict):
        if isinstance(config.get("model_type"), str):
            meta["model_type"] = config["model_type"]
        archs = config.get("architectures")
        if isinstance(archs, list) and archs and all(isinstance(a, str) for a in archs):
            meta["architectures"] = ",".join(archs)
    return meta
