"""Token counts from an answer's `usage`, found without parsing the answer.

Every request's record carries its tokens in and out when the instance said (a non-streamed answer's
`usage`, or a stream's usage chunk, sent when the client asked for `stream_options.include_usage`).
Parsing every answer, or every chunk of a stream, would cost the data path CPU for two integers; the
usage object is at the end of an OpenAI answer, so this looks for the last `"usage"` key in the bytes
given (the whole body, or a stream's last chunks) and parses that small object alone (with its nested
objects, such as `prompt_tokens_details`: `raw_decode` reads one JSON value and stops). Inside a JSON
string a quote is always escaped, so generated text cannot fake the key.
"""

from __future__ import annotations

import json
import re

_KEY = b'"usage"'
_COLON = re.compile(rb"\s*:\s*")
_DECODER = json.JSONDecoder()


def tokens(data: bytes) -> tuple[int | None, int | None]:
    """(prompt_tokens, completion_tokens) of the last `usage` object in `data`; None for what is absent."""
    at = data.rfind(_KEY)
    if at < 0:
        return None, None
    colon = _COLON.match(data, at + len(_KEY))
    if colon is None or data[colon.end() : colon.end() + 1] != b"{":  # "usage": null, or cut off
        return None, None
    try:
        usage, _ = _DECODER.raw_decode(data[colon.end() :].decode("utf-8", "replace"))
    except ValueError:  # cut off
        return None, None
    return _count(usage.get("prompt_tokens")), _count(usage.get("completion_tokens"))


def _count(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


class StreamTail:
    """The last two chunks of a stream (a usage chunk and the `[DONE]` after it may come apart), kept
    by reference: nothing is copied or parsed until the stream is over."""

    __slots__ = ("_last", "_prev")

    def __init__(self) -> None:
        self._prev = b""
        self._last = b""

    def add(self, chunk: bytes) -> None:
        self._prev, self._last = self._last, chunk

    def tokens(self) -> tuple[int | None, int | None]:
        return tokens(self._prev + self._last)
