"""A GGUF file's `tokenizer.*` metadata as the tokenizer files the runtime reads.

A GGUF carries no tokenizer.json: it stores the vocabulary (`tokenizer.ggml.tokens`, their types and,
for SentencePiece, scores), the BPE merges, the special token ids, whether to add BOS/EOS, the name
of the pre-tokenizer (`tokenizer.ggml.pre`: the text split llama.cpp hard-codes per model family)
and the chat template. This module rebuilds from them a `tokenizers` tokenizer.json that encodes as
llama.cpp does (and as the model's original Hugging Face tokenizer does), plus tokenizer_config.json
(named special tokens) and chat_template.jinja.

Supported: `gpt2` (byte-level BPE: SmolLM, Llama 3, Qwen2, ...) with the pre-tokenizers listed in
`BYTE_LEVEL_SPLITS`, and `llama` (SentencePiece BPE with byte fallback: Llama 2, Mistral, TinyLlama),
whose merges are recovered from the scores. Anything else is refused by name.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from kold.snapshot.errors import ModelSourceError
from kold.snapshot.gguf_config import Metadata

# llama.cpp's token types (`llama_token_type`)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# The split before byte-level BPE, per `tokenizer.ggml.pre` (the regexes of the families' own
# tokenizer.json files, which llama.cpp hard-codes under these names).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# name -> (split regex or None for GPT-2's own, digits one by one first, NFC first, whole words kept)
BYTE_LEVEL_SPLITS: dict[str, tuple[str | None, bool, bool, bool]] = {
    "gpt-2": (None, False, False, False),
    "smollm": (None, True, False, False),
    "llama-bpe": (_LLAMA3_SPLIT, False, False, True),
    "llama3": (_LLAMA3_SPLIT, False, False, True),
    "llama-v3": (_LLAMA3_SPLIT, False, False, True),
    "qwen2": (_QWEN2_SPLIT, False, True, False),
    "deepseek-r1-qwen": (_QWEN2_SPLIT, False, True, False),
}
# llama.cpp adds BOS for these unless the file says otherwise
_ADD_BOS_BY_DEFAULT = {"llama-bpe", "llama3", "llama-v3"}


def tokenizer_files(meta: Metadata, *, context_length: int | None = None) -> dict[str, bytes]:
    """tokenizer.json, tokenizer_config.json and (when the file has one) chat_template.jinja."""
    kind = meta.get("tokenizer.ggml.model")
    if kind is None:
        raise ModelSourceError(f"{meta.source}: the GGUF has no tokenizer (no tokenizer.ggml.model)")
    builders: dict[str, Callable[[Metadata, list[str], list[int]], tuple[Any, bool]]] = {
        "gpt2": _byte_level_bpe,
        "llama": _sentencepiece_bpe,
    }
    if kind not in builders:
        raise ModelSourceError(
            f"{meta.source}: GGUF tokenizer {kind!r} is not supported (supported: {', '.join(builders)})"
        )
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise meta.error("tokenizer.ggml.tokens", "a list of strings", tokens)
    if len(set(tokens)) != len(tokens):
        raise ModelSourceError(f"{meta.source}: tokenizer.ggml.tokens lists a token twice")
    types = meta.get("tokenizer.ggml.token_type", [NORMAL] * len(tokens))
    if not isinstance(types, list) or len(types) != len(tokens):
        raise meta.error("tokenizer.ggml.token_type", f"a list of {len(tokens)} token types", types)

    tok, add_bos_default = builders[kind](meta, tokens, types)
    add_bos = _flag(meta, "tokenizer.ggml.add_bos_token", add_bos_default)
    add_eos = _flag(meta, "tokenizer.ggml.add_eos_token", False)
    special = _special_tokens(meta, tokens)
    _added_tokens(tok, tokens, types)
    post = _post_processor(kind, meta, special, add_bos=add_bos, add_eos=add_eos)
    if post is not None:
        tok.post_processor = post

    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",  # loads tokenizer.json as it is
        **special,
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
    }
    if context_length is not None:
        config["model_max_length"] = context_length
    files = {
        "tokenizer.json": tok.to_str(pretty=False).encode(),
        "tokenizer_config.json": json.dumps(config, indent=2).encode(),
    }
    template = meta.get("tokenizer.chat_template")
    if template is not None:
        files["chat_template.jinja"] = meta.string("tokenizer.chat_template").encode()
    return files


def _flag(meta: Metadata, key: str, default: bool) -> bool:
    value = meta.get(key, default)
    if not isinstance(value, bool):
        raise meta.error(key, "true or false", value)
    return value


def _special_tokens(meta: Metadata, tokens: list[str]) -> dict[str, str]:
    """Named special tokens (the template variables `bos_token`, `eos_token`, ...) from their ids."""
    out = {}
    for name, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
        full = f"tokenizer.ggml.{key}_token_id"
        if meta.get(full) is not None:
            index = meta.integer(full, minimum=0)
            if index >= len(tokens):
                raise meta.error(full, f"an id below the vocabulary size {len(tokens)}", index)
            out[f"{name}_token"] = tokens[index]
    return out


def _byte_level_bpe(meta: Metadata, tokens: list[str], types: list[int]) -> tuple[Any, bool]:
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    pre = meta.get("tokenizer.ggml.pre", "gpt-2")
    if pre not in BYTE_LEVEL_SPLITS:
        raise ModelSourceError(
            f"{meta.source}: GGUF pre-tokenizer {pre!r} is not supported (supported: {', '.join(BYTE_LEVEL_SPLITS)})"
        )
    split, digits, nfc, whole_words = BYTE_LEVEL_SPLITS[pre]
    raw_merges = meta.get("tokenizer.ggml.merges")
    if not isinstance(raw_merges, list):
        raise meta.error("tokenizer.ggml.merges", "a list of merges", raw_merges)
    merges = []
    for merge in raw_merges:
        pair = merge.split(" ") if isinstance(merge, str) else []
        if len(pair) != 2:
            raise ModelSourceError(f"{meta.source}: tokenizer.ggml.merges holds {merge!r}, not 'left right'")
        merges.append((pair[0], pair[1]))
    vocab = {token: index for index, token in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=whole_words))
    if nfc:
        tok.normalizer = normalizers.NFC()
    steps: list[Any] = []
    if digits:
        steps.append(pre_tokenizers.Digits(individual_digits=True))
    if split is not None:
        steps.append(pre_tokenizers.Split(Regex(split), behavior="isolated"))
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split is None))
    tok.pre_tokenizer = steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)
    tok.decoder = decoders.ByteLevel()
    return tok, pre in _ADD_BOS_BY_DEFAULT


def _sentencepiece_bpe(meta: Metadata, tokens: list[str], types: list[int]) -> tuple[Any, bool]:
    """SentencePiece BPE as transformers' Llama tokenizer has it: BPE with byte fallback over "▁"
    pieces. A GGUF keeps the pieces' scores, not the merges: SentencePiece merges the adjacent pair
    whose joined piece scores best, so the merges are every split of a piece into two pieces,
    ranked by the joined piece's score."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    scores = meta.get("tokenizer.ggml.scores")
    if not isinstance(scores, list) or len(scores) != len(tokens):
        raise meta.error("tokenizer.ggml.scores", f"a list of {len(tokens)} scores", scores)
    vocab = {token: index for index, token in enumerate(tokens)}
    ranked = []
    for index, (piece, score, kind) in enumerate(zip(tokens, scores, types, strict=True)):
        if kind not in (NORMAL, USER_DEFINED):
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((-score, index, vocab[left], left, right))
    ranked.sort()
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    model = models.BPE(
        vocab=vocab,
        merges=[(left, right) for *_, left, right in ranked],
        unk_token=tokens[unk] if isinstance(unk, int) and 0 <= unk < len(tokens) else None,
        fuse_unk=True,
        byte_fallback=True,
    )
    tok = Tokenizer(model)
    # llama.cpp writes a space before the text and after every special token, as the original
    # (legacy) Llama tokenizer does: Metaspace's "always" on each piece between added tokens
    prefix = _flag(meta, "tokenizer.ggml.add_space_prefix", True)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="\u2581", prepend_scheme="always" if prefix else "never", split=False
    )
    steps: list[Any] = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        steps.append(decoders.Strip(content=" ", left=1))
    tok.decoder = decoders.Sequence(steps)
    return tok, True


def _added_tokens(tok: Any, tokens: list[str], types: list[int]) -> None:
    """Control tokens (`<|im_end|>`, `<s>`) as special added tokens, user-defined ones (`<think>`) as
    plain added tokens: both are matched whole in a text, as llama.cpp does, never split."""
    from tokenizers import AddedToken

    control = [
        AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types, strict=True) if k == CONTROL
    ]
    user = [
        AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types, strict=True) if k == USER_DEFINED
    ]
    if control:
        tok.add_special_tokens(control)
    if user:
        tok.add_tokens(user)


def _post_processor(kind: str, meta: Metadata, special: dict[str, str], *, add_bos: bool, add_eos: bool) -> Any | None:
    """Byte-level offsets for byte-level BPE, then BOS/EOS around each sequence when the file says so."""
    from tokenizers import processors

    ends: list[tuple[str, int]] = []  # (token, id) of BOS and of EOS, the ones added
    for wanted, name, key in ((add_bos, "bos_token", "bos"), (add_eos, "eos_token", "eos")):
        if wanted:
            if name not in special:
                raise ModelSourceError(f"{meta.source}: the GGUF asks to add its {name} but names none")
            ends.append((special[name], meta.integer(f"tokenizer.ggml.{key}_token_id", minimum=0)))
    steps: list[Any] = [processors.ByteLevel(trim_offsets=False)] if kind == "gpt2" else []
    if ends:
        bos, bos1 = (f"{special['bos_token']} ", f"{special['bos_token']}:1 ") if add_bos else ("", "")
        eos, eos1 = (f" {special['eos_token']}", f" {special['eos_token']}:1") if add_eos else ("", "")
        steps.append(
            processors.TemplateProcessing(
                single=f"{bos}$A{eos}", pair=f"{bos}$A{eos} {bos1}$B:1{eos1}", special_tokens=list(dict.fromkeys(ends))
            )
        )
    if not steps:
        return None
    return steps[0] if len(steps) == 1 else processors.Sequence(steps)
