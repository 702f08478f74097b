"""kold.runtime.tokenizer against the real thing: transformers' tokenizer and chat templates (test-only)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kold.modelgen import ARCHS, model_shape, write_random_model, write_tokenizer
from kold.runtime.chat_template import DEFAULT_CHAT_TEMPLATE, ChatTemplateError
from kold.runtime.tokenizer import TOKENIZER_FILES, IncrementalDecoder, Tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # transformers only ever reads local directories here

TEXTS = [
    "Hello world",
    "The keeper climbed the hundred and twelve steps before sunrise.",
    "Café, naïve, résumé, Zürich, São Paulo, Dvořák, Łódź",
    "Emoji: 🙂 😂 ❤️ 👍🏽 🎂 ✈️ 🌧️ 👨‍👩‍👧",
    "日本語のテキスト、こんにちは。 Ελληνικά αβγ ∑√≈∞ → ₹ €",
    "numbers 12345 and 3.14159, dates 2021-03-03, $4.99",
    "  leading spaces, trailing spaces  \n\n\ttabs\tand\r\nnewlines\n",
    "special-looking text: <s> </s> <|im_start|>user [INST] hi [/INST] <|im_end|>",
    "",
]

CONVERSATIONS: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "Hello there!"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Café 🙂? 日本語"},
        {"role": "assistant", "content": "Oui. 👍🏽"},
        {"role": "user", "content": "And\nnow a second line."},
    ],
    [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "reply", "tool_calls": None},
        {"role": "user", "content": "second <s> with markers [INST]"},
    ],
]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tok-models")
    return {arch: write_random_model(root / arch, arch, "tiny", seed=0) for arch in ARCHS}


@pytest.fixture(scope="module")
def ours(model_dirs: dict[str, Path]) -> dict[str, Tokenizer]:
    return {arch: Tokenizer.from_dir(path) for arch, path in model_dirs.items()}


@pytest.fixture(scope="module")
def hf(model_dirs: dict[str, Path]) -> dict[str, Any]:
    import transformers

    return {arch: transformers.AutoTokenizer.from_pretrained(str(path)) for arch, path in model_dirs.items()}


def carried(path: Path) -> dict[str, bytes]:
    return {n: (path / n).read_bytes() for n in TOKENIZER_FILES if (path / n).is_file()}


# -- encode / decode -------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_round_trip(ours: dict[str, Tokenizer], arch: str) -> None:
    tok = ours[arch]
    for text in TEXTS:
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(tok.encode(text, add_special_tokens=False), skip_special_tokens=False) == text
        if "<" not in text:  # (marker strings in the text are special tokens, which decode() skips)
            assert tok.decode(ids) == text


@pytest.mark.parametrize("arch", ARCHS)
def test_special_tokens_and_bos(ours: dict[str, Tokenizer], arch: str) -> None:
    tok = ours[arch]
    with_special = tok.encode("hi")
    without = tok.encode("hi", add_special_tokens=False)
    if arch in ("qwen2", "qwen3"):
        assert tok.bos_token is None and with_special == without
    else:
        assert tok.bos_token == "<s>" and tok.bos_token_id == 1
        assert with_special == [1, *without]
    ids = tok.encode("a<|im_end|>b", add_special_tokens=False)
    assert tok.token_to_id("<|im_end|>") in ids  # special tokens in text are matched whole
    assert tok.decode(ids, skip_special_tokens=False) == "a<|im_end|>b"
    assert tok.decode(ids) == "ab"
    assert tok.vocab_size == 512 == model_shape(arch, "tiny").vocab_size


@pytest.mark.parametrize("arch", ARCHS)
def test_ids_equal_transformers(ours: dict[str, Tokenizer], hf: dict[str, Any], arch: str) -> None:
    from kold.modelgen import corpus_text

    for text in [*TEXTS, corpus_text()[:4000]]:
        for special in (True, False):
            assert ours[arch].encode(text, special) == hf[arch].encode(text, add_special_tokens=special), text
    ids = ours[arch].encode(TEXTS[3] + " <|im_end|> " + TEXTS[4])
    for skip in (True, False):
        assert ours[arch].decode(ids, skip) == hf[arch].decode(ids, skip_special_tokens=skip)
    assert ours[arch].vocab_size == len(hf[arch])


def test_eos_token_ids(ours: dict[str, Tokenizer]) -> None:
    assert ours["llama"].eos_token_ids == [2]
    assert ours["mistral"].eos_token_ids == [2]
    assert ours["qwen2"].eos_token_ids == [8, 2]  # generation_config's list, then eos_token (<|im_end|>, already in)


def test_eos_from_config_json_and_tokenizer_config(model_dirs: dict[str, Path]) -> None:
    files = carried(model_dirs["llama"])
    del files["generation_config.json"]
    files["config.json"] = json.dumps({"eos_token_id": [7, 2]}).encode()
    assert Tokenizer.from_files(files).eos_token_ids == [7, 2]
    files["generation_config.json"] = json.dumps({"eos_token_id": 5}).encode()
    assert Tokenizer.from_files(files).eos_token_ids == [5, 2]  # + tokenizer_config's eos_token </s>


def test_missing_or_bad_tokenizer_json() -> None:
    with pytest.raises(ValueError, match=r"tokenizer\.json"):
        Tokenizer.from_files({"config.json": b"{}"})
    with pytest.raises(ValueError, match=r"tokenizer\.json"):
        Tokenizer.from_files({"tokenizer.json": b"not json"})


def test_padded_vocab_round_trips_and_matches_transformers(tmp_path: Path) -> None:
    """The 1b tokenizer: the corpus yields a few thousand merges, padding brings it to 32000 real tokens."""
    import transformers

    shape = model_shape("llama", "1b")
    write_tokenizer(tmp_path, "llama", shape)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": shape.vocab_size}))
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.vocab_size == shape.vocab_size == 32000
    pieces = [tok.decode([i]) for i in range(len(tok.special_token_ids), tok.vocab_size)]
    assert all(pieces[-5000:]) and len(set(pieces[-5000:])) == 5000  # padded ids decode to distinct text
    reference = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for text in TEXTS:
        assert tok.decode(tok.encode(text), skip_special_tokens=False) == "<s>" + text
        assert tok.encode(text) == reference.encode(text)


# -- chat templates --------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_chat_template_equals_transformers(ours: dict[str, Tokenizer], hf: dict[str, Any], arch: str) -> None:
    assert ours[arch].has_chat_template
    for messages in CONVERSATIONS:
        for gen in (True, False):
            expected = hf[arch].apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert ours[arch].apply_chat_template(messages, add_generation_prompt=gen) == expected
        expected_ids = hf[arch].apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        if isinstance(expected_ids, dict) or hasattr(expected_ids, "input_ids"):
            expected_ids = expected_ids["input_ids"]
        assert ours[arch].encode_chat(messages) == list(expected_ids)


def test_chat_formats(ours: dict[str, Tokenizer]) -> None:
    messages = [{"role": "user", "content": "Hi"}]
    assert ours["llama"].apply_chat_template(messages) == "<s><|user|>\nHi</s>\n<|assistant|>\n"
    assert ours["mistral"].apply_chat_template(messages) == "<s> [INST] Hi [/INST]"
    assert ours["qwen2"].apply_chat_template(messages) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    prompt = ours["llama"].encode_chat(messages)
    assert prompt[0] == 1 and prompt.count(1) == 1  # the template's BOS, not a second one


def test_template_rejections_are_value_errors(ours: dict[str, Tokenizer], hf: dict[str, Any]) -> None:
    import jinja2

    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(ChatTemplateError, match="alternate"):
        ours["mistral"].apply_chat_template(bad)
    with pytest.raises(jinja2.TemplateError, match="alternate"):
        hf["mistral"].apply_chat_template(bad, tokenize=False)
    with pytest.raises(ValueError, match="empty"):
        ours["llama"].apply_chat_template([])
    with pytest.raises(ValueError):  # a list content the template cannot concatenate
        ours["qwen2"].apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "x"}]}])


def test_template_helpers_equal_transformers(model_dirs: dict[str, Path], hf: dict[str, Any]) -> None:
    """tojson (no HTML escaping), raise_exception, loop controls, namespace, {% generation %}, trim/lstrip."""
    template = (
        "{%- set ns = namespace(n=0) -%}\n"
        "{% for message in messages %}\n"
        "    {% if message['role'] == 'stop' %}{% break %}{% endif %}\n"
        "    {% set ns.n = ns.n + 1 %}\n"
        "    {{ message['role'] }}: {{ message | tojson }}\n"
        "    {% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] }}{% endgeneration %}"
        "{% endif %}\n"
        "{% endfor %}\n"
        "count={{ ns.n }} tools={{ tools | tojson }} bos={{ bos_token }} eos={{ eos_token }}\n"
        "{% if add_generation_prompt %}GEN{% endif %}"
        "{% if messages | length > 9 %}{{ raise_exception('too many') }}{% endif %}"
    )
    messages = [
        {"role": "user", "content": "<b>&amp; 'quotes' \"dq\" café 🙂</b>"},
        {"role": "assistant", "content": "ok", "reasoning_content": "thought"},
        {"role": "stop", "content": "x"},
        {"role": "user", "content": "never rendered"},
    ]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"a": 1}}}]
    ours_tok = Tokenizer.from_files({**carried(model_dirs["llama"]), "chat_template.jinja": template.encode()})
    for gen in (True, False):
        expected = hf["llama"].apply_chat_template(
            messages, tools=tools, chat_template=template, tokenize=False, add_generation_prompt=gen
        )
        assert ours_tok.apply_chat_template(messages, add_generation_prompt=gen, tools=tools) == expected
    with pytest.raises(ChatTemplateError, match="too many"):
        ours_tok.apply_chat_template([{"role": "user", "content": "x"}] * 10)


def test_chat_template_sources(model_dirs: dict[str, Path]) -> None:
    files = carried(model_dirs["qwen2"])
    config = json.loads(files["tokenizer_config.json"])
    messages = [{"role": "user", "content": "Hi"}]

    del config["chat_template"]  # no template: ChatML, as transformers' old class default
    files["tokenizer_config.json"] = json.dumps(config).encode()
    tok = Tokenizer.from_files(files)
    assert not tok.has_chat_template and tok.chat_template is None
    assert tok.apply_chat_template(messages) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert "im_start" in DEFAULT_CHAT_TEMPLATE

    config["chat_template"] = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D{{ 1 }}"}]
    files["tokenizer_config.json"] = json.dumps(config).encode()
    assert Tokenizer.from_files(files).apply_chat_template(messages) == "D1"
    files["chat_template.jinja"] = b"J{{ messages[0].content }}"  # the separate file wins, as in transformers
    assert Tokenizer.from_files(files).apply_chat_template(messages) == "JHi"


# -- streaming detokenization ----------------------------------------------------------------------


def stream(tok: Tokenizer, ids: list[int], **kwargs: Any) -> tuple[list[str], str]:
    decoder = IncrementalDecoder(tok, **kwargs)
    deltas = [decoder.step(i) for i in ids]
    return deltas, decoder.flush()


@pytest.mark.parametrize("arch", ARCHS)
def test_incremental_decoder_never_splits_characters(ours: dict[str, Tokenizer], arch: str) -> None:
    tok = ours[arch]
    held = 0
    for text in TEXTS:
        ids = tok.encode(text)
        for skip in (True, False):
            deltas, tail = stream(tok, ids, skip_special_tokens=skip)
            assert "".join(deltas) + tail == tok.decode(ids, skip_special_tokens=skip)
            assert tail == ""  # valid text: nothing left over
            assert not any("\ufffd" in d for d in deltas)
            held += sum(1 for d in deltas if d == "")
    assert held > 0  # multi-byte characters really were split across tokens and held back


def test_incremental_decoder_mixed_with_special_tokens(ours: dict[str, Tokenizer]) -> None:
    tok = ours["qwen2"]
    ids = tok.encode_chat([{"role": "user", "content": "Café 🙂 日本語"}]) + tok.encode("👍🏽 ok<|im_end|>")
    for skip in (True, False):
        deltas, tail = stream(tok, ids, skip_special_tokens=skip)
        assert "".join(deltas) + tail == tok.decode(ids, skip_special_tokens=skip)
        assert not any("\ufffd" in d for d in deltas)


def test_incremental_decoder_random_ids_concatenate_to_decode(ours: dict[str, Tokenizer]) -> None:
    """Arbitrary (possibly invalid UTF-8) ids: the deltas plus flush still equal decode(all ids)."""
    rng = random.Random(7)
    tok = ours["llama"]
    for _ in range(300):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 24))]
        deltas, tail = stream(tok, ids)
        assert "".join(deltas) + tail == tok.decode(ids)
        assert not any(d.endswith("\ufffd") for d in deltas)  # an incomplete character is never emitted early


def test_incremental_decoder_incomplete_tail_is_flushed(ours: dict[str, Tokenizer]) -> None:
    tok = ours["llama"]
    ids = tok.encode("ok 🙂", add_special_tokens=False)
    deltas, tail = stream(tok, ids[:-1])  # stop one byte short of the emoji
    assert "".join(deltas) == "ok " and tail == tok.decode(ids[:-1])[len("ok ") :]
    assert tail.endswith("\ufffd")


def test_incremental_decoder_with_prompt_context(ours: dict[str, Tokenizer]) -> None:
    tok = ours["mistral"]
    prompt = tok.encode("Tell me about café")
    generated = tok.encode(" life 🙂 here", add_special_tokens=False)
    decoder = tok.incremental_decoder(prompt_ids=prompt)
    text = "".join(decoder.step(i) for i in generated) + decoder.flush()
    assert text == " life 🙂 here" and decoder.token_ids == generated


# -- import weight ---------------------------------------------------------------------------------


def test_import_is_light() -> None:
    code = (
        "import sys, kold.runtime.tokenizer\n"
        "bad = [m for m in ('transformers', 'torch', 'jinja2') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# -- token bytes (logprobs) ------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_token_bytes_join_into_the_text(ours: dict[str, Tokenizer], arch: str) -> None:
    """Byte-level tokenizers: each token's bytes, joined, are the text's UTF-8, whatever splits a character."""
    tok = ours[arch]
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        assert b"".join(tok.token_bytes(i) for i in ids) == text.encode(), text
    eos = tok.eos_token_ids[0]
    assert tok.token_bytes(eos) == str(tok.eos_token).encode()  # an added token: its content


def test_token_bytes_of_a_sentencepiece_style_tokenizer() -> None:
    """Llama 2 / Mistral style: Metaspace pieces and <0xNN> byte-fallback tokens, a Replace/ByteFallback/
    Fuse/Strip decoder. A piece keeps its leading space (only a whole text's first one is stripped)."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, normalizers

    chars = ["▁", "H", "e", "l", "o", "w", "r", "d", "▁w", "ll"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    vocab.update({c: len(vocab) + i for i, c in enumerate(chars)})
    backend = Backend(models.BPE(vocab, [("▁", "w"), ("l", "l")], unk_token="<unk>", byte_fallback=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok = Tokenizer(backend, tokenizer_config={"eos_token": "</s>"})
    text = "Hello wörld 😊"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert vocab["<0xC3>"] in ids and vocab["▁w"] in ids  # a character in bytes, a piece with its space
    assert b"".join(tok.token_bytes(i) for i in ids) == b" " + text.encode()
    assert tok.token_bytes(vocab["<0xF0>"]) == b"\xf0" and tok.token_bytes(vocab["▁w"]) == b" w"
