"""Token log-probabilities in OpenAI's two shapes: chat's `logprobs.content[]` and the completions
endpoint's `logprobs` lists.

The engine reports token ids with their log-probabilities (runtime/sampling.py: the model's raw
distribution, before any sampling setting). Here ids become text: a token's `bytes` are exactly what
it stands for in the output (`Backend.token_bytes`), and its `token` string is those bytes decoded as
UTF-8, with any bytes that are only part of a character (a byte-level tokenizer may split one over
several tokens) written as `\\xNN` escapes, as OpenAI does, so that no token string pretends to hold
a character it does not.

A stream carries each token's entry in the chunk that carries its text, or in the next one: text
held back (part of a character, or maybe the start of a stop string) has its tokens' entries wait
with it, so a client that joins every chunk's entries has every generated token's.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from kold.runtime.protocol import ChatLogprobs, CompletionLogprobs, TokenLogprob, TopLogprob

TokenBytes = Callable[[int], bytes]


@dataclass(frozen=True)
class Entry:
    """One generated token's log-probabilities: its id, its logprob, the most likely (id, logprob)."""

    token_id: int
    logprob: float
    top: Sequence[tuple[int, float]]


def token_text(raw: bytes) -> str:
    """A token's display string: its bytes as UTF-8, partial characters as `\\xNN` escapes."""
    return raw.decode("utf-8", errors="backslashreplace")


@dataclass
class ChoiceLogprobs:
    """One choice's entries: all of them (a whole response), and those not yet sent (a stream)."""

    entries: list[Entry] = field(default_factory=list)
    _sent: int = 0

    def add(self, token_id: int | None, logprob: float | None, top: Sequence[tuple[int, float]]) -> None:
        if token_id is not None and logprob is not None:
            self.entries.append(Entry(token_id, logprob, tuple(top)))

    @property
    def pending(self) -> bool:
        return self._sent < len(self.entries)

    def take(self) -> list[Entry]:
        """The entries added since the last `take` (a stream's next chunk)."""
        out = self.entries[self._sent :]
        self._sent = len(self.entries)
        return out


def chat_logprobs(entries: Sequence[Entry], token_bytes: TokenBytes) -> ChatLogprobs:
    """Chat's shape: `{"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}`."""

    def top(token_id: int, logprob: float) -> TopLogprob:
        raw = token_bytes(token_id)
        return TopLogprob(token=token_text(raw), logprob=logprob, bytes=list(raw))

    content = []
    for e in entries:
        raw = token_bytes(e.token_id)
        content.append(
            TokenLogprob(
                token=token_text(raw),
                logprob=e.logprob,
                bytes=list(raw),
                top_logprobs=[top(t, lp) for t, lp in e.top],
            )
        )
    return ChatLogprobs(content=content)


class CompletionOffsets:
    """The completions shape, built chunk by chunk: it keeps the text offset running across chunks.

    A token's `text_offset` is where it begins in the choice's text, in characters: the echoed prompt,
    then the whole characters of the tokens before it (a token that completes a character split over
    several begins where that character does)."""

    def __init__(self, start: int, token_bytes: TokenBytes) -> None:
        self.offset = start
        self.token_bytes = token_bytes
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def logprobs(self, entries: Sequence[Entry]) -> CompletionLogprobs:
        out = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
        for e in entries:
            raw = self.token_bytes(e.token_id)
            text = token_text(raw)
            # the most likely tokens by their text, and the chosen one (OpenAI: up to logprobs + 1 of them)
            top: dict[str, float] = {}
            for t, lp in e.top:
                top.setdefault(token_text(self.token_bytes(t)), lp)
            top.setdefault(text, e.logprob)
            out.tokens.append(text)
            out.token_logprobs.append(e.logprob)
            out.top_logprobs.append(top)
            out.text_offset.append(self.offset)
            self.offset += len(self._utf8.decode(raw))
        return out
