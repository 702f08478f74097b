"""Qwen3 in the engine against transformers' Qwen3ForCausalLM (the test-only reference).

Qwen3 differs from the other families in three ways the engine must get right: q and k are
RMS-normalised per head (`q_norm`/`k_norm`, head_dim weights) before RoPE, there are no q/k/v biases,
and `head_dim` is not hidden/heads (Qwen3-0.6B: 1024 / 16 heads, head_dim 128; every model here has
twice hidden/heads too). Checked as the other families are: same logits and identical greedy tokens,
on random weights drawn in transformers and on a modelgen directory carried through a snapshot, then
through the batching engine and a served runtime.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
import transformers
from runtime_helpers import RuntimeProcess
from test_model import NEW_TOKENS, PROMPT_LEN, checkpoint, greedy, hf_greedy, ours, prompt

from kold.modelgen import model_shape, tensor_specs, write_random_model
from kold.runtime.config import ModelConfig
from kold.runtime.engine import Engine, GenerationRequest
from kold.runtime.kvcache import KVCache
from kold.runtime.model import LlamaForCausalLM, build_model
from kold.runtime.sampling import SamplingParams
from kold.runtime.tokenizer import Tokenizer
from kold.snapshot import build_snapshot, restore

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # transformers only ever reads local directories here

# Qwen3-0.6B's config.json as published on the Hub
QWEN3_06B: dict[str, Any] = {
    "architectures": ["Qwen3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 1024,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "max_position_embeddings": 40960,
    "max_window_layers": 28,
    "model_type": "qwen3",
    "num_attention_heads": 16,
    "num_hidden_layers": 28,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000,
    "sliding_window": None,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.51.0",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}
# tiny, with head_dim 32 = twice hidden/heads and GQA (two query heads per kv head)
TINY_QWEN3: dict[str, Any] = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "use_sliding_window": False,
    "sliding_window": None,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "float32",
}
VARIANTS: dict[str, dict[str, Any]] = {
    "tied": {**TINY_QWEN3, "tie_word_embeddings": True},  # as Qwen3-0.6B to 4B
    "untied": {**TINY_QWEN3, "tie_word_embeddings": False},  # as Qwen3-8B and up
    "attention-bias": {**TINY_QWEN3, "attention_bias": True},  # transformers honours it on q/k/v/o
}


def hf_qwen3(config_json: dict[str, Any], seed: int = 0) -> Any:
    """transformers' Qwen3 with every weight drawn (norms around 1, q_norm and k_norm unlike each
    other), so a norm skipped, swapped or applied in the wrong place changes the logits."""
    config = transformers.AutoConfig.for_model(**{**config_json, "eos_token_id": None})
    model = transformers.Qwen3ForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


# -- config -----------------------------------------------------------------------------------------


def test_published_qwen3_config() -> None:
    cfg = ModelConfig.from_hf(QWEN3_06B)
    assert cfg.head_dim == 128 != cfg.hidden_size // cfg.num_attention_heads
    assert cfg.qk_norm and cfg.tie_word_embeddings
    assert not (cfg.qkv_bias or cfg.o_bias or cfg.mlp_bias)
    assert (cfg.sliding_window, cfg.rope_scaling, cfg.rope_theta) == (None, None, 1000000.0)
    assert cfg.eos_token_ids == (151645,) and cfg.torch_dtype == torch.bfloat16
    assert not ModelConfig.from_hf(VARIANTS["untied"]).tie_word_embeddings
    # transformers >= 5 writes rope_parameters and layer_types: the same model
    doc = transformers.AutoConfig.for_model(**QWEN3_06B).to_dict()
    assert "rope_parameters" in doc and doc["layer_types"] == ["full_attention"] * 28
    assert ModelConfig.from_hf(doc) == cfg


def test_qwen3_defaults_follow_transformers() -> None:
    """Without `head_dim`, Qwen3 uses 128 (transformers' default), not hidden/heads."""
    doc = {k: v for k, v in TINY_QWEN3.items() if k != "head_dim"}
    assert ModelConfig.from_hf(doc).head_dim == 128 == transformers.AutoConfig.for_model(**doc).head_dim
    assert ModelConfig.from_hf({**doc, "model_type": "llama", "architectures": ["LlamaForCausalLM"]}).head_dim == 16


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"use_sliding_window": True, "sliding_window": 4096}, "use_sliding_window"),
        ({"layer_types": ["full_attention", "sliding_attention"]}, "use_sliding_window"),
        # Qwen3's long-context recipe (YaRN) is not implemented
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}}, "yarn"),
        ({"head_dim": 31}, "head_dim"),
        ({"attention_bias": "yes"}, "attention_bias"),
    ],
)
def test_unsupported_qwen3_configs_name_the_field(change: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        ModelConfig.from_hf({**TINY_QWEN3, **change})


# -- equivalence with transformers ------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_and_greedy_tokens_match_transformers(variant: str) -> None:
    doc = VARIANTS[variant]
    config = ModelConfig.from_hf(doc)
    reference = hf_qwen3(doc)
    state = checkpoint(reference, config)
    assert state["model.layers.1.self_attn.q_norm.weight"].shape == (32,)
    assert not torch.equal(
        state["model.layers.1.self_attn.q_norm.weight"], state["model.layers.1.self_attn.k_norm.weight"]
    )
    assert ("model.layers.0.self_attn.q_proj.bias" in state) == (variant == "attention-bias")
    model = ours(config, state)
    ids = prompt(1)
    with torch.inference_mode():
        expected = reference(torch.tensor([ids])).logits
        got = model(
            torch.tensor([ids]),
            torch.arange(PROMPT_LEN)[None],
            KVCache(config, 2, 128, torch.float32),
            torch.tensor([1]),
        )
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    expected_tokens = hf_greedy(reference, ids)
    assert len(expected_tokens) == NEW_TOKENS
    assert greedy(model, ids, NEW_TOKENS) == expected_tokens


def test_q_and_k_norms_matter() -> None:
    """Guards the equivalence above against passing vacuously: swapping the two norms' weights
    (what binding them to each other's names would do) moves the logits."""
    config = ModelConfig.from_hf(VARIANTS["tied"])
    state = checkpoint(hf_qwen3(VARIANTS["tied"]), config)
    swapped = dict(state)
    for layer in range(config.num_hidden_layers):
        q, k = f"model.layers.{layer}.self_attn.q_norm.weight", f"model.layers.{layer}.self_attn.k_norm.weight"
        swapped[q], swapped[k] = state[k], state[q]
    ids = torch.tensor([prompt(2)])
    with torch.inference_mode():
        a, b = (
            ours(config, s)(
                ids, torch.arange(PROMPT_LEN)[None], KVCache(config, 1, 64, torch.float32), torch.tensor([0])
            )
            for s in (state, swapped)
        )
    assert (a - b).abs().max() > 1e-2


# -- a modelgen directory, through a snapshot, the engine and the server -----------------------------


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`kold model make-tiny --arch qwen3` in fp32 (exact comparisons), with its trained tokenizer."""
    return write_random_model(tmp_path_factory.mktemp("qwen3") / "tiny", "qwen3", "tiny", dtype=torch.float32, seed=4)


@pytest.fixture(scope="module")
def qwen3_snapshot(qwen3_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    store = tmp_path_factory.mktemp("qwen3-store")
    return build_snapshot(qwen3_dir, store.as_uri(), chunk_size=64 << 10).uri


@pytest.fixture(scope="module")
def reference(qwen3_dir: Path) -> Any:
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        str(qwen3_dir), dtype=torch.float32, output_loading_info=True
    )
    assert type(model).__name__ == "Qwen3ForCausalLM"
    assert not any(info.values()), info  # modelgen writes exactly Hugging Face's names and shapes
    return model.eval()


@pytest.fixture(scope="module")
def restored(qwen3_snapshot: str) -> LlamaForCausalLM:
    return build_model(restore(qwen3_snapshot))


def test_modelgen_qwen3_shapes(qwen3_dir: Path) -> None:
    config = json.loads((qwen3_dir / "config.json").read_text())
    assert (config["model_type"], config["architectures"]) == ("qwen3", ["Qwen3ForCausalLM"])
    assert config["head_dim"] == 2 * config["hidden_size"] // config["num_attention_heads"] == 32
    assert config["tie_word_embeddings"] and not config["attention_bias"] and not config["use_sliding_window"]
    specs = dict(tensor_specs("qwen3", model_shape("qwen3", "tiny")))
    assert specs["model.layers.0.self_attn.q_proj.weight"] == (128, 64)
    assert specs["model.layers.0.self_attn.o_proj.weight"] == (64, 128)
    assert specs["model.layers.0.self_attn.k_norm.weight"] == (32,) and "lm_head.weight" not in specs
    small = dict(tensor_specs("qwen3", model_shape("qwen3", "small")))
    assert small["model.layers.0.self_attn.q_norm.weight"] == (128,)  # Qwen3's real head_dim


def test_snapshot_binds_the_norms_and_matches_transformers(
    restored: LlamaForCausalLM, reference: Any, qwen3_snapshot: str
) -> None:
    """The production path: a modelgen directory -> build_snapshot -> restore -> build_model."""
    snap = restore(qwen3_snapshot)
    names = {t.name for t in snap.manifest.tensors}
    assert {f"model.layers.{i}.self_attn.{n}_norm.weight" for i in (0, 1) for n in "qk"} <= names
    model = build_model(snap)
    base, end = snap.buffer.data_ptr(), snap.buffer.data_ptr() + snap.buffer.numel()
    for name, p in model.named_parameters():
        assert base <= p.data_ptr() < end, f"{name} was copied instead of bound"
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ids = prompt(5)
    with torch.inference_mode():
        expected = reference(torch.tensor([ids])).logits
        got = model(
            torch.tensor([ids]),
            torch.arange(PROMPT_LEN)[None],
            KVCache(model.config, 1, 64, torch.float32),
            torch.tensor([0]),
        )
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert greedy(restored, ids, NEW_TOKENS) == hf_greedy(reference, ids)


def test_engine_batched_greedy_matches_transformers(
    restored: LlamaForCausalLM, reference: Any, qwen3_dir: Path
) -> None:
    """Five prompts of different lengths through a 3-slot engine (rows join and leave the batch at
    different steps): each request's tokens are transformers' greedy continuation of its prompt."""
    prompts = [prompt(20 + i, n) for i, n in enumerate((3, 17, 9, 30, 5))]
    engine = Engine(restored, Tokenizer.from_dir(qwen3_dir), max_batch=3, max_seq_len=128)
    engine.start()

    async def together() -> list[list[int]]:
        params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
        handles = [engine.submit(GenerationRequest(p, params)) for p in prompts]
        return [r.token_ids for r in await asyncio.gather(*(h.result() for h in handles))]

    try:
        got = asyncio.run(together())
    finally:
        engine.stop()
    assert got == [hf_greedy(reference, p) for p in prompts]
    assert len({tuple(g) for g in got}) == len(prompts)  # the rows really differ


@pytest.mark.timeout(180)
def test_served_qwen3_answers_as_transformers(
    qwen3_snapshot: str, qwen3_dir: Path, reference: Any, tmp_path: Path
) -> None:
    """`kold runtime serve` on the qwen3 snapshot: a completion and a chat completion (ChatML) give
    transformers' greedy text for the same prompt, tokenized and templated by transformers, and the
    completion's token log-probabilities are transformers' (modelgen's small random weights leave
    the greedy text of a tiny model insensitive to some mistakes; its probabilities are not)."""
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(qwen3_dir))
    text_prompt = "The water in the river"
    messages = [{"role": "user", "content": "Where does the river go?"}]
    chat_ids = hf_tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    if not isinstance(chat_ids, list):
        chat_ids = list(chat_ids["input_ids"])
    prompt_ids = hf_tok.encode(text_prompt)
    expected_ids = hf_greedy(reference, prompt_ids)
    expected_text = hf_tok.decode(expected_ids, skip_special_tokens=True)
    with torch.inference_mode():  # the log-probability transformers gives each greedy token
        logits = reference(torch.tensor([prompt_ids + expected_ids])).logits[0, len(prompt_ids) - 1 : -1]
        expected_logprobs = logits.float().log_softmax(-1).gather(-1, torch.tensor(expected_ids)[:, None])[:, 0]
    expected_chat = hf_tok.decode(hf_greedy(reference, chat_ids), skip_special_tokens=True)

    process = RuntimeProcess(qwen3_snapshot, tmp_path, "--served-model-name", "qwen3-tiny", "--max-seq-len", "128")
    try:
        process.wait_listening()
        body: dict[str, Any] = {"model": "qwen3-tiny", "max_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True}
        done = httpx.post(
            f"{process.base}/v1/completions", json={**body, "prompt": text_prompt, "logprobs": 0}, timeout=120
        )
        assert done.status_code == 200, done.text
        assert done.json()["usage"]["completion_tokens"] == NEW_TOKENS
        choice = done.json()["choices"][0]
        assert choice["text"] == expected_text
        assert choice["logprobs"]["token_logprobs"] == pytest.approx(expected_logprobs.tolist(), abs=1e-4)
        chat = httpx.post(f"{process.base}/v1/chat/completions", json={**body, "messages": messages}, timeout=60)
        assert chat.status_code == 200, chat.text
        assert chat.json()["usage"]["prompt_tokens"] == len(chat_ids)
        assert chat.json()["choices"][0]["message"]["content"] == expected_chat
    finally:
        process.terminate()
        process.wait(60)
