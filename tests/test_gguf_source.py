"""GGUF files as model sources, checked against transformers' own GGUF loader and the models they came from.

Every GGUF here is written by the test with gguf's writer from a random tiny model (modelgen's config
and trained tokenizer, random weights), converted as llama.cpp's converter converts: the q/k rows
of Llama permuted for its RoPE, weights quantized with `gguf.quants` (the K-quants, which gguf-py
cannot quantize, as random valid blocks), the tokenizer as `tokenizer.ggml.*` metadata. kold builds
the file into a snapshot; the tensors must equal what `from_pretrained(dir, gguf_file=...)` loads,
kold's engine must generate the same greedy tokens, and the tokenizer must encode as the original one.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
import transformers
from gguf import GGMLQuantizationType as Q
from safetensors.torch import load_file, save_file

from kold.modelgen import LlamaShape, generation_config, model_config, tensor_specs, write_tokenizer
from kold.runtime.engine import Engine, GenerationRequest
from kold.runtime.sampling import SamplingParams
from kold.runtime.tokenizer import Tokenizer
from kold.snapshot import ModelSourceError, build_snapshot, restore
from kold.snapshot.gguf_source import _convert, read_gguf, rope_row_order
from kold.snapshot.resolve import resolve_model

# every row length a multiple of 256, so each tensor can take every block quantization (K-quants: 256)
SHAPE = LlamaShape(512, 256, 512, 2, 4, 2, 512)
PROMPT = "The capital of France is Paris, and the river that runs through it is"
NEW_TOKENS = 16
K_QUANTS = (Q.Q4_K, Q.Q5_K, Q.Q6_K)
# (d, dmin) of the random K-quant blocks: weights of about +-0.1, like the others
K_SCALES = {Q.Q4_K: (2e-4, 2e-4), Q.Q5_K: (1e-4, 1e-4), Q.Q6_K: (2e-5, 0.0)}

_GLOBAL = {"model.embed_tokens.weight": "token_embd", "model.norm.weight": "output_norm", "lm_head.weight": "output"}
_BLOCK = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


# -- a tiny model and its GGUF -------------------------------------------------------------------------


def write_model(out: Path, arch: str = "llama", *, seed: int = 0, **config: Any) -> Path:
    """A Hugging Face directory: modelgen's config and tokenizer, random float32 weights of a useful
    size (norms around 1, the rest N(0, 0.1)), so greedy decoding has clear winners. Qwen2 ties its
    embeddings, as the small Qwen2 models do."""
    model_shape = replace(SHAPE, tie_word_embeddings=arch == "qwen2")
    write_tokenizer(out, arch, model_shape)
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in tensor_specs(arch, model_shape):
        noise = torch.rand(shape, generator=gen) if name.endswith("norm.weight") else torch.randn(shape, generator=gen)
        state[name] = noise + 0.5 if name.endswith("norm.weight") else noise * 0.1
    save_file(state, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps({**model_config(arch, model_shape, torch.float32), **config}))
    (out / "generation_config.json").write_text(json.dumps(generation_config(arch)))
    return out


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """What llama.cpp's converter does to Llama q/k projections: each head's two RoPE halves interleaved."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def random_k_blocks(rows: int, cols: int, qtype: Q, rng: np.random.Generator) -> np.ndarray:
    """Valid `qtype` blocks of random quants and scales, with small positive f16 super-block scales."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(rows * cols // block_size, type_size), dtype=np.uint8)
    d, dmin = K_SCALES[qtype]
    scales = np.array([d, dmin], dtype=np.float16).view(np.uint8)
    if qtype == Q.Q6_K:  # the scale is the block's last two bytes
        blocks[:, -2:] = scales[:2]
    else:  # d, then dmin, first
        blocks[:, :4] = scales
    return blocks.reshape(rows, -1)


def gguf_name(hf: str) -> str:
    if hf in _GLOBAL:
        return _GLOBAL[hf] + ".weight"
    _, _, layer, rest = hf.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{_BLOCK[module]}.{kind}"


def write_gguf(
    model_dir: Path,
    out: Path,
    qtype: Q = Q.F32,
    *,
    arch: str | None = None,
    pre: str | None = None,
    drop: tuple[str, ...] = (),
    extra: dict[str, np.ndarray] | None = None,
    edit: Callable[[gguf.GGUFWriter], None] | None = None,
    seed: int = 0,
) -> Path:
    """`model_dir` as llama.cpp's converter would write it, every matrix in `qtype` (see the module docstring)."""
    config = json.loads((model_dir / "config.json").read_text())
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    tok_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    hf_arch = config["model_type"]
    writer = gguf.GGUFWriter(out, arch or ("qwen2" if hf_arch == "qwen2" else "llama"))
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    writer.add_name("kold test model")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(config["rope_theta"])
    writer.add_rope_dimension_count(config["hidden_size"] // heads)
    writer.add_vocab_size(config["vocab_size"])

    vocab = tok["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.__getitem__)
    special = {t["content"] for t in tok["added_tokens"] if t["special"]}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre or ("qwen2" if hf_arch == "qwen2" else "gpt-2"))
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in tok["model"]["merges"]])
    if tok_config.get("bos_token"):
        writer.add_bos_token_id(vocab[tok_config["bos_token"]])
    writer.add_eos_token_id(vocab[tok_config["eos_token"]])
    writer.add_pad_token_id(vocab[tok_config["pad_token"]])
    writer.add_add_bos_token(hf_arch != "qwen2")
    writer.add_chat_template(tok_config["chat_template"])
    if edit:
        edit(writer)

    rng = np.random.default_rng(seed)
    for name, tensor in load_file(str(model_dir / "model.safetensors")).items():
        target = gguf_name(name)
        if target in drop:
            continue
        w = tensor.float().numpy()
        if hf_arch != "qwen2" and name.endswith(("q_proj.weight", "k_proj.weight")):
            w = llama_cpp_permute(w, heads if "q_proj" in name else kv_heads)
        if w.ndim == 1:  # norms and biases stay in float32, as llama.cpp keeps them
            writer.add_tensor(target, w)
        elif qtype in K_QUANTS:
            writer.add_tensor(target, random_k_blocks(*w.shape, qtype, rng), raw_dtype=qtype)
        else:
            data = gguf.quants.quantize(w, qtype)
            writer.add_tensor(target, data, raw_dtype=qtype if data.dtype == np.uint8 else None)
    for target, data in (extra or {}).items():
        writer.add_tensor(target, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gguf-models")
    return {arch: write_model(root / arch, arch, seed=i) for i, arch in enumerate(("llama", "qwen2"))}


@pytest.fixture
def store(tmp_path: Path) -> str:
    return (tmp_path / "store").as_uri()


def build(path: Path, store: str, dtype: str | None = "float32") -> Any:
    """kold's path: resolve -> build (small chunks: tensors span chunks) -> restore."""
    result = build_snapshot(resolve_model(path, dtype=dtype), store, chunk_size=64 << 10)
    return restore(result.uri)


def reference(path: Path) -> Any:
    """transformers' own GGUF loader, in float32."""
    return transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)


def reference_tokenizer(path: Path) -> Any:
    return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def kold_greedy(snap: Any, prompt_ids: list[int]) -> list[int]:
    engine = Engine.from_snapshot(snap, Tokenizer.from_files(snap.files), max_batch=1, max_seq_len=128)
    engine.start()
    try:
        params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
        result = engine.submit(GenerationRequest(prompt_ids, params)).result_sync()
    finally:
        engine.stop()
    assert result.finish_reason == "length", result.error
    return result.token_ids


def hf_greedy(model: Any, prompt_ids: list[int]) -> list[int]:
    model.generation_config.eos_token_id = None  # as ignore_eos: exactly NEW_TOKENS, EOS or not
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=0,
        )
    tokens: list[int] = out[0, len(prompt_ids) :].tolist()
    return tokens


# -- tensors ---------------------------------------------------------------------------------------


QUANTS = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, *K_QUANTS]


@pytest.mark.parametrize("qtype", QUANTS, ids=[q.name for q in QUANTS])
def test_tensors_equal_transformers_gguf_loader(qtype: Q, models: dict[str, Path], tmp_path: Path, store: str) -> None:
    path = write_gguf(models["llama"], tmp_path / f"llama-{qtype.name}.gguf", qtype)
    snap = build(path, store)
    expected = reference(path).state_dict()
    assert set(snap.tensors) == set(expected)
    for name, tensor in snap.tensors.items():
        assert torch.equal(tensor, expected[name]), name
    if qtype in K_QUANTS:  # the random blocks really are weights of the expected size, not zeros
        assert 0.01 < float(snap.tensors["model.layers.0.mlp.up_proj.weight"].std()) < 0.5


def test_qwen2_tied_embeddings_and_biases(models: dict[str, Path], tmp_path: Path, store: str) -> None:
    path = write_gguf(models["qwen2"], tmp_path / "qwen2.gguf", Q.Q8_0)
    snap = build(path, store)
    expected = reference(path).state_dict()
    assert snap.config()["tie_word_embeddings"] and "lm_head.weight" not in snap.tensors
    assert "model.layers.1.self_attn.k_proj.bias" in snap.tensors
    assert set(snap.tensors) == set(expected) - {"lm_head.weight"}
    for name, tensor in snap.tensors.items():
        assert torch.equal(tensor, expected[name]), name


def test_bf16_build_is_the_float32_weights_rounded(models: dict[str, Path], tmp_path: Path, store: str) -> None:
    """The default compute dtype: every tensor (norms included) is transformers' float32 in bfloat16."""
    path = write_gguf(models["llama"], tmp_path / "llama.gguf", Q.Q4_0)
    snap = build(path, store, dtype=None)
    expected = reference(path).state_dict()
    assert snap.config()["torch_dtype"] == "bfloat16"
    for name, tensor in snap.tensors.items():
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, expected[name].to(torch.bfloat16)), name


def test_an_f32_gguf_gives_back_the_original_checkpoint(models: dict[str, Path], tmp_path: Path, store: str) -> None:
    """The q/k rows are put back exactly where Hugging Face has them (not only where transformers does)."""
    snap = build(write_gguf(models["llama"], tmp_path / "llama.gguf"), store)
    original = load_file(str(models["llama"] / "model.safetensors"))
    assert set(snap.tensors) == set(original)
    for name, tensor in snap.tensors.items():
        assert torch.equal(tensor, original[name]), name
    config = snap.config()
    source = json.loads((models["llama"] / "config.json").read_text())
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        assert config[key] == source[key], key
    assert (config["num_key_value_heads"], config["rms_norm_eps"], config["rope_theta"]) == (2, 1e-5, 10000.0)


def test_rope_rows_are_the_inverse_of_llama_cpp_permutation() -> None:
    w = np.arange(4 * 16 * 3).reshape(4 * 16, 3)
    permuted = llama_cpp_permute(w, 4)
    assert not np.array_equal(permuted, w)
    assert np.array_equal(permuted[rope_row_order(64, 4)], w)


def test_a_tensor_converted_in_row_slices_equals_one_converted_whole(models: dict[str, Path], tmp_path: Path) -> None:
    """Large tensors are dequantized a slice of rows at a time; the slices must add up to the tensor."""
    model = read_gguf(write_gguf(models["llama"], tmp_path / "llama.gguf", Q.Q4_K), dtype="bfloat16")
    for t in model.tensors:
        if t.name.endswith(("q_proj.weight", "embed_tokens.weight")):
            cols = t.shape[-1]
            assert bytes(_convert(t, "bfloat16", slice_elements=cols)) == bytes(_convert(t, "bfloat16")), t.name
            assert bytes(_convert(t, "bfloat16", slice_elements=3 * cols)) == bytes(_convert(t, "bfloat16")), t.name


# -- generation -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arch", "qtype"),
    [("llama", Q.Q8_0), ("qwen2", Q.Q4_1), ("llama", Q.Q6_K)],
    ids=["llama-Q8_0", "qwen2-Q4_1", "llama-Q6_K"],
)
def test_greedy_generation_equals_transformers(
    arch: str, qtype: Q, models: dict[str, Path], tmp_path: Path, store: str
) -> None:
    path = write_gguf(models[arch], tmp_path / f"{arch}.gguf", qtype)
    snap = build(path, store)
    ids = Tokenizer.from_files(snap.files).encode(PROMPT)
    assert ids == reference_tokenizer(path).encode(PROMPT)
    expected = hf_greedy(reference(path), ids)
    assert kold_greedy(snap, ids) == expected
    assert len(set(expected)) > 2  # a real continuation, not one token repeated


def llama3_divisors(theta: float, head_dim: int, factor: float, original: int) -> np.ndarray:
    """llama.cpp's converter's rope_freqs for Llama 3 (low_freq_factor 1, high_freq_factor 4)."""
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < original / 4:
            out.append(1.0)
        elif wavelen > original:
            out.append(factor)
        else:
            smooth = (original / wavelen - 1) / 3
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def test_llama3_rope_scaling_comes_back_from_rope_freqs(tmp_path: Path, store: str) -> None:
    """llama.cpp stores Llama 3's RoPE scaling as a rope_freqs tensor: kold reads it back into config.json,
    and generates what transformers generates from the original checkpoint."""
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}  # fmt: skip
    model_dir = write_model(tmp_path / "llama3", rope_theta=500000.0, rope_scaling=scaling, seed=5)
    divisors = llama3_divisors(500000.0, 64, 8.0, 8192)
    assert {1.0, 8.0} < set(divisors.tolist())  # all three bands are present
    path = write_gguf(model_dir, tmp_path / "llama3.gguf", extra={"rope_freqs.weight": divisors})
    snap = build(path, store)
    assert snap.config()["rope_scaling"] == scaling and "rope_freqs.weight" not in snap.tensors
    original = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids = Tokenizer.from_files(snap.files).encode(PROMPT)
    assert kold_greedy(snap, ids) == hf_greedy(original, ids)


# -- tokenizer ------------------------------------------------------------------------------------

TEXTS = [
    "Hello world",
    PROMPT,
    "  two  spaces\n\nnew lines\tand a tab, 2024 and 12345 and a  7",
    "<|im_start|>user\nhi<|im_end|>",
    "accents: éèü, emoji 🙂, CJK 中文",
    "don't it's WE'LL",
]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tokenizer_encodes_as_the_original_and_as_transformers(
    arch: str, models: dict[str, Path], tmp_path: Path
) -> None:
    path = write_gguf(models[arch], tmp_path / f"{arch}.gguf")
    model = read_gguf(path)
    ours, original, theirs = (
        Tokenizer.from_files(model.files),
        Tokenizer.from_dir(models[arch]),
        reference_tokenizer(path),
    )
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == original.encode(text) == theirs.encode(text), text
        assert ours.decode(ids, skip_special_tokens=False) == original.decode(ids, skip_special_tokens=False)
    assert (ours.encode("hi")[0] == 1) is (arch == "llama")  # BOS only where the file says so
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    assert ours.apply_chat_template(messages) == original.apply_chat_template(messages)
    assert ours.apply_chat_template(messages) == theirs.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    assert ours.eos_token == original.eos_token and set(ours.eos_token_ids) <= set(original.eos_token_ids)
    assert ours.special_token_ids == original.special_token_ids


def test_smollm_pre_tokenizer_splits_digits_one_by_one(models: dict[str, Path], tmp_path: Path) -> None:
    """`smollm` (SmolLM's tokenizer.json: digits split off one by one, then GPT-2's split)."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import pre_tokenizers

    path = write_gguf(models["llama"], tmp_path / "smollm.gguf", pre="smollm")
    ours = Tokenizer.from_files(read_gguf(path).files)
    original = Backend.from_file(str(models["llama"] / "tokenizer.json"))
    original.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    for text in [*TEXTS, "a  2024", "x1y22z333 4.5"]:
        assert ours.encode(text) == original.encode(text).ids, text


def test_llama_bpe_pre_tokenizer_is_transformers(models: dict[str, Path], tmp_path: Path) -> None:
    path = write_gguf(models["llama"], tmp_path / "llama3.gguf", pre="llama-bpe")
    ours, theirs = Tokenizer.from_files(read_gguf(path).files), reference_tokenizer(path)
    for text in [*TEXTS, "a  2024", "x1y22z333 4444.5"]:
        assert ours.encode(text) == theirs.encode(text), text


def test_sentencepiece_tokenizer_merges_recovered_from_scores(models: dict[str, Path], tmp_path: Path) -> None:
    """A `llama` (SentencePiece) vocabulary has scores, not merges: the merges kold recovers must
    tokenize as the merges the vocabulary was trained with, and as transformers' GGUF tokenizer."""
    from tokenizers import SentencePieceBPETokenizer

    from kold.modelgen import corpus_text

    trained = SentencePieceBPETokenizer()
    paragraphs = [p for p in corpus_text().split("\n\n") if p.strip()]
    trained.train_from_iterator(
        paragraphs, vocab_size=600, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    vocab = trained.get_vocab()
    tokens = sorted(vocab, key=vocab.__getitem__) + [f"<0x{b:02X}>" for b in range(256)]
    types = [gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.NORMAL] * (len(vocab) - 3) + [gguf.TokenType.BYTE] * 256

    def spm(writer: gguf.GGUFWriter) -> None:
        for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.merges",
                    "tokenizer.ggml.token_type", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                    "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token"):  # fmt: skip
            writer.kv_data[0].pop(key)
        writer.add_tokenizer_model("llama")
        writer.add_token_list(tokens)
        writer.add_token_scores([-float(i) for i in range(len(tokens))])  # later merges score lower
        writer.add_token_types(types)
        writer.add_unk_token_id(0)
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)

    path = write_gguf(models["llama"], tmp_path / "spm.gguf", edit=spm)
    ours, theirs = Tokenizer.from_files(read_gguf(path).files), reference_tokenizer(path)
    for text in ["The capital of France is Paris.", "  the  spaces ", "Hello world, said the river."]:
        ids = ours.encode(text)
        assert ids[0] == 1 and ids[1:] == trained.encode(text).ids, text
        assert ids == theirs.encode(text), text
    # Metaspace adds no "▁" before a text that starts with a space, so that one comes back one space short
    assert ours.decode(ours.encode("Hello world, said the river.")) == "Hello world, said the river."
    fallback = ours.encode("snow ☃", add_special_tokens=False)
    assert [ours.id_to_token(i) for i in fallback[-3:]] == ["<0xE2>", "<0x98>", "<0x83>"]
    assert ours.decode(fallback) == "snow ☃"


# -- what is refused ----------------------------------------------------------------------------------


def _kv(key: str, value: Any, kind: gguf.GGUFValueType) -> Callable[[gguf.GGUFWriter], None]:
    return lambda writer: writer.add_key_value(key, value, kind)


REFUSED: dict[str, tuple[dict[str, Any], str]] = {
    "architecture": ({"arch": "gemma2"}, "architecture 'gemma2' is not supported"),
    "quantization": ({"qtype": Q.Q5_0}, r"quantization types not supported: Q5_0 \(16 tensors\)"),
    "unknown tensor": ({"extra": {"blk.0.attn_q_norm.weight": np.ones(64, np.float32)}}, "blk.0.attn_q_norm.weight"),
    "missing tensor": ({"drop": ("blk.1.ffn_up.weight",)}, r"missing from the GGUF: model\.layers\.1\.mlp\.up_proj"),
    "rope scaling": ({"edit": _kv("llama.rope.scaling.type", "yarn", gguf.GGUFValueType.STRING)}, "'yarn'"),
    "mixture of experts": ({"edit": _kv("llama.expert_count", 8, gguf.GGUFValueType.UINT32)}, "mixture-of-experts"),
    "rope_freqs": ({"extra": {"rope_freqs.weight": np.full(32, 2.0, np.float32)}}, "not Llama 3's RoPE scaling"),
    "pre-tokenizer": ({"pre": "falcon"}, "pre-tokenizer 'falcon' is not supported"),
    "tokenizer": ({"edit": _kv("tokenizer.ggml.model", "bert", gguf.GGUFValueType.STRING)}, "tokenizer 'bert' is not"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_what_kold_cannot_run_is_refused_by_name(case: str, models: dict[str, Path], tmp_path: Path) -> None:
    kwargs, message = REFUSED[case]
    path = write_gguf(models["llama"], tmp_path / "x.gguf", **kwargs)
    with pytest.raises(ModelSourceError, match=message):
        resolve_model(path)


def test_a_broken_file_is_refused(models: dict[str, Path], tmp_path: Path) -> None:
    fake = tmp_path / "fake.gguf"
    fake.write_text("not a model")
    with pytest.raises(ModelSourceError, match="not a GGUF file"):
        resolve_model(fake)
    whole = write_gguf(models["llama"], tmp_path / "whole.gguf").read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ModelSourceError, match=r"cut\.gguf"):
        resolve_model(cut)


# -- the CLI ------------------------------------------------------------------------------------------


def kold(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    env = {"KOLD_HOME": str(home), "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        [sys.executable, "-m", "kold", *args], capture_output=True, text=True, timeout=240, env=env, check=False
    )


def test_kold_snapshot_build_takes_a_gguf(models: dict[str, Path], tmp_path: Path, store: str) -> None:
    path = write_gguf(models["qwen2"], tmp_path / "tiny-qwen2.Q8_0.gguf", Q.Q8_0)
    built = kold("snapshot", "build", str(path), "--to", store, "--chunk-size", "64KiB", home=tmp_path / "home")
    assert built.returncode == 0, built.stderr
    uri = built.stdout.strip()
    inspected = kold("snapshot", "inspect", uri, "-o", "json", home=tmp_path / "home")
    doc = json.loads(inspected.stdout)
    assert doc["metadata"]["source"] == "gguf" and doc["metadata"]["source_file"] == path.name
    assert {f["name"] for f in doc["files"]} >= {"config.json", "tokenizer.json", "chat_template.jinja"}
    assert {t["dtype"] for t in doc["tensors"]} == {"bf16"}

    missing = kold("snapshot", "build", str(tmp_path / "nothing.gguf"), "--to", store, home=tmp_path / "home")
    assert missing.returncode == 2 and "nothing.gguf: no such file" in missing.stderr
    refused = kold(
        "snapshot", "build", str(write_gguf(models["llama"], tmp_path / "q5.gguf", Q.Q5_0)), home=tmp_path / "home"
    )
    assert refused.returncode == 1 and "Traceback" not in refused.stderr and "Q5_0" in refused.stderr


@pytest.fixture(autouse=True)
def _quiet_transformers() -> None:
    """transformers' loaders warn about the random files' contents; keep the test output readable."""
    transformers.logging.set_verbosity_error()
