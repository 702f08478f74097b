"""A GGUF file (llama.cpp, Ollama) as a `ModelSource`: Hugging Face tensor names, dequantized weights.

`read_gguf(path)` parses and checks the file without reading tensor data: the architecture, every
tensor's quantization type, name and shape against what the runtime's model expects, and builds the
carried files (config.json and generation_config.json from `gguf_config`, the tokenizer and chat
template from `gguf_tokenizer`). Anything the runtime would compute differently from llama.cpp is a
`ModelSourceError` naming it, before a byte of weights is read.

`GGUFModel.source(dtype, metadata)` streams the tensors to the builder. A quantized tensor is
dequantized (with `gguf.quants`, the format's reference code) to the compute dtype when the builder
first asks for its bytes, a slice of rows at a time, and kept until the builder moves on to the next
tensor: memory holds one converted tensor, never the model. A tensor already in the compute dtype
is copied straight from the file. The builder reads the weights twice (hash, then upload), so each
tensor is dequantized twice: the price of never holding the converted model.

llama.cpp's converter permutes the rows of Llama-architecture q/k projections so that its RoPE can
rotate adjacent pairs; transformers (and the runtime) rotate the two halves of each head, so those
rows are put back in Hugging Face's order here. Qwen2 files are written unpermuted.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kold.snapshot import dtypes
from kold.snapshot.errors import ModelSourceError
from kold.snapshot.gguf_config import Metadata, architecture, generation_config, model_config
from kold.snapshot.gguf_tokenizer import tokenizer_files
from kold.snapshot.sources import ModelSource, TensorSource

if TYPE_CHECKING:
    import torch

# Quantization types kold dequantizes (tested against transformers' GGUF loader); gguf.quants knows
# more (Q5_0, Q2_K, IQ*, ...), refused until they are tested the same way.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K")
# compute dtypes a GGUF can be built in: config.json's torch_dtype name -> the manifest's
COMPUTE_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
DEFAULT_DTYPE = "bfloat16"
# Rows are dequantized this many float32 elements at a time (64 MiB), so converting a large
# embedding (Llama 3's is 525 M elements) never needs its whole float32 copy besides the result.
SLICE_ELEMENTS = 16 << 20

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_BLOCK = re.compile(r"blk\.(\d+)\.(.+)")
ROPE_FREQS = "rope_freqs.weight"  # Llama 3 RoPE scaling, read into config.json (gguf_config)


@dataclass(frozen=True)
class _Tensor:
    """One tensor to publish: its Hugging Face name and shape, where its data lies in the file."""

    name: str
    shape: tuple[int, ...]
    qtype: Any  # gguf.GGMLQuantizationType
    data: np.ndarray[Any, Any]  # the file's bytes (a view of the reader's memory map)
    rope_heads: int = 0  # > 0: rows permuted by llama.cpp for this many heads, to be put back


def hf_name(name: str) -> str | None:
    """The Hugging Face name of a llama.cpp tensor name, or None when the runtime has no such tensor."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    block = _BLOCK.fullmatch(name)
    if block and block[2] in _BLOCK_NAMES:
        return f"model.layers.{block[1]}.{_BLOCK_NAMES[block[2]]}"
    return None


def expected_shapes(config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor the runtime's model loads for `config`, with its shape (Hugging Face layout)."""
    h, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    q, kv = config["num_attention_heads"] * config["head_dim"], config["num_key_value_heads"] * config["head_dim"]
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, h), "model.norm.weight": (h,)}
    if not config["tie_word_embeddings"]:
        out["lm_head.weight"] = (vocab, h)
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        out |= {
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (inter, h),
            p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter),
        }
        if config["model_type"] == "qwen2":
            out |= {
                p + "self_attn.q_proj.bias": (q,),
                p + "self_attn.k_proj.bias": (kv,),
                p + "self_attn.v_proj.bias": (kv,),
            }
    return out


class GGUFModel:
    """A parsed and checked GGUF file: its carried files and tensor plan (no tensor data read yet)."""

    def __init__(self, path: Path, meta: Metadata, tensors: list[_Tensor], files: dict[str, bytes]) -> None:
        self.path = path
        self.meta = meta
        self.tensors = tensors
        self.files = files

    @property
    def config(self) -> dict[str, Any]:
        parsed: dict[str, Any] = json.loads(self.files["config.json"])
        return parsed

    def source(self, metadata: Mapping[str, str] | None = None) -> ModelSource:
        """The tensors as the builder streams them, with `metadata` (provenance) added to the manifest's."""
        config = self.config
        target = dtypes.by_name(COMPUTE_DTYPES[config["torch_dtype"]])
        current = _Converted()
        sources = []
        for t in self.tensors:
            nbytes = math.prod(t.shape) * target.itemsize
            if _is_stored_as(t, target.name):
                read = _direct_reader(t)
            else:
                read = current.reader(t, config["torch_dtype"])
            sources.append(TensorSource(t.name, target.name, t.shape, nbytes, read))
        meta = {"model_type": config["model_type"], "architectures": ",".join(config["architectures"])}
        return ModelSource(
            tensors=tuple(sources),
            files=dict(self.files),
            metadata={**meta, **(metadata or {})},
            description=str(self.path),
            close=current.clear,
        )


def read_gguf(path: Path, *, dtype: str = DEFAULT_DTYPE) -> GGUFModel:
    """Parse and check a GGUF file for a build in `dtype` (see the module docstring)."""
    if dtype not in COMPUTE_DTYPES:
        raise ModelSourceError(f"dtype {dtype!r} is not a compute dtype (choose from {', '.join(COMPUTE_DTYPES)})")
    reader = _open_reader(path)
    try:
        values = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    except (UnicodeDecodeError, ValueError, IndexError) as exc:
        raise ModelSourceError(f"{path}: GGUF metadata cannot be read ({exc})") from None
    meta = Metadata(values, path.name)
    arch = architecture(meta)
    by_name = {t.name: t for t in reader.tensors}
    _check_types(path, reader.tensors)
    unknown = [n for n in by_name if n != ROPE_FREQS and hf_name(n) is None]
    if unknown:
        raise ModelSourceError(
            f"{path.name}: tensors the runtime's {arch} model has no place for: {', '.join(sorted(unknown)[:8])}"
            + (f" and {len(unknown) - 8} more" if len(unknown) > 8 else "")
        )
    embed = by_name.get("token_embd.weight")
    if embed is None:
        raise ModelSourceError(f"{path.name}: the GGUF has no token_embd.weight")
    rope_freqs = None
    if ROPE_FREQS in by_name:
        rope_freqs = [float(x) for x in _dequantize(by_name[ROPE_FREQS]).reshape(-1)]
    config = model_config(
        meta,
        vocab_size=int(embed.shape[1]) if len(embed.shape) == 2 else 0,
        tied="output.weight" not in by_name,
        dtype=dtype,
        rope_freqs=rope_freqs,
    )
    files = {
        "config.json": json.dumps(config, indent=2).encode(),
        "generation_config.json": json.dumps(generation_config(meta), indent=2).encode(),
        **tokenizer_files(meta, context_length=config["max_position_embeddings"]),
    }
    return GGUFModel(path, meta, _plan(path, reader.tensors, config, permute=arch == "llama"), files)


def _open_reader(path: Path) -> Any:
    from gguf import GGUFReader

    class PlainArrayReader(GGUFReader):
        """GGUFReader over a plain ndarray view of its memory map: the reader slices the map once per
        metadata value (twice per vocabulary entry), and np.memmap's bookkeeping on each slice made
        the parse of SmolLM2's 49k tokens and merges about three times slower."""

        @property  # type: ignore[override]
        def data(self) -> np.ndarray[Any, Any]:
            return self._plain

        @data.setter
        def data(self, value: np.ndarray[Any, Any]) -> None:
            self._plain = value.view(np.ndarray)

    if not path.is_file():
        raise ModelSourceError(f"{path}: no such file")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ModelSourceError(f"{path}: not a GGUF file (it does not start with the GGUF magic)")
    try:
        return PlainArrayReader(path)
    except (ValueError, KeyError, IndexError, TypeError) as exc:  # truncated or malformed: numpy shape errors
        raise ModelSourceError(f"{path}: not a valid GGUF file ({exc})") from None


def _check_types(path: Path, tensors: list[Any]) -> None:
    """Every tensor's quantization type must be one kold dequantizes; refused ones are named with a count."""
    refused: dict[str, int] = {}
    for t in tensors:
        if t.tensor_type.name not in SUPPORTED_TYPES:
            refused[t.tensor_type.name] = refused.get(t.tensor_type.name, 0) + 1
    if refused:
        listed = ", ".join(f"{name} ({count} tensors)" for name, count in sorted(refused.items()))
        raise ModelSourceError(
            f"{path.name}: GGUF quantization types not supported: {listed} (supported: {', '.join(SUPPORTED_TYPES)})"
        )


def _plan(path: Path, tensors: list[Any], config: Mapping[str, Any], *, permute: bool) -> list[_Tensor]:
    """The file's tensors under their Hugging Face names, checked against the model the config describes."""
    expected = expected_shapes(config)
    heads = {
        "self_attn.q_proj.weight": config["num_attention_heads"],
        "self_attn.k_proj.weight": config["num_key_value_heads"],
    }
    plan = []
    for t in tensors:
        if t.name == ROPE_FREQS:
            continue
        name = hf_name(t.name)
        assert name is not None  # read_gguf refused the others
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        if name not in expected:
            raise ModelSourceError(
                f"{path.name}: tensor {t.name} ({name}) does not belong in this {config['model_type']} model"
            )
        want = expected.pop(name)
        if shape != want:
            raise ModelSourceError(
                f"{path.name}: tensor {t.name} has shape {list(shape)}, the config says {list(want)}"
            )
        rope_heads = next((n for suffix, n in heads.items() if name.endswith(suffix)), 0) if permute else 0
        plan.append(_Tensor(name, shape, t.tensor_type, t.data, rope_heads))
    if expected:
        missing = sorted(expected)
        raise ModelSourceError(
            f"{path.name}: tensors missing from the GGUF: {', '.join(missing[:8])}"
            + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        )
    return plan


def _torch_dtype(name: str) -> torch.dtype:
    import torch

    dtype: torch.dtype = getattr(torch, name)
    return dtype


def _is_stored_as(t: _Tensor, dtype_name: str) -> bool:
    """Whether the file's bytes are already the published bytes: same dtype, no rows to put back."""
    stored = {"F32": "fp32", "F16": "fp16", "BF16": "bf16"}.get(t.qtype.name)
    return stored == dtype_name and not t.rope_heads


def _direct_reader(t: _Tensor) -> Callable[[int, memoryview], None]:
    raw = np.ascontiguousarray(t.data).reshape(-1).view(np.uint8).data

    def read(start: int, dest: memoryview) -> None:
        dest[:] = raw[start : start + len(dest)]

    return read


def _dequantize(t: Any) -> np.ndarray[Any, Any]:
    """A small tensor (a reader tensor or one row slice of a `_Tensor`) as float32."""
    from gguf.quants import dequantize

    out: np.ndarray[Any, Any] = dequantize(t.data, t.tensor_type)
    return out


def rope_row_order(rows: int, heads: int) -> np.ndarray[Any, Any]:
    """Hugging Face's row order of a q/k projection whose rows llama.cpp permuted: row i of the result
    is row `order[i]` of the file. llama.cpp interleaves each head's two halves (`x0, y0, x1, y1, ...`
    from `x0, x1, ..., y0, y1, ...`); this takes them apart again."""
    if rows % (2 * heads):
        raise ModelSourceError(f"a q/k projection of {rows} rows cannot be split into {heads} heads of pairs")
    return np.arange(rows).reshape(heads, rows // heads // 2, 2).swapaxes(1, 2).reshape(-1)


class _Converted:
    """The one tensor converted to the compute dtype at a time, shared by all tensors' readers."""

    def __init__(self) -> None:
        self._name: str | None = None
        self._bytes: memoryview | None = None

    def clear(self) -> None:
        self._name, self._bytes = None, None

    def reader(self, t: _Tensor, dtype: str) -> Callable[[int, memoryview], None]:
        def read(start: int, dest: memoryview) -> None:
            if self._name != t.name:
                self.clear()  # drop the previous tensor before converting the next one
                self._bytes = _convert(t, dtype)
                self._name = t.name
            assert self._bytes is not None
            dest[:] = self._bytes[start : start + len(dest)]

        return read


def _convert(t: _Tensor, dtype: str, slice_elements: int = SLICE_ELEMENTS) -> memoryview:
    """Dequantize `t` to `dtype`, rows put back in order, `slice_elements` at a time (whole rows)."""
    import torch
    from gguf.quants import dequantize

    cols = t.shape[-1]
    rows = math.prod(t.shape) // cols
    raw = t.data.reshape(rows, -1)
    if t.rope_heads:
        raw = raw[rope_row_order(rows, t.rope_heads)]
    out = torch.empty((rows, cols), dtype=_torch_dtype(dtype))
    step = max(1, slice_elements // cols)
    for r0 in range(0, rows, step):
        block = dequantize(raw[r0 : r0 + step], t.qtype)
        out[r0 : r0 + step] = torch.from_numpy(np.array(block, dtype=np.float32, copy=True))
    return out.reshape(-1).view(torch.uint8).numpy().data
