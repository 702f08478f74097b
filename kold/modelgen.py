"""Random Llama-family checkpoints in Hugging Face layout, made on the spot.

kold never downloads weights: tests, benchmarks and the demo use models generated here, seeded so
every run (and every machine) gets the same bytes. The shapes are real ones (TinyLlama-1.1B for `1b`)
so restore benchmarks move realistic tensor sizes; the values are random.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

# Hugging Face's default shard size is 5 GB; we cut at 1 GiB so the 1b model has several shards and the
# multi-shard path (index json) is exercised by every benchmark run.
SHARD_BYTES = 1 << 30


@dataclass(frozen=True)
class LlamaShape:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False


SIZES: dict[str, LlamaShape] = {
    # a few MB: unit tests and the demo
    "tiny": LlamaShape(512, 64, 172, 2, 4, 2, 512),
    # ~60 MB in bf16: integration tests that need many chunks but must stay quick
    "small": LlamaShape(8192, 512, 1376, 4, 8, 4, 1024),
    # TinyLlama-1.1B's shapes (~2.2 GB in bf16): benchmarks
    "1b": LlamaShape(32000, 2048, 5632, 22, 32, 4, 2048),
}


def llama_tensor_specs(shape: LlamaShape) -> Iterator[tuple[str, tuple[int, ...]]]:
    """Names and shapes of a LlamaForCausalLM state dict, in Hugging Face's order."""
    h, i = shape.hidden_size, shape.intermediate_size
    head_dim = h // shape.num_attention_heads
    kv = shape.num_key_value_heads * head_dim
    yield "model.embed_tokens.weight", (shape.vocab_size, h)
    for layer in range(shape.num_hidden_layers):
        p = f"model.layers.{layer}"
        yield f"{p}.self_attn.q_proj.weight", (h, h)
        yield f"{p}.self_attn.k_proj.weight", (kv, h)
        yield f"{p}.self_attn.v_proj.weight", (kv, h)
        yield f"{p}.self_attn.o_proj.weight", (h, h)
        yield f"{p}.mlp.gate_proj.weight", (i, h)
        yield f"{p}.mlp.up_proj.weight", (i, h)
        yield f"{p}.mlp.down_proj.weight", (h, i)
        yield f"{p}.input_layernorm.weight", (h,)
        yield f"{p}.post_attention_layernorm.weight", (h,)
    yield "model.norm.weight", (h,)
    if not shape.tie_word_embeddings:
        yield "lm_head.weight", (shape.vocab_size, h)


def llama_config(shape: LlamaShape, dtype: torch.dtype) -> dict[str, object]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": str(dtype).removeprefix("torch."),
        **asdict(shape),
    }


def random_tensor(name: str, shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=dtype)
    return torch.empty(shape, dtype=dtype).normal_(0.0, 0.02, generator=gen)


def write_random_llama(
    out: Path,
    size: str = "tiny",
    *,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    shard_bytes: int = SHARD_BYTES,
    progress: Callable[[int], None] | None = None,
) -> Path:
    """Write config.json, generation_config.json and safetensors shards (with an index when >1).

    Memory stays around one shard: each shard is generated, written and dropped before the next.
    `progress` is called with the bytes of each tensor as it is generated.
    """
    from safetensors.torch import save_file

    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r} (choose from {', '.join(SIZES)})")
    shape = SIZES[size]
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)

    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_sizes = [0]
    weight_map: dict[str, int] = {}
    pending_files: list[Path] = []

    def flush(index: int) -> None:
        path = out / f"shard-{index:05d}.safetensors"
        save_file(shards[index], str(path), metadata={"format": "pt"})
        pending_files.append(path)
        shards[index] = {}

    for name, tshape in llama_tensor_specs(shape):
        tensor = random_tensor(name, tshape, dtype, gen)
        nbytes = tensor.numel() * tensor.element_size()
        if shard_sizes[-1] and shard_sizes[-1] + nbytes > shard_bytes:
            flush(len(shards) - 1)
            shards.append({})
            shard_sizes.append(0)
        shards[-1][name] = tensor
        shard_sizes[-1] += nbytes
        weight_map[name] = len(shards) - 1
        if progress:
            progress(nbytes)
    flush(len(shards) - 1)

    total = len(pending_files)
    if total == 1:
        pending_files[0].rename(out / "model.safetensors")
    else:
        names = []
        for index, path in enumerate(pending_files):
            final = out / f"model-{index + 1:05d}-of-{total:05d}.safetensors"
            path.rename(final)
            names.append(final.name)
        index_doc = {
            "metadata": {"total_size": sum(shard_sizes)},
            "weight_map": {name: names[shard] for name, shard in weight_map.items()},
        }
        (out / "model.safetensors.index.json").write_text(json.dumps(index_doc, indent=2))

    (out / "config.json").write_text(json.dumps(llama_config(shape, dtype), indent=2))
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 1, "eos_token_id": 2, "max_new_tokens": 64}, indent=2)
    )
    return out
