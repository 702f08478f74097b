"""kold.modelgen and `kold model make-tiny`: complete, loadable, deterministic model directories."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from kold.cli import main
from kold.modelgen import (
    ARCHS,
    SIZES,
    _trained_bpe,
    model_nbytes,
    model_shape,
    tensor_specs,
    tokenizer_json,
    write_random_model,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # transformers only ever reads local directories here

MODEL_FILES = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}


def tree(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each architecture through the CLI; qwen2 also sharded (index json), to load that layout too."""
    root = tmp_path_factory.mktemp("made")
    for arch in ARCHS:
        assert main(["model", "make-tiny", str(root / arch), "--arch", arch, "--seed", "5"]) == 0
    write_random_model(root / "qwen2-sharded", "qwen2", "tiny", seed=5, shard_bytes=60_000)
    return {p.name: p for p in root.iterdir()}


def test_files_and_configs(made: dict[str, Path]) -> None:
    for arch in ARCHS:
        assert set(tree(made[arch])) == MODEL_FILES
    llama = json.loads((made["llama"] / "config.json").read_text())
    mistral = json.loads((made["mistral"] / "config.json").read_text())
    qwen2 = json.loads((made["qwen2"] / "config.json").read_text())
    assert (llama["model_type"], llama["architectures"]) == ("llama", ["LlamaForCausalLM"])
    assert (mistral["model_type"], mistral["architectures"]) == ("mistral", ["MistralForCausalLM"])
    assert mistral["sliding_window"] is None
    assert (qwen2["model_type"], qwen2["architectures"]) == ("qwen2", ["Qwen2ForCausalLM"])
    assert qwen2["tie_word_embeddings"] is True and llama["tie_word_embeddings"] is False
    for config in (llama, mistral, qwen2):
        assert config["vocab_size"] == 512
        tokenizer = json.loads((made[config["model_type"]] / "tokenizer.json").read_text())
        ids = [*tokenizer["model"]["vocab"].values(), *(t["id"] for t in tokenizer["added_tokens"])]
        assert max(ids) == config["vocab_size"] - 1  # every token id has an embedding row, and no row is unused
        assert config["bos_token_id"] == 1 and config["eos_token_id"] in (2, 8)
    tok_config = json.loads((made["qwen2"] / "tokenizer_config.json").read_text())
    assert tok_config["eos_token"] == "<|im_end|>" and "chat_template" in tok_config
    assert json.loads((made["qwen2"] / "generation_config.json").read_text())["eos_token_id"] == [8, 2]
    sharded = set(tree(made["qwen2-sharded"]))
    assert "model.safetensors.index.json" in sharded and sum(n.endswith(".safetensors") for n in sharded) > 1


def test_qwen2_weights_have_qkv_biases_and_no_lm_head(made: dict[str, Path]) -> None:
    from safetensors import safe_open

    with safe_open(str(made["qwen2"] / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    for proj in ("q_proj", "k_proj", "v_proj"):
        assert f"model.layers.0.self_attn.{proj}.bias" in names
    assert "model.layers.0.self_attn.o_proj.bias" not in names and "lm_head.weight" not in names
    assert names == {n for n, _ in tensor_specs("qwen2", model_shape("qwen2", "tiny"))}


@pytest.mark.parametrize("arch", [*ARCHS, "qwen2-sharded"])
def test_transformers_loads_config_and_weights(made: dict[str, Path], arch: str) -> None:
    import torch
    import transformers

    config = transformers.AutoConfig.from_pretrained(str(made[arch]))
    assert config.model_type == arch.removesuffix("-sharded")
    model, info = transformers.AutoModelForCausalLM.from_pretrained(str(made[arch]), output_loading_info=True)
    assert type(model).__name__ == config.architectures[0]
    problems = {k: v for k, v in info.items() if v}
    assert not problems, problems  # no missing, unexpected or mismatched keys: the names are Hugging Face's
    from safetensors.torch import load_file

    state = model.state_dict()
    for path in made[arch].glob("*.safetensors"):
        for name, tensor in load_file(str(path)).items():
            assert torch.equal(state[name].to(tensor.dtype), tensor), name
    if config.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_same_command_twice_is_byte_identical(made: dict[str, Path], tmp_path: Path) -> None:
    """A fresh process (the CLI, as a user runs it) writes exactly what this process wrote."""
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    for arch in ("qwen2",):
        out = tmp_path / arch
        cmd = [sys.executable, "-m", "kold", "model", "make-tiny", str(out), "--arch", arch, "--seed", "5"]
        subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=120)
        assert tree(out) == tree(made[arch])
    code = (
        "import sys; from pathlib import Path; from kold.modelgen import write_random_model\n"
        "for arch in ('llama', 'mistral'): write_random_model(Path(sys.argv[1]) / arch, arch, seed=5)\n"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, env=env, timeout=120)
    for arch in ("llama", "mistral"):
        assert tree(tmp_path / arch) == tree(made[arch])


def test_tokenizer_training_is_deterministic_and_sized() -> None:
    for size in SIZES:
        vocab = SIZES[size].vocab_size
        first = tokenizer_json("llama", vocab)
        _trained_bpe.cache_clear()
        assert tokenizer_json("llama", vocab) == first
        doc = json.loads(first)
        assert len(doc["model"]["vocab"]) == vocab
        assert len(set(doc["model"]["vocab"].values())) == vocab


def test_tiny_is_fast(tmp_path: Path) -> None:
    _trained_bpe.cache_clear()
    started = time.perf_counter()
    write_random_model(tmp_path / "m", "qwen2", "tiny")
    assert time.perf_counter() - started < 2.0


def test_progress_shards_and_no_tokenizer(tmp_path: Path) -> None:
    calls: list[int] = []
    sharded = write_random_model(
        tmp_path / "sharded", "llama", "tiny", seed=1, shard_bytes=60_000, progress=calls.append, tokenizer=False
    )
    assert sum(calls) == model_nbytes("llama", "tiny")
    assert "tokenizer.json" not in tree(sharded) and "model.safetensors.index.json" in tree(sharded)
    whole = write_random_model(tmp_path / "whole", "llama", "tiny", seed=1)
    assert json.loads((sharded / "config.json").read_text()) == json.loads((whole / "config.json").read_text())


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--arch", "gpt2"], "unknown architecture 'gpt2' (choose from llama, mistral, qwen2, qwen3)"),
        (["--size", "huge"], "unknown size 'huge' (choose from tiny, small, 1b)"),
    ],
)
def test_cli_rejects_bad_arch_and_size(tmp_path: Path, capsys: Any, argv: list[str], message: str) -> None:
    assert main(["model", "make-tiny", str(tmp_path / "out"), *argv]) == 1
    err = capsys.readouterr().err
    assert err == f"kold: error: {message}\n"
    assert not (tmp_path / "out").exists()


def test_cli_refuses_non_empty_or_file_out(tmp_path: Path, capsys: Any) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    (tmp_path / "file").write_text("x")
    for name in ("full", "file"):
        assert main(["model", "make-tiny", str(tmp_path / name)]) == 1
        err = capsys.readouterr().err
        assert err.startswith("kold: error: ") and err.count("\n") == 1
    assert (tmp_path / "full" / "x").read_text() == "x"
