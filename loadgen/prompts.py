"""Prompts of a target token count, so that `--prompt-tokens 512` means 512 tokens to the server.

With the target's tokenizer (`tokenizer.json` of its model, read with the `tokenizers` library) the text is
exact: random common words are encoded, cut back to the last whole word within the count, padded with
words that are one token each, and the result is encoded again to check it. The count is of the text's
own tokens (`add_special_tokens=False`): the server adds its BOS and, on the chat endpoint, its template's
tokens, which is one reason the runner records the server's `usage.prompt_tokens` next to the target.

Without a tokenizer the text is N words drawn from a list of frequent, short English words, and the
approximation is one token per word: the large byte-level BPE vocabularies of today's models (Llama 3,
Qwen2, GPT-4's) hold each of these words, with its leading space, as a single token, so a text of them is
about one token a word (some 5 characters a token, spaces included; ordinary prose, with rarer words and
punctuation, is nearer 4). Small vocabularies split them further. The error against the server's own
count is reported either way.

Each prompt starts with a different random word sequence, so that a server's prefix cache does not turn
a load test into a cache benchmark.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

_WORD_LIST = (
    "the of and to in is was for on that with as it his by at from he she they we you this but not are or "
    "have had one all were when there can an which their said if do will each about how up out them then "
    "many some so these would other into has more her two like him see time could no make than first been "
    "its who now people my made over did down only way find use may water long little very after words "
    "called just where most know get through back much go good new write our me man too any day same right "
    "look think also around another came come work three word must because does part even place well such "
    "here take why help put different away again off went old number great tell men say small every found "
    "still between name should home big give air line set own under read last never us left end along "
    "while might next sound below saw something thought both few those always show large often together "
    "asked house world going want school important until form food keep children feet land side without "
    "boy once animals life enough took sometimes four head above kind began almost live page got earth need "
    "far hand high year mother light country father let night picture being study second eyes soon times "
    "story since white days ever paper hard near better best across during today others however sure means "
    "knew try told young miles sun ways thing whole hear example heard several change answer room sea "
    "against top turned learn point city play toward five using himself usually money table black music "
    "river open early ship green red blue north south east west road short fire cold warm order love"
)
WORDS = tuple(_WORD_LIST.split())


class PromptFactory:
    """Texts of a target token count: exact with a tokenizer, approximate (one word a token) without."""

    def __init__(self, tokenizer_dir: Path | None) -> None:
        self.tokenizer_dir = tokenizer_dir
        self._tokenizer: Any = None
        self._fillers: list[str] = []
        self.exact = tokenizer_dir is not None
        if tokenizer_dir is None:
            self.description = "approximate: one common English word per token"
            return
        path = tokenizer_dir / "tokenizer.json" if tokenizer_dir.is_dir() else tokenizer_dir
        if not path.is_file():
            raise ValueError(f"tokenizer: no tokenizer.json at {path}")
        from tokenizers import Tokenizer

        try:
            self._tokenizer = Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises its own Exception type for any unreadable file
            raise ValueError(f"tokenizer: cannot load {path}: {e}") from None
        # Padding words: one token each after a space, in this vocabulary.
        self._fillers = [w for w in WORDS if self._count(" " + w) == 1]
        self.description = f"exact: tokenizer {path}"

    def _count(self, text: str) -> int:
        return len(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def make(self, tokens: int, rng: random.Random) -> str:
        """A text of `tokens` tokens (exactly, with a tokenizer), its words drawn from `rng`."""
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
            raise ValueError(f"prompt tokens: must be a whole number, 0 or more (got {tokens!r})")
        if tokens == 0:
            return ""
        if self._tokenizer is None:
            return " ".join(rng.choices(WORDS, k=tokens))
        return self._exact(tokens, rng)

    def _exact(self, tokens: int, rng: random.Random) -> str:
        text = " ".join(rng.choices(WORDS, k=tokens))  # every word is at least one token: usually enough
        enc = self._tokenizer.encode(text, add_special_tokens=False)
        while len(enc.ids) < tokens:  # a tokenizer that merges across spaces: add words until there are enough
            text += " " + " ".join(rng.choices(WORDS, k=tokens - len(enc.ids)))
            enc = self._tokenizer.encode(text, add_special_tokens=False)
        # Cut at the last word boundary at or before the end of token `tokens`...
        end = enc.offsets[tokens - 1][1]
        if end < len(text) and text[end] != " ":
            end = max(0, text.rfind(" ", 0, end))
        text = text[:end]
        count = self._count(text)
        while count > tokens:  # a tokenizer whose pieces do not end at spaces: drop whole words
            text = text[: max(0, text.rfind(" "))]
            count = self._count(text)
        # ...then pad with one-token words.
        if count < tokens and self._fillers:
            text += "".join(" " + w for w in rng.choices(self._fillers, k=tokens - count))
            count = self._count(text)
        # A tokenizer none of whose words is one token, or whose padding merged: step one character at a time.
        for _ in range(4 * tokens + 64):
            if count == tokens:
                return text
            text = text + " a" if count < tokens else text[:-1]
            count = self._count(text)
        raise ValueError(f"tokenizer {self.tokenizer_dir}: cannot build a text of exactly {tokens} tokens")
