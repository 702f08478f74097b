"""ModelConfig and LlamaForCausalLM against Hugging Face transformers (the test-only reference).

Every architecture variant is built in transformers with random weights, bound to our model built
on the meta device, and must give the same logits (fp32) and the same greedy tokens as HF's own
`generate(do_sample=False)`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from kold.runtime.config import ModelConfig, RopeScaling
from kold.runtime.kvcache import KVCache
from kold.runtime.model import LlamaForCausalLM, build_model, rope_inv_freq, tied_weights
from kold.snapshot import build_snapshot, load_into, restore

VOCAB = 256
TINY: dict[str, Any] = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,  # GQA: two query heads per kv head
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "float32",
}
LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # small, so that the prompt's positions fall in all three wavelength bands of the 16-dim heads
    "original_max_position_embeddings": 32,
}

# config.json documents as they appear on the Hub (the old `rope_theta`/`rope_scaling` spelling)
VARIANTS: dict[str, dict[str, Any]] = {
    "llama2": {**TINY, "model_type": "llama", "architectures": ["LlamaForCausalLM"], "rope_theta": 10000.0},
    "llama3-scaled-tied": {
        **TINY,
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "rope_theta": 500000.0,
        "rope_scaling": LLAMA3_SCALING,
        "tie_word_embeddings": True,
    },
    "llama-head-dim": {**TINY, "model_type": "llama", "head_dim": 32},  # head_dim != hidden / heads
    # a window shorter than the prompt, so the sliding mask matters
    "mistral": {**TINY, "model_type": "mistral", "architectures": ["MistralForCausalLM"], "sliding_window": 12},
    "qwen2": {
        **TINY,
        "model_type": "qwen2",
        "architectures": ["Qwen2ForCausalLM"],
        "use_sliding_window": False,
        "sliding_window": None,
        "rope_theta": 1000000.0,
    },
}
HF_CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
PROMPT_LEN = 24
NEW_TOKENS = 20


def hf_model(config_json: dict[str, Any], seed: int = 0) -> Any:
    """A transformers model from a config.json with random weights: every weight (biases and norms
    included) is drawn, so a parameter we load in the wrong place changes the logits."""
    config = transformers.AutoConfig.for_model(**{**config_json, "eos_token_id": None})
    torch.manual_seed(seed)
    model = getattr(transformers, HF_CLASSES[config_json["model_type"]])(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def checkpoint(model: Any, config: ModelConfig) -> dict[str, torch.Tensor]:
    """The state dict as HF saves it: tied embeddings stored once."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        del state["lm_head.weight"]
    return state


def ours(config: ModelConfig, state: dict[str, torch.Tensor]) -> LlamaForCausalLM:
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    load_into(model, state, tied=tied_weights(config))
    return model.materialize_buffers("cpu").eval()


@torch.inference_mode()
def greedy(
    model: LlamaForCausalLM, prompt: list[int], steps: int, cache: KVCache | None = None, slot: int = 0
) -> list[int]:
    """Prefill + one-token decode steps through the KV cache, argmax each time."""
    cache = cache or KVCache(model.config, 1, 128, model.dtype)
    ids = torch.tensor([prompt])
    logits = model(ids, torch.arange(len(prompt))[None], cache, torch.tensor([slot]))
    out = [int(logits[0, -1].argmax())]
    for i in range(steps - 1):
        pos = torch.tensor([[len(prompt) + i]])
        logits = model(torch.tensor([[out[-1]]]), pos, cache, torch.tensor([slot]))
        out.append(int(logits[0, -1].argmax()))
    return out


def hf_greedy(reference: Any, ids: list[int]) -> list[int]:
    """transformers' own greedy continuation of `ids`: exactly NEW_TOKENS tokens."""
    with torch.inference_mode():
        generated = reference.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
        )
    tokens: list[int] = generated[0, len(ids) :].tolist()
    return tokens


def prompt(seed: int, length: int = PROMPT_LEN) -> list[int]:
    return torch.randint(3, VOCAB, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


# -- config -----------------------------------------------------------------------------------------


def test_from_hf_reads_every_variant() -> None:
    llama3 = ModelConfig.from_hf(VARIANTS["llama3-scaled-tied"])
    assert llama3.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 32)
    assert llama3.rope_theta == 500000.0 and llama3.tie_word_embeddings and llama3.head_dim == 16
    assert llama3.eos_token_ids == (2,) and llama3.torch_dtype == torch.float32
    assert ModelConfig.from_hf(VARIANTS["llama-head-dim"]).head_dim == 32
    qwen = ModelConfig.from_hf(VARIANTS["qwen2"])
    assert qwen.qkv_bias and not qwen.o_bias and qwen.sliding_window is None
    assert ModelConfig.from_hf(VARIANTS["mistral"]).sliding_window == 12
    assert ModelConfig.from_hf({**VARIANTS["mistral"], "sliding_window": None}).sliding_window is None
    # legacy "type" key and a list of eos ids (Llama 3 instruct)
    legacy = ModelConfig.from_hf(
        {**TINY, "model_type": "llama", "rope_scaling": {**LLAMA3_SCALING, "type": "llama3"}, "eos_token_id": [2, 3]}
    )
    assert legacy.rope_scaling is not None and legacy.eos_token_ids == (2, 3)


def test_from_hf_reads_transformers_5_rope_parameters() -> None:
    """transformers >= 5 writes `rope_parameters` (theta inside) instead of rope_theta + rope_scaling."""
    hf = transformers.AutoConfig.for_model(**VARIANTS["llama3-scaled-tied"])
    doc = hf.to_dict()
    assert "rope_parameters" in doc
    assert ModelConfig.from_hf(doc) == ModelConfig.from_hf(VARIANTS["llama3-scaled-tied"])


def test_tinyllama_config() -> None:
    """TinyLlama-1.1B's config.json as published (no head_dim, no rope_theta in older revisions)."""
    doc = {
        "architectures": ["LlamaForCausalLM"],
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": 2048,
        "initializer_range": 0.02,
        "intermediate_size": 5632,
        "max_position_embeddings": 2048,
        "model_type": "llama",
        "num_attention_heads": 32,
        "num_hidden_layers": 22,
        "num_key_value_heads": 4,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": 32000,
    }
    cfg = ModelConfig.from_hf(doc)
    assert (cfg.head_dim, cfg.num_key_value_heads, cfg.rope_theta, cfg.rope_scaling) == (64, 4, 10000.0, None)
    assert cfg.torch_dtype == torch.bfloat16 and cfg.rms_norm_eps == 1e-5


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"model_type": "gpt2"}, "model_type"),
        ({"model_type": None}, "model_type"),
        ({"architectures": ["GPT2LMHeadModel"]}, "architectures"),
        ({"hidden_size": None}, "hidden_size"),
        ({"vocab_size": None}, "vocab_size"),
        ({"num_hidden_layers": 0}, "num_hidden_layers"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"rms_norm_eps": -1}, "rms_norm_eps"),
        ({"torch_dtype": "float64"}, "torch_dtype"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "low_freq_factor"),
        ({"model_type": "qwen2", "use_sliding_window": True}, "use_sliding_window"),
    ],
)
def test_from_hf_names_the_bad_field(change: dict[str, Any], field: str) -> None:
    doc = {**TINY, "model_type": "llama", **change}
    doc = {k: v for k, v in doc.items() if v is not None or k in ("rope_scaling",)}
    with pytest.raises(ValueError, match=field):
        ModelConfig.from_hf(doc)


# -- equivalence with transformers ------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_and_greedy_tokens_match_transformers(variant: str) -> None:
    config = ModelConfig.from_hf(VARIANTS[variant])
    reference = hf_model(VARIANTS[variant])
    model = ours(config, checkpoint(reference, config))
    ids = prompt(1)
    cache = KVCache(config, 2, 128, torch.float32)
    with torch.inference_mode():
        expected = reference(torch.tensor([ids])).logits
        got = model(torch.tensor([ids]), torch.arange(PROMPT_LEN)[None], cache, torch.tensor([1]))
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    expected_tokens = hf_greedy(reference, ids)
    assert len(expected_tokens) == NEW_TOKENS
    assert greedy(model, ids, NEW_TOKENS) == expected_tokens


def test_rope_scaling_changes_the_frequencies() -> None:
    """Guards the llama3 case above against passing vacuously: scaling really moves inv_freq."""
    scaled = ModelConfig.from_hf(VARIANTS["llama3-scaled-tied"])
    plain = dataclasses.replace(scaled, rope_scaling=None)
    a, b = rope_inv_freq(scaled), rope_inv_freq(plain)
    assert a[0] == b[0] and a[-1] == pytest.approx(b[-1] / 8)  # high frequencies kept, low ones / factor
    assert not torch.equal(a, b)


def test_snapshot_round_trip_through_a_store(tmp_path: Path) -> None:
    """The production path: publish the checkpoint to a file:// store, restore, build_model."""
    import json

    doc = VARIANTS["llama3-scaled-tied"]
    config = ModelConfig.from_hf(doc)
    reference = hf_model(doc, seed=3)
    result = build_snapshot(
        checkpoint(reference, config),
        (tmp_path / "store").as_uri(),
        chunk_size=64 << 10,
        files={"config.json": json.dumps(doc).encode()},
    )
    snap = restore(result.uri)
    model = build_model(snap)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    base, end = snap.buffer.data_ptr(), snap.buffer.data_ptr() + snap.buffer.numel()
    for name, p in model.named_parameters():
        assert base <= p.data_ptr() < end, f"{name} was copied instead of bound"
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        assert t.device.type == "cpu", name
    ids = prompt(4)
    with torch.inference_mode():
        generated = reference.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, PROMPT_LEN, dtype=torch.long),
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
        )
    assert greedy(model, ids, NEW_TOKENS) == generated[0, PROMPT_LEN:].tolist()


def test_meta_build_needs_materialize() -> None:
    config = ModelConfig.from_hf(VARIANTS["llama2"])
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    with pytest.raises(RuntimeError, match="meta"):
        model.materialize_buffers("cpu")  # weights not loaded yet
    load_into(model, checkpoint(hf_model(VARIANTS["llama2"]), config))
    assert model.model.rotary_emb.inv_freq.device.type == "meta"  # non-persistent: not in the snapshot
    model.materialize_buffers("cpu")
    assert model.model.rotary_emb.inv_freq.device.type == "cpu"
    assert "model.rotary_emb.inv_freq" not in model.state_dict()


# -- batching through the cache ---------------------------------------------------------------------


def test_batched_decode_matches_each_sequence_alone() -> None:
    """Three prompts of different lengths decoded in one batch (each row at its own position, in its
    own slot) give exactly the tokens each gives alone. Slot 0 first holds a longer, unrelated
    sequence, so stale cache contents past a row's position must be masked out."""
    config = ModelConfig.from_hf(VARIANTS["mistral"])
    model = ours(config, checkpoint(hf_model(VARIANTS["mistral"], seed=5), config))
    prompts = [prompt(10, 5), prompt(11, 17), prompt(12, 30)]
    steps = 12
    alone = [greedy(model, p, steps) for p in prompts]

    cache = KVCache(config, 4, 128, torch.float32)
    greedy(model, prompt(13, 60), 4, cache, slot=0)  # leaves garbage in slot 0
    slots = [0, 3, 1]
    with torch.inference_mode():
        last = []
        for p, slot in zip(prompts, slots, strict=True):
            logits = model(torch.tensor([p]), torch.arange(len(p))[None], cache, torch.tensor([slot]))
            last.append(int(logits[0, -1].argmax()))
        together = [[t] for t in last]
        for i in range(steps - 1):
            ids = torch.tensor([[t[-1]] for t in together])
            positions = torch.tensor([[len(p) + i] for p in prompts])
            logits = model(ids, positions, cache, torch.tensor(slots))
            for row, token in zip(together, logits[:, -1].argmax(-1).tolist(), strict=True):
                row.append(token)
    assert together == alone
    assert len({tuple(a) for a in alone}) == 3  # three different continuations: the rows really differ
