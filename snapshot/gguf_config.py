"""A GGUF file's llama.cpp metadata as the Hugging Face `config.json` the runtime reads.

A GGUF carries no config.json: its `{arch}.*` keys are the config, under llama.cpp's names. This
module turns them into the config.json (and generation_config.json) that `ModelConfig.from_hf`
accepts, from the metadata alone (plain values, no file access), and refuses what the runtime's
Llama-family model would compute differently from llama.cpp: another architecture, partial or
scaled-in-another-way RoPE, mixture-of-experts, sliding windows, logit scaling.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from kold.snapshot.errors import ModelSourceError

# llama.cpp architecture -> (config.json model_type, architectures). Mistral files use `llama`.
ARCHITECTURES: dict[str, tuple[str, str]] = {
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
}

# Keys that, set to anything but the harmless values, mean a model the runtime would compute
# differently: (what it means, the harmless values).
_REFUSED_KEYS: dict[str, tuple[str, tuple[object, ...]]] = {
    "expert_count": ("mixture-of-experts layers", (None, 0)),
    "attention.sliding_window": ("sliding-window attention", (None,)),
    "logit_scale": ("scaled logits", (None, 1.0)),
    "attn_logit_softcapping": ("attention logit soft-capping", (None,)),
    "final_logit_softcapping": ("final logit soft-capping", (None,)),
}

# Llama 3.x's RoPE scaling, which llama.cpp's converter bakes into a `rope_freqs` tensor of
# per-frequency divisors instead of metadata: (low_freq_factor, high_freq_factor,
# original_max_position_embeddings) of every Llama 3.1/3.2/3.3 release; the factor is read back
# from the tensor. Other parameters are refused rather than guessed.
LLAMA3_ROPE_BANDS = (1.0, 4.0, 8192)


def _float(value: float) -> float:
    """A float32 metadata value as the decimal it was written from (9.999999747e-06 -> 1e-05)."""
    return float(str(np.float32(value)))


class Metadata:
    """Typed access to a GGUF's key/value metadata; every failure names the key."""

    def __init__(self, values: Mapping[str, Any], source: str) -> None:
        self.values = values
        self.source = source

    def get(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)

    def string(self, key: str, default: str | None = None) -> str:
        value = self.values.get(key, default)
        if not isinstance(value, str):
            raise self.error(key, "a string", value)
        return value

    def integer(self, key: str, default: int | None = None, *, minimum: int = 1) -> int:
        value = self.values.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.error(key, f"an integer >= {minimum}", value)
        return value

    def number(self, key: str, default: float | None = None) -> float:
        value = self.values.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
            raise self.error(key, "a positive number", value)
        return _float(value) if isinstance(value, float) else float(value)

    def error(self, key: str, expected: str, value: Any) -> ModelSourceError:
        if value is None:
            return ModelSourceError(f"{self.source}: GGUF metadata has no {key!r}")
        return ModelSourceError(f"{self.source}: GGUF metadata {key!r} must be {expected}, got {value!r}")


def architecture(meta: Metadata) -> str:
    """`general.architecture`, refused with the supported list when the runtime has no model for it."""
    arch = meta.string("general.architecture")
    if arch not in ARCHITECTURES:
        raise ModelSourceError(
            f"{meta.source}: GGUF architecture {arch!r} is not supported (supported: {', '.join(ARCHITECTURES)})"
        )
    return arch


def model_config(
    meta: Metadata,
    *,
    vocab_size: int,
    tied: bool,
    dtype: str,
    rope_freqs: Sequence[float] | None = None,
) -> dict[str, Any]:
    """config.json for the file. `vocab_size` is the embedding's row count (the model's, which may
    exceed the tokenizer's), `tied` says the file has no `output.weight`, `rope_freqs` is the
    `rope_freqs.weight` tensor's values when the file has one."""
    arch = architecture(meta)
    model_type, hf_class = ARCHITECTURES[arch]
    for key, (what, harmless) in _REFUSED_KEYS.items():
        value = meta.get(f"{arch}.{key}")
        if value not in harmless:
            raise ModelSourceError(f"{meta.source}: {what} ({arch}.{key} = {value!r}) are not supported")

    hidden = meta.integer(f"{arch}.embedding_length")
    heads = _per_layer_constant(meta, f"{arch}.attention.head_count")
    kv_heads = _per_layer_constant(meta, f"{arch}.attention.head_count_kv", default=heads)
    head_dim = meta.integer(f"{arch}.attention.key_length", hidden // heads)
    if meta.get(f"{arch}.attention.value_length", head_dim) != head_dim:
        raise ModelSourceError(
            f"{meta.source}: attention value length {meta.get(f'{arch}.attention.value_length')} differs from the "
            f"key length {head_dim}: not supported"
        )
    rope_dims = meta.get(f"{arch}.rope.dimension_count", head_dim)
    if rope_dims != head_dim:
        raise ModelSourceError(
            f"{meta.source}: RoPE on {rope_dims} of {head_dim} head dimensions (partial rotary) is not supported"
        )
    theta = meta.number(f"{arch}.rope.freq_base", 10000.0)
    config: dict[str, Any] = {
        "architectures": [hf_class],
        "model_type": model_type,
        "hidden_act": "silu",
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": meta.integer(f"{arch}.feed_forward_length"),
        "num_hidden_layers": meta.integer(f"{arch}.block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "max_position_embeddings": meta.integer(f"{arch}.context_length"),
        "rms_norm_eps": meta.number(f"{arch}.attention.layer_norm_rms_epsilon"),
        "rope_theta": theta,
        "rope_scaling": _rope_scaling(meta, arch, theta, head_dim, rope_freqs),
        "tie_word_embeddings": tied,
        "torch_dtype": dtype,
        **_token_ids(meta),
    }
    if model_type == "qwen2":
        config["use_sliding_window"] = False
    return config


def generation_config(meta: Metadata) -> dict[str, Any]:
    """generation_config.json: every id llama.cpp ends a generation on (end of sequence, of turn, of message)."""
    ids = _token_ids(meta)
    keys = [f"tokenizer.ggml.{name}_token_id" for name in ("eos", "eot", "eom")]
    stops = [meta.integer(key, minimum=0) for key in keys if meta.get(key) is not None]
    out: dict[str, Any] = {k: v for k, v in ids.items() if k in ("bos_token_id", "pad_token_id")}
    if stops:
        out["eos_token_id"] = list(dict.fromkeys(stops))
    return out


def _token_ids(meta: Metadata) -> dict[str, int]:
    out = {}
    for name, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("padding", "pad_token_id")):
        value = meta.get(f"tokenizer.ggml.{name}_token_id")
        if value is not None:
            out[key] = meta.integer(f"tokenizer.ggml.{name}_token_id", minimum=0)
    return out


def _per_layer_constant(meta: Metadata, key: str, default: int | None = None) -> int:
    """A head count, which newer files may give per layer: accepted when every layer has the same."""
    value = meta.get(key, default)
    if isinstance(value, list):
        if not value or len(set(value)) != 1:
            raise ModelSourceError(f"{meta.source}: {key} differs between layers ({value}): not supported")
        value = value[0]
    if value is None:
        raise meta.error(key, "an integer", None)
    return meta.integer(key, value)


def _rope_scaling(
    meta: Metadata, arch: str, theta: float, head_dim: int, rope_freqs: Sequence[float] | None
) -> dict[str, Any] | None:
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    factor = meta.get(f"{arch}.rope.scaling.factor", meta.get(f"{arch}.rope.scale_linear", 1.0))
    if kind not in ("none", "linear"):
        raise ModelSourceError(f"{meta.source}: RoPE scaling {kind!r} is not supported (supported: none, linear)")
    scaling: dict[str, Any] | None = None
    if kind == "linear" or factor not in (None, 1.0):
        scaling = {"rope_type": "linear", "factor": meta.number(f"{arch}.rope.scaling.factor", factor)}
    if rope_freqs is not None:
        if scaling is not None:
            raise ModelSourceError(f"{meta.source}: both a rope_freqs tensor and {kind} RoPE scaling: not supported")
        scaling = _llama3_scaling(meta, arch, theta, head_dim, rope_freqs)
    return scaling


def _llama3_scaling(
    meta: Metadata, arch: str, theta: float, head_dim: int, rope_freqs: Sequence[float]
) -> dict[str, Any]:
    """Llama 3's scaling, recovered from llama.cpp's `rope_freqs` divisors: the factor is the largest
    divisor, the bands are Llama 3's; accepted only if those parameters give back every divisor."""
    got = np.asarray(rope_freqs, dtype=np.float64)
    if got.shape != (head_dim // 2,) or not np.all(np.isfinite(got)) or got.min() < 1.0:
        raise ModelSourceError(f"{meta.source}: rope_freqs.weight does not hold {head_dim // 2} divisors >= 1")
    factor = _float(float(got.max()))
    low, high, original = LLAMA3_ROPE_BANDS
    original = meta.integer(f"{arch}.rope.scaling.original_context_length", original)
    expected = llama3_rope_divisors(theta, head_dim, factor, low, high, original)
    if not np.allclose(got, expected, rtol=1e-5, atol=0.0):
        raise ModelSourceError(
            f"{meta.source}: the rope_freqs.weight divisors are not Llama 3's RoPE scaling "
            f"(low_freq_factor {low}, high_freq_factor {high}, original context {original}): not supported"
        )
    return {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": low,
        "high_freq_factor": high,
        "original_max_position_embeddings": original,
    }


def llama3_rope_divisors(
    theta: float, head_dim: int, factor: float, low: float, high: float, original: int
) -> np.ndarray:
    """What each RoPE frequency is divided by under Llama 3's scaling (high frequencies: 1, low ones:
    `factor`, a smooth blend between), as llama.cpp's converter writes them to `rope_freqs`."""
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / freqs
    smooth = (original / wavelen - low) / (high - low)
    blended = 1.0 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < original / high, 1.0, np.where(wavelen > original / low, factor, blended))
