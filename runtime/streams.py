"""Async plumbing for streamed responses: merging several generations, and an SSE response that
reports its end however it comes (a finished stream, a client disconnect, a cancelled task)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from kold.runtime.backend import Generation, TokenEvent

K = TypeVar("K")


class EventStream(StreamingResponse):
    """Server-sent events, with a callback when the response ends for any reason."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], None], headers: dict[str, str]) -> None:
        super().__init__(content, headers=headers)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


async def aclose(it: AsyncIterator[bytes]) -> None:
    close = getattr(it, "aclose", None)
    if close is not None:
        await close()


async def merge(sources: list[tuple[K, Generation]]) -> AsyncIterator[tuple[K, TokenEvent]]:
    """The events of several generations as they arrive, tagged with their key (one: iterated directly)."""
    if len(sources) == 1:
        key, gen = sources[0]
        async for event in gen:
            yield key, event
        return
    queue: asyncio.Queue[tuple[K, TokenEvent | None, BaseException | None]] = asyncio.Queue()

    async def pump(key: K, gen: Generation) -> None:
        try:
            async for event in gen:
                await queue.put((key, event, None))
            await queue.put((key, None, None))
        except Exception as exc:
            await queue.put((key, None, exc))

    tasks = [asyncio.ensure_future(pump(key, gen)) for key, gen in sources]
    try:
        remaining = len(sources)
        while remaining:
            key, item, error = await queue.get()
            if error is not None:
                raise error
            if item is None:
                remaining -= 1
                continue
            yield key, item
    finally:
        for t in tasks:
            t.cancel()
