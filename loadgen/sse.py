"""Server-sent events, parsed incrementally from the bytes as they arrive.

The client parses SSE itself rather than through a library so that each event is timed by the read
that completed it, and so that a malformed stream is a recorded error rather than an exception deep in
someone else's code. Bytes arrive in arbitrary pieces: a line, even a CRLF, may be split across reads,
so incomplete lines are held until the rest comes.
"""

from __future__ import annotations

from dataclasses import dataclass


class MalformedSSEError(ValueError):
    """The bytes are not a valid event stream (not UTF-8)."""


@dataclass(frozen=True)
class Event:
    """One dispatched event: its `event` field ("message" when absent) and its data lines joined by \\n."""

    event: str
    data: str


class SSEParser:
    """Feed bytes, get the events they complete (the WHATWG event-stream rules: `data`, `event`; `id`,
    `retry` and comment lines are accepted and ignored; an event ends at a blank line)."""

    def __init__(self) -> None:
        self._buffer = b""
        self._data: list[str] = []
        self._event = ""

    def feed(self, chunk: bytes) -> list[Event]:
        """The events completed by `chunk`."""
        buf = self._buffer + chunk if self._buffer else chunk
        events: list[Event] = []
        start = 0
        n = len(buf)
        while start < n:
            lf = buf.find(b"\n", start)
            cr = buf.find(b"\r", start, lf if lf >= 0 else n)
            if cr >= 0:  # a line ends at CR (or CRLF)
                if cr == n - 1:
                    break  # a CR last: wait to see whether LF follows
                end, nxt = cr, cr + 2 if buf[cr + 1 : cr + 2] == b"\n" else cr + 1
            elif lf >= 0:
                end, nxt = lf, lf + 1
            else:
                break
            self._line(buf[start:end], events)
            start = nxt
        self._buffer = buf[start:]
        return events

    def close(self) -> list[Event]:
        """The end of the stream: a last unterminated line counts as a line; an event never ended by a blank
        line is dropped (as the spec says: a cut stream must not yield half an event)."""
        events: list[Event] = []
        if self._buffer:
            rest, self._buffer = self._buffer, b""
            self._line(rest.rstrip(b"\r"), events)
        return events

    @property
    def pending(self) -> bool:
        """Whether part of an event has arrived without its end."""
        return bool(self._buffer or self._data or self._event)

    def _line(self, raw: bytes, events: list[Event]) -> None:
        if not raw:  # a blank line dispatches
            if self._data:
                events.append(Event(self._event or "message", "\n".join(self._data)))
            self._data = []
            self._event = ""
            return
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MalformedSSEError(f"a line is not UTF-8: {raw[:80]!r}") from exc
        if line.startswith(":"):
            return  # a comment (keep-alive)
        name, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        # id, retry and unknown fields are ignored, as the spec says
