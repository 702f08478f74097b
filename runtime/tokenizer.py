"""The model's tokenizer, from the files a snapshot carries, without transformers.

`Tokenizer.from_files` takes the carried files by name (`tokenizer.json` is required;
`tokenizer_config.json`, `special_tokens_map.json`, `generation_config.json`, `config.json` and
`chat_template.jinja` are read when present) and wraps `tokenizers.Tokenizer`:

- `encode` / `decode` are the `tokenizers` pipeline as `tokenizer.json` defines it (normalizer,
  pre-tokenizer, model, post-processor adding BOS, decoder), so ids equal transformers' fast tokenizer's;
- `apply_chat_template` renders the model's Jinja chat template as transformers does (see
  `chat_template.py`); `encode_chat` tokenizes the result without adding special tokens again, since
  templates write their own BOS (transformers' `apply_chat_template(tokenize=True)` does the same);
- `eos_token_ids` are every id that ends a generation: `generation_config.json`'s `eos_token_id` (an
  int or a list; `config.json`'s when there is no generation config), then the tokenizer's `eos_token`;
- `IncrementalDecoder` turns a stream of generated ids into text deltas for streaming responses;
- `token_bytes` is what one token stands for inside a text, as bytes (the `bytes` of OpenAI's logprobs).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol

import tokenizers

# transformers' named special tokens (`SPECIAL_TOKENS_ATTRIBUTES`); templates see those that are set.
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

# The files `from_dir` picks up (all carried by a snapshot: see kold.snapshot.sources.CARRIED_SUFFIXES).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "config.json",
    "chat_template.jinja",
)

# How many prompt tokens an IncrementalDecoder decodes along with the first generated ones, so that
# decoders that strip a leading space at the start of a text (SentencePiece's Metaspace) see context.
PROMPT_CONTEXT_TOKENS = 5

_REPLACEMENT = "\ufffd"
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # a byte-fallback token
# decoders whose effect on a whole text is the concatenation of their effect on each token
_PIECEWISE_DECODERS = frozenset({"ByteLevel", "ByteFallback", "Replace", "Metaspace", "Fuse", "Strip"})


def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's printable stand-in for each byte (GPT-2's scheme), inverted: char -> byte.

    Bytes that print as themselves (the visible Latin-1 ones) keep their code point; the others
    (control characters, space, ...) take the code points from 256 upwards, in byte order."""
    visible = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shown = set(visible)
    out = {chr(b): b for b in visible}
    extra = 0
    for b in range(256):
        if b not in shown:
            out[chr(256 + extra)] = b
            extra += 1
    return out


_BYTE_LEVEL = _byte_level_alphabet()


def _decoder_steps(tok: tokenizers.Tokenizer) -> list[dict[str, Any]] | None:
    """The tokenizer's decoder as a flat list of steps (a Sequence unrolled); None if it has none."""
    decoder = tok.decoder
    if decoder is None:
        return None
    try:
        state = json.loads(decoder.__getstate__())
    except (AttributeError, TypeError, ValueError):
        return [{"type": "unknown"}]
    steps: list[dict[str, Any]] = []

    def walk(d: Any) -> None:
        if isinstance(d, dict) and d.get("type") == "Sequence":
            for inner in d.get("decoders") or []:
                walk(inner)
        elif isinstance(d, dict):
            steps.append(d)

    walk(state)
    return steps


def _token_content(value: Any) -> str | None:
    """A special token as tokenizer_config writes it: a string, or an AddedToken dict with `content`."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


def _int_list(value: Any) -> list[int]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def _json_file(files: Mapping[str, bytes], name: str) -> dict[str, Any]:
    raw = files.get(name)
    if raw is None:
        return {}
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{name}: not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{name}: expected a JSON object")
    return doc


def _pick_chat_template(files: Mapping[str, bytes], config: Mapping[str, Any]) -> str | None:
    """`chat_template.jinja` wins over tokenizer_config's `chat_template` (a string, or a list of named ones)."""
    raw = files.get("chat_template.jinja")
    if raw is not None:
        return raw.decode("utf-8")
    value = config.get("chat_template")
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, Mapping)}
        chosen = named.get("default", next(iter(named.values()), None))
        return chosen if isinstance(chosen, str) else None
    return None


class Tokenizer:
    """Encode, decode, chat templates and stop ids for one model (see the module docstring)."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        tokenizer_config: Mapping[str, Any] | None = None,
        special_tokens_map: Mapping[str, Any] | None = None,
        generation_config: Mapping[str, Any] | None = None,
        model_config: Mapping[str, Any] | None = None,
        chat_template: str | None = None,
    ) -> None:
        self._tok = backend
        # transformers never pads or truncates unless asked to; a tokenizer.json may carry either setting
        self._tok.no_truncation()
        self._tok.no_padding()
        cfg = dict(tokenizer_config or {})
        names = list(SPECIAL_TOKEN_NAMES)
        extra = cfg.get("extra_special_tokens")
        if isinstance(extra, Mapping):  # named extras (e.g. "image_token") join the template variables
            names += [k for k in extra if isinstance(k, str) and k not in names]
        special: dict[str, str] = {}
        for name in names:
            value = _token_content(cfg.get(name, extra.get(name) if isinstance(extra, Mapping) else None))
            if value is not None:
                special[name] = value
        for name, value in (special_tokens_map or {}).items():  # special_tokens_map.json overrides, as in HF
            if name in names and _token_content(value) is not None:
                special[name] = str(_token_content(value))
        self.special_tokens: dict[str, str] = special
        self.chat_template: str | None = chat_template if chat_template is not None else _pick_chat_template({}, cfg)

        gen = generation_config if generation_config else (model_config or {})
        eos: list[int] = _int_list(gen.get("eos_token_id"))
        eos_token_id = self.token_to_id(self.eos_token) if self.eos_token is not None else None
        if eos_token_id is not None:
            eos.append(eos_token_id)
        self.eos_token_ids: list[int] = list(dict.fromkeys(eos))
        added = backend.get_added_tokens_decoder()
        self.special_token_ids: frozenset[int] = frozenset(i for i, t in added.items() if t.special)
        self._added: dict[int, str] = {i: t.content for i, t in added.items()}
        self._decoder_steps: list[dict[str, Any]] | None = None  # read on the first token_bytes
        self._token_bytes: dict[int, bytes] = {}

    # -- construction ------------------------------------------------------------------------------

    @classmethod
    def from_files(cls, files: Mapping[str, bytes]) -> Tokenizer:
        """Build from carried files by name; `ValueError` when tokenizer.json is missing or malformed."""
        raw = files.get("tokenizer.json")
        if raw is None:
            raise ValueError("the model has no tokenizer.json (only fast, tokenizers-format tokenizers are supported)")
        try:
            backend = tokenizers.Tokenizer.from_str(raw.decode("utf-8"))
        except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
            raise ValueError(f"tokenizer.json: cannot load: {exc}") from None
        config = _json_file(files, "tokenizer_config.json")
        return cls(
            backend,
            tokenizer_config=config,
            special_tokens_map=_json_file(files, "special_tokens_map.json"),
            generation_config=_json_file(files, "generation_config.json"),
            model_config=_json_file(files, "config.json"),
            chat_template=_pick_chat_template(files, config),
        )

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Build from a Hugging Face model directory (reads the files in TOKENIZER_FILES that exist)."""
        root = Path(path)
        return cls.from_files({n: (root / n).read_bytes() for n in TOKENIZER_FILES if (root / n).is_file()})

    # -- vocabulary --------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (transformers' `len(tokenizer)`)."""
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    @property
    def bos_token(self) -> str | None:
        return self.special_tokens.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens.get("eos_token")

    @property
    def pad_token(self) -> str | None:
        return self.special_tokens.get("pad_token")

    @property
    def bos_token_id(self) -> int | None:
        return self.token_to_id(self.bos_token) if self.bos_token is not None else None

    @property
    def pad_token_id(self) -> int | None:
        return self.token_to_id(self.pad_token) if self.pad_token is not None else None

    def token_to_id(self, token: str) -> int | None:
        value = self._tok.token_to_id(token)
        return None if value is None else int(value)

    def id_to_token(self, token_id: int) -> str | None:
        value = self._tok.id_to_token(token_id)
        return None if value is None else str(value)

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The underlying `tokenizers.Tokenizer`."""
        return self._tok

    # -- text <-> ids ------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; `add_special_tokens` runs the post-processor (which adds BOS where the model does).

        Through the batch call: `tokenizers`' single `encode` holds the GIL for all its work, so a
        multi-MB prompt tokenized in a worker thread would still stall every other thread (the server's
        event loop included) for seconds; the batch call releases it. The fast variant skips the
        offsets, which nothing here reads; the ids are the same."""
        batch = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)  # _fast: tokenizers >= 0.20
        return list(batch([text], add_special_tokens=add_special_tokens)[0].ids)

    @cached_property
    def max_chars_per_token(self) -> int:
        """The most characters of text one token can stand for: a text of more than `n` times this
        many characters has more than `n` tokens, which the server checks before tokenizing it.

        The longest entry of the vocabulary (added tokens included) in characters: a byte-level piece has
        one character per byte (and a character is at least one byte), a SentencePiece piece one per
        character, a byte-fallback piece (`<0x41>`) more than the one byte it stands for. A normalizer
        can make a text shorter before it is split (NFC composes up to 3-4 code points into one), so with
        one the bound is 4 times looser."""
        longest = max((len(piece) for piece in self._tok.get_vocab(with_added_tokens=True)), default=1)
        return max(1, longest) * (1 if self._tok.normalizer is None else 4)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids` (incomplete UTF-8 at the end shows as U+FFFD, as in transformers)."""
        return str(self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes `token_id` stands for inside a text: a byte-level token's raw bytes (possibly part
        of a character), a byte-fallback token's one byte, a SentencePiece piece with its leading space
        (which decoding strips at the very start of a text only), an added token's content."""
        cached = self._token_bytes.get(token_id)
        if cached is not None:
            return cached
        piece = self.id_to_token(token_id)
        out: bytes | None = b""
        if token_id in self._added:
            out = self._added[token_id].encode()
        elif piece is not None:
            out = self._piece_bytes(piece)
        if out is None:  # a decoder that is not token by token (WordPiece, ...): decode the token alone
            out = self.decode([token_id], skip_special_tokens=False).encode()
        self._token_bytes[token_id] = out
        return out

    def _piece_bytes(self, piece: str) -> bytes | None:
        if self._decoder_steps is None:
            self._decoder_steps = _decoder_steps(self._tok) or []
        steps = self._decoder_steps
        kinds = {str(d.get("type")) for d in steps}
        if not kinds <= _PIECEWISE_DECODERS:
            return None
        if "ByteLevel" in kinds:
            if all(c in _BYTE_LEVEL for c in piece):
                return bytes(_BYTE_LEVEL[c] for c in piece)
            return piece.encode()
        if "ByteFallback" in kinds and (byte := _BYTE_PIECE.fullmatch(piece)):
            return bytes([int(byte[1], 16)])
        for d in steps:
            pattern = d.get("pattern")
            if d.get("type") == "Replace" and isinstance(pattern, dict) and isinstance(pattern.get("String"), str):
                piece = piece.replace(pattern["String"], str(d.get("content", "")))
            elif d.get("type") == "Metaspace":
                piece = piece.replace(str(d.get("replacement", "\u2581")), " ")
        return piece.encode()

    # -- chat --------------------------------------------------------------------------------------

    @property
    def has_chat_template(self) -> bool:
        """Whether the model ships a chat template (otherwise `apply_chat_template` uses ChatML)."""
        return self.chat_template is not None

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """The prompt text for a conversation, as transformers' `apply_chat_template(tokenize=False)` renders it.

        `kwargs` become template variables (e.g. `tools=[...]`). `ChatTemplateError` (a ValueError) when
        the template rejects the conversation or does not compile.
        """
        from kold.runtime.chat_template import DEFAULT_CHAT_TEMPLATE, render_chat_template

        source = self.chat_template if self.chat_template is not None else DEFAULT_CHAT_TEMPLATE
        return render_chat_template(
            source,
            messages,
            add_generation_prompt=add_generation_prompt,
            special_tokens=self.special_tokens,
            **kwargs,
        )

    def encode_chat(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> list[int]:
        """Prompt ids for a conversation: the rendered template encoded without adding special tokens."""
        return self.encode(
            self.apply_chat_template(messages, add_generation_prompt, **kwargs), add_special_tokens=False
        )

    def incremental_decoder(
        self, *, skip_special_tokens: bool = True, prompt_ids: Sequence[int] = ()
    ) -> IncrementalDecoder:
        return IncrementalDecoder(self, skip_special_tokens=skip_special_tokens, prompt_ids=prompt_ids)


class Decodes(Protocol):
    """What incremental decoding needs from a tokenizer (`Tokenizer`, or a test double)."""

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDecoder:
    """Streaming detokenization: feed generated ids one at a time, get text deltas.

    Each `step` decodes a short window of recent ids twice, with and without the new ones, and returns
    the difference, so multi-token characters and decoders that depend on neighbours (leading-space
    stripping, byte fallback) come out right. A delta is held back while the window's text ends in
    U+FFFD, i.e. while the last bytes are an incomplete UTF-8 sequence, so no delta ever splits a
    character. `flush()` returns whatever is still held (a generation that stopped mid-character).

    Without `prompt_ids`, the deltas (plus `flush()`) concatenate to exactly `decode(all ids)`. With
    them, the last few prompt ids are decoded as left context and never emitted, which gives the text
    as it reads after the prompt (a first token "▁Hello" streams as " Hello" for SentencePiece models).
    """

    def __init__(self, tokenizer: Decodes, *, skip_special_tokens: bool = True, prompt_ids: Sequence[int] = ()) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        context = list(prompt_ids)[-PROMPT_CONTEXT_TOKENS:] if PROMPT_CONTEXT_TOKENS else []
        self._ids: list[int] = context
        self._context = len(context)
        self._prefix = 0  # window start: ids already emitted, kept as left context
        self._read = len(context)  # ids before this are emitted

    @property
    def token_ids(self) -> list[int]:
        """The generated ids fed so far (prompt context excluded)."""
        return self._ids[self._context :]

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)

    def step(self, token_id: int) -> str:
        """Add one generated id; return the new text it completes ("" while a character is incomplete)."""
        self._ids.append(int(token_id))
        return self._emit(final=False)

    def flush(self) -> str:
        """Text still held back at the end of a generation (an incomplete character decodes as U+FFFD)."""
        return self._emit(final=True)

    def _emit(self, *, final: bool) -> str:
        if self._read >= len(self._ids):
            return ""
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        text = self._decode(self._ids[self._prefix :])
        if len(text) > len(prefix_text) and (final or not text.endswith(_REPLACEMENT)):
            delta = text[len(prefix_text) :]
            self._prefix, self._read = self._read, len(self._ids)
            return delta
        if final:  # nothing visible in the held ids (e.g. skipped special tokens)
            self._prefix = self._read = len(self._ids)
        return ""
