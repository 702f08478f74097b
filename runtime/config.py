"""`ModelConfig.from_hf(config_json)`: the one description of a model the runtime builds from.

A Hugging Face `config.json` is loose (fields optional, renamed across versions, defaults per model
type); the runtime needs a closed, validated description, so a wrong or unsupported config fails
at restore time with a message naming the field, not as a shape error deep inside a forward.

Accepted: the Llama family as `LlamaForCausalLM` implements it — Llama 2/3 (`rope_scaling` type
`llama3` or `linear`), TinyLlama, Mistral (sliding-window attention, applied by the mask), Qwen2
(biased q/k/v projections) and Qwen3 (per-head RMSNorm of q and k, `head_dim` apart from
hidden/heads). The Qwens' optional sliding-window layers are rejected. Both spellings of RoPE
settings are read: `rope_theta` + `rope_scaling` (checkpoints on the Hub) and `rope_parameters`
(transformers >= 5).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
DTYPES = ("float32", "float16", "bfloat16")

# Hugging Face's per-model-type defaults for fields a config.json may omit: omitting them means
# "the library default", so a checkpoint that relies on them must get the same numbers here.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 2048},
    "mistral": {"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 131072},
    "qwen2": {"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 32768},
    # Qwen3's head_dim defaults to 128 whatever hidden/heads is (its published configs all state it)
    "qwen3": {"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 32768, "head_dim": 128},
}
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling: `linear` (divide every frequency) or `llama3` (by wavelength band)."""

    rope_type: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    """A validated Llama-family decoder description (see the module docstring for what is accepted)."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2: always; Llama: `attention_bias`
    o_bias: bool = False  # Llama's `attention_bias` covers o_proj too; Qwen2's o_proj has none
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k (weights of head_dim), before RoPE
    sliding_window: int | None = None  # Mistral: keys further back than this are masked out
    dtype: str = "float32"  # the checkpoint's `torch_dtype`; the weights themselves are authoritative
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None

    @property
    def torch_dtype(self) -> torch.dtype:
        import torch

        dtype: torch.dtype = getattr(torch, self.dtype)
        return dtype

    @classmethod
    def from_hf(cls, config_json: Mapping[str, Any]) -> ModelConfig:
        """Validate a Hugging Face config.json (parsed) into a ModelConfig; ValueError names the field."""
        if not isinstance(config_json, Mapping):
            raise ValueError(f"config.json must be a JSON object, got {type(config_json).__name__}")
        c = dict(config_json)
        model_type = c.get("model_type")
        if model_type is None:
            raise ValueError("config.json: missing field 'model_type'")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"config.json: unsupported model_type {model_type!r} (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        archs = c.get("architectures") or []
        if not isinstance(archs, list) or any(a not in SUPPORTED_ARCHITECTURES for a in archs):
            raise ValueError(
                f"config.json: unsupported architectures {archs!r} (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        defaults = _DEFAULTS[model_type]

        def integer(name: str, value: Any = None, *, minimum: int = 1) -> int:
            value = c.get(name) if value is None else value
            if value is None:
                raise ValueError(f"config.json: missing field {name!r}")
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"config.json: field {name!r} must be an integer >= {minimum}, got {value!r}")
            return value

        def number(name: str) -> float:
            value = c.get(name)
            if value is None:
                value = defaults[name]
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"config.json: field {name!r} must be a positive number, got {value!r}")
            return float(value)

        def flag(name: str, default: bool = False) -> bool:
            value = c.get(name, default)
            if value is None:
                return default
            if not isinstance(value, bool):
                raise ValueError(f"config.json: field {name!r} must be true or false, got {value!r}")
            return value

        for name in _REQUIRED:
            integer(name)
        heads = integer("num_attention_heads")
        hidden = integer("hidden_size")
        kv_heads = integer("num_key_value_heads", c.get("num_key_value_heads") or heads)
        if heads % kv_heads:
            raise ValueError(
                f"config.json: field 'num_key_value_heads' ({kv_heads}) must divide num_attention_heads ({heads})"
            )
        if c.get("head_dim") is not None:
            head_dim = integer("head_dim")
        elif "head_dim" in defaults:
            head_dim = defaults["head_dim"]
        elif hidden % heads:
            raise ValueError(f"config.json: field 'hidden_size' ({hidden}) is not a multiple of num_attention_heads")
        else:
            head_dim = hidden // heads
        if head_dim % 2:
            raise ValueError(f"config.json: field 'head_dim' must be even for RoPE, got {head_dim}")

        act = c.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"config.json: unsupported hidden_act {act!r} (only 'silu')")
        if c.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError("config.json: field 'partial_rotary_factor' other than 1.0 is not supported")

        rope_theta, scaling = _rope(c, defaults["rope_theta"])
        max_pos = integer(
            "max_position_embeddings", c.get("max_position_embeddings") or defaults["max_position_embeddings"]
        )

        qkv_bias = o_bias = flag("attention_bias")
        mlp_bias = flag("mlp_bias") and model_type == "llama"  # the others' MLPs have no bias
        sliding_window: int | None = None
        if model_type in ("qwen2", "qwen3"):
            if model_type == "qwen2":
                qkv_bias, o_bias = True, False
            # sliding attention on the layers from max_window_layers on: a per-layer window this model lacks
            layer_types = c.get("layer_types") or []
            if flag("use_sliding_window") or "sliding_attention" in layer_types:
                raise ValueError(
                    f"config.json: field 'use_sliding_window' true ({model_type} sliding layers) is not supported"
                )
        elif model_type == "mistral" and c.get("sliding_window") is not None:
            sliding_window = integer("sliding_window")

        dtype = c.get("torch_dtype") or c.get("dtype") or "float32"
        if dtype not in DTYPES:
            raise ValueError(f"config.json: unsupported torch_dtype {dtype!r} (supported: {', '.join(DTYPES)})")

        eos = c.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        if any(isinstance(e, bool) or not isinstance(e, int) for e in eos_ids):
            raise ValueError(f"config.json: field 'eos_token_id' must be an integer or a list of them, got {eos!r}")

        return cls(
            model_type=model_type,
            vocab_size=integer("vocab_size"),
            hidden_size=hidden,
            intermediate_size=integer("intermediate_size"),
            num_hidden_layers=integer("num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            max_position_embeddings=max_pos,
            rms_norm_eps=number("rms_norm_eps"),
            rope_theta=rope_theta,
            rope_scaling=scaling,
            tie_word_embeddings=flag("tie_word_embeddings"),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=mlp_bias,
            qk_norm=model_type == "qwen3",
            sliding_window=sliding_window,
            dtype=dtype,
            eos_token_ids=eos_ids,
            bos_token_id=c.get("bos_token_id") if isinstance(c.get("bos_token_id"), int) else None,
        )


def _rope(c: Mapping[str, Any], default_theta: float) -> tuple[float, RopeScaling | None]:
    """RoPE base and scaling from either spelling: `rope_theta`/`rope_scaling` or `rope_parameters`."""
    params = c.get("rope_parameters")
    if params is not None and not isinstance(params, Mapping):
        raise ValueError(f"config.json: field 'rope_parameters' must be an object, got {params!r}")
    field_name = "rope_parameters" if params else "rope_scaling"
    scaling_doc = params or c.get("rope_scaling")
    theta = (params or {}).get("rope_theta", c.get("rope_theta"))
    theta = default_theta if theta is None else theta
    if isinstance(theta, bool) or not isinstance(theta, int | float) or not theta > 0:
        raise ValueError(f"config.json: field 'rope_theta' must be a positive number, got {theta!r}")
    if not scaling_doc:
        return float(theta), None
    if not isinstance(scaling_doc, Mapping):
        raise ValueError(f"config.json: field {field_name!r} must be an object, got {scaling_doc!r}")
    rope_type = scaling_doc.get("rope_type", scaling_doc.get("type", "default"))
    if rope_type == "default":
        return float(theta), None
    if rope_type not in ("linear", "llama3"):
        raise ValueError(
            f"config.json: unsupported {field_name} type {rope_type!r} (supported: default, linear, llama3)"
        )

    def value(name: str, cast: type[float] | type[int]) -> Any:
        v = scaling_doc.get(name)
        if v is None:
            raise ValueError(f"config.json: field '{field_name}.{name}' is required for rope type {rope_type!r}")
        if isinstance(v, bool) or not isinstance(v, int | float) or v <= 0:
            raise ValueError(f"config.json: field '{field_name}.{name}' must be a positive number, got {v!r}")
        return cast(v)

    if rope_type == "linear":
        return float(theta), RopeScaling("linear", value("factor", float))
    low, high = value("low_freq_factor", float), value("high_freq_factor", float)
    if high <= low:
        raise ValueError(f"config.json: field '{field_name}.high_freq_factor' must exceed low_freq_factor")
    return float(theta), RopeScaling(
        "llama3", value("factor", float), low, high, value("original_max_position_embeddings", int)
    )


# Without an explicit max_seq_len the engine's cache holds this many positions per slot (capped by the
# model's max_position_embeddings): KV memory is num_slots x max_seq_len, and 2048 covers chat-sized prompts.
DEFAULT_MAX_SEQ_LEN = 2048


def context_length(config: ModelConfig, max_seq_len: int | None) -> int:
    """The engine's context (KV positions per slot): `max_seq_len`, else the model's capped at the default.

    Here, not in engine.py, so that a cold start sizes the KV cache before torch is imported."""
    return max_seq_len or min(config.max_position_embeddings, DEFAULT_MAX_SEQ_LEN)
