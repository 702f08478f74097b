"""Prompts of a target token count: exact with a tokenizer (kold's own trained ones, and a byte-level one
without merges whose words are never one token), the documented approximation without one."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from kold.loadgen.prompts import WORDS, PromptFactory
from kold.modelgen import model_shape, write_tokenizer

COUNTS = [*range(1, 40), 100, 257, 1000, 4096]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def kold_tokenizer(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trained tokenizer of kold's tiny models: llama's adds a BOS, qwen2's does not."""
    out = tmp_path_factory.mktemp(f"tok-{request.param}")
    write_tokenizer(out, request.param, model_shape(request.param, "tiny"))
    return out


def count(tokenizer_dir: Path, text: str) -> int:
    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    return len(tok.encode(text, add_special_tokens=False).ids)


def test_exact_counts_with_a_trained_tokenizer(kold_tokenizer: Path) -> None:
    factory = PromptFactory(kold_tokenizer)
    assert factory.exact
    rng = random.Random(0)
    for n in COUNTS:
        text = factory.make(n, rng)
        assert count(kold_tokenizer, text) == n, (n, text[:80])
    assert factory.make(0, rng) == ""


def test_exact_counts_with_a_tokenizer_that_has_no_one_token_words(tmp_path: Path) -> None:
    """Every byte a token: padding by whole words cannot work, the character-level fallback must."""
    tok = Tokenizer(
        models.BPE(vocab={c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}, merges=[])
    )
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.save(str(tmp_path / "tokenizer.json"))
    factory = PromptFactory(tmp_path / "tokenizer.json")  # the file itself also works
    rng = random.Random(1)
    for n in [1, 2, 3, 7, 50, 333]:
        assert count(tmp_path, factory.make(n, rng)) == n


def test_the_same_rng_gives_the_same_prompt_and_prompts_differ(kold_tokenizer: Path) -> None:
    factory = PromptFactory(kold_tokenizer)
    assert factory.make(200, random.Random(5)) == factory.make(200, random.Random(5))
    rng = random.Random(5)
    first, second = factory.make(200, rng), factory.make(200, rng)
    assert first.split()[:4] != second.split()[:4]  # no shared prefix for a prefix cache to serve


def test_the_approximation_is_one_word_per_token() -> None:
    factory = PromptFactory(None)
    assert not factory.exact
    assert "one common English word per token" in factory.description
    rng = random.Random(2)
    for n in [1, 10, 512]:
        words = factory.make(n, rng).split(" ")
        assert len(words) == n
        assert set(words) <= set(WORDS)
    assert factory.make(50, random.Random(3)) == factory.make(50, random.Random(3))


def test_bad_tokenizers_and_counts_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"no tokenizer\.json at"):
        PromptFactory(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot load"):
        PromptFactory(tmp_path)
    with pytest.raises(ValueError, match="must be a whole number, 0 or more"):
        PromptFactory(None).make(-1, random.Random(0))
