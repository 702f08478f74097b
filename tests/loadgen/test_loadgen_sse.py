"""The SSE parser: events are the same however the bytes are split, and bad bytes are an error."""

from __future__ import annotations

import pytest

from kold.loadgen.sse import Event, MalformedSSEError, SSEParser

STREAM = (
    b": keep-alive\r\n\r\n"
    b'data: {"a": 1}\r\n\r\n'
    b"event: error\ndata: line one\ndata: line two\nid: 7\nretry: 10\n\n"
    b"data:no-space\r\rdata: [DONE]\n\n"
)
EXPECTED = [Event("message", '{"a": 1}'), Event("error", "line one\nline two"), Event("message", "no-space"),
            Event("message", "[DONE]")]  # fmt: skip


def parse(pieces: list[bytes]) -> list[Event]:
    parser = SSEParser()
    out: list[Event] = []
    for piece in pieces:
        out += parser.feed(piece)
    return out + parser.close()


def test_whole_stream() -> None:
    assert parse([STREAM]) == EXPECTED


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 16])
def test_any_split_gives_the_same_events(size: int) -> None:
    """CRLF split between reads, a CR last in a read, a field name cut in two: all held until complete."""
    assert parse([STREAM[i : i + size] for i in range(0, len(STREAM), size)]) == EXPECTED


def test_every_two_way_split() -> None:
    for cut in range(len(STREAM) + 1):
        assert parse([STREAM[:cut], STREAM[cut:]]) == EXPECTED, cut


def test_an_event_cut_off_is_dropped() -> None:
    parser = SSEParser()
    assert parser.feed(b'data: {"a": 1}\n\ndata: half') == [Event("message", '{"a": 1}')]
    assert parser.pending
    assert parser.close() == []


def test_events_come_as_soon_as_their_blank_line_does() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: x\n") == []
    assert parser.feed(b"\n") == [Event("message", "x")]


def test_bytes_that_are_not_utf8_are_malformed() -> None:
    with pytest.raises(MalformedSSEError, match="not UTF-8"):
        SSEParser().feed(b"data: \xff\xfe\n\n")
