"""Slow and oversized clients on raw loopback sockets, for the gateway's and the runtime's limit tests.

httpx cannot play these clients: it never stops halfway through a request head, and it sends a whole
body before it reads an answer. So each helper here speaks HTTP/1.1 by hand, with bounded loops and
deadlines, and only to 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import json
import select
import socket
import time
from dataclasses import dataclass
from typing import Any

HALF_HEAD = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def read_answer(sock: socket.socket, timeout: float) -> Answer:
    """One HTTP/1.1 response with a Content-Length (what both servers send for errors), or AssertionError
    when it has not come within `timeout` seconds."""
    sock.settimeout(timeout)
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            assert chunk, f"the server closed the connection without an answer (got {data!r})"
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(headers.get("content-length", "0"))
        while len(body) < length:
            chunk = sock.recv(65536)
            assert chunk, "the server closed the connection in the middle of its answer"
            body += chunk
    except TimeoutError:
        raise AssertionError(f"no answer within {timeout}s (got {data!r})") from None
    return Answer(int(lines[0].split()[1]), headers, body[:length])


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def head(path: str, extra: str) -> bytes:
    return f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n{extra}\r\n".encode()


def declare_oversized(port: int, path: str, length: int, timeout: float = 10.0) -> Answer:
    """A request head that announces a `length`-byte body, and no body: the answer."""
    with connect(port) as sock:
        sock.sendall(head(path, f"Content-Length: {length}\r\n"))
        return read_answer(sock, timeout)


def stream_chunked(port: int, path: str, *, chunk: int, most: int) -> tuple[Answer, int]:
    """A chunked body that never ends: `chunk` bytes at a time until the server answers, at most
    `most` bytes in all. The answer, and how many body bytes had been sent when it came."""
    piece = b"%x\r\n" % chunk + b" " * chunk + b"\r\n"
    sent = 0
    with connect(port) as sock:
        sock.sendall(head(path, "Transfer-Encoding: chunked\r\n"))
        while sent < most:
            readable, _, _ = select.select([sock], [], [], 0)
            if readable:
                break
            try:
                sock.sendall(piece)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += chunk
        return read_answer(sock, 10.0), sent


def trickle_body(port: int, path: str, *, declared: int, sent: bytes, timeout: float) -> tuple[Answer, bool]:
    """A head that announces `declared` body bytes, then only `sent` of them: the answer, and whether
    the server closed the connection after it (within `timeout` seconds)."""
    with connect(port) as sock:
        sock.sendall(head(path, f"Content-Length: {declared}\r\n") + sent)
        answer = read_answer(sock, timeout)
        sock.settimeout(timeout)
        try:
            closed = sock.recv(1) == b""
        except (TimeoutError, ConnectionResetError) as exc:
            closed = isinstance(exc, ConnectionResetError)
        return answer, closed


@dataclass
class HeldConnections:
    opened: int
    closed_by_server: int  # EOF or reset seen
    answered_408: int  # of those: a 408 came before the close
    seconds: float  # from the last connection opened to the last close seen (or the deadline)


async def hold_half_heads(port: int, count: int, *, deadline_s: float, batch: int = 100) -> HeldConnections:
    """Open `count` connections that each send half a request head and nothing more, and wait (at most
    `deadline_s` after the last one opened) for the server to close them."""
    streams: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        for start in range(0, count, batch):  # in batches: a burst of `count` SYNs would overflow backlogs
            opened = await asyncio.gather(
                *(asyncio.open_connection("127.0.0.1", port) for _ in range(min(batch, count - start)))
            )
            for _, writer in opened:
                writer.write(HALF_HEAD)
            streams.extend(opened)
        last_opened = time.monotonic()

        async def until_closed(reader: asyncio.StreamReader) -> bytes:
            got = b""
            try:
                while chunk := await reader.read(65536):
                    got += chunk
            except ConnectionResetError:
                pass
            return got

        tasks = [asyncio.ensure_future(until_closed(r)) for r, _ in streams]
        done, pending = await asyncio.wait(tasks, timeout=deadline_s)
        seconds = time.monotonic() - last_opened
        for task in pending:
            task.cancel()
        answers = [t.result() for t in done]
        return HeldConnections(
            opened=len(streams),
            closed_by_server=len(done),
            answered_408=sum(a.startswith(b"HTTP/1.1 408") for a in answers),
            seconds=seconds,
        )
    finally:
        for _, writer in streams:
            writer.close()
