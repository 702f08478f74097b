"""`Engine`: continuous batching of generation requests over one model and one KV cache.

A scheduler thread loops: drop cancelled sequences (freeing their slots), admit waiting requests
while slots are free (each prefilled on its own and given its first token), then ONE batched decode
step for every running sequence (each row at its own position, in its own cache slot). Requests join
and leave between steps, so a long generation never holds up a short one, and at most `max_batch`
sequences run (the rest wait in the engine's FIFO queue).

Requests are submitted from the asyncio event loop (the HTTP server); their events are handed back
to that loop with `loop.call_soon_threadsafe`, so the scheduler never blocks on a slow client and
the loop never blocks on the model. Without a running loop (scripts, tests) a handle is iterated
synchronously instead.

Text: each generated token is detokenized incrementally (a window of recent ids, so a multi-byte
character or a SentencePiece leading space split over tokens is streamed only once whole), stop
strings are searched in the accumulated text, and text that could be the start of a stop string is
held back until it is known not to be one: the returned text always ends before the stop string.

Structured outputs (runtime/structured.py): a request whose `SamplingParams.constraint` is set gets
its own matcher when admitted. Before each of its samples (prefill and decode alike) the matcher's
bitmask masks the row's logits, so greedy, temperature, top-k/top-p and the reported log-probabilities
all see the allowed tokens only; the sampled token then advances the matcher. End-of-sequence is
allowed only where the grammar may end (and always ends a constrained sequence, `ignore_eos` or not),
and the sequence finishes with "stop" as soon as its matcher has terminated. Other rows of the batch
are not touched: a free request decodes exactly the tokens it would without constrained neighbours.
A constrained output cut by `max_tokens` or the context ends with "length", its text an unfinished
prefix of the grammar (as OpenAI reports a truncated structured output). The matcher is dropped with
the sequence (finished, cancelled or failed).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Protocol

import torch

from kold.runtime.config import ModelConfig, context_length
from kold.runtime.kvcache import KVCache
from kold.runtime.model import LlamaForCausalLM, build_model, resolve_device
from kold.runtime.sampling import (
    SamplingParams,
    TokenLogprobs,
    apply_token_bitmask,
    find_stop,
    holdback,
    make_generator,
    sample_batch,
    token_logprobs,
)
from kold.runtime.structured import Matcher, fill_bitmask, mask_words
from kold.runtime.tokenizer import IncrementalDecoder

if TYPE_CHECKING:
    from kold.snapshot.restorer import RestoredSnapshot

log = logging.getLogger(__name__)


class TokenizerLike(Protocol):
    """What the engine needs from a tokenizer (runtime/tokenizer.py's `Tokenizer` provides it)."""

    @property
    def eos_token_ids(self) -> Sequence[int]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


class InvalidRequestError(ValueError):
    """A request the engine can never run (the HTTP layer answers 400)."""


class PromptTooLongError(InvalidRequestError):
    """The prompt does not fit the context (max_seq_len) with room for one generated token."""


class EngineStoppedError(RuntimeError):
    """`submit` after `stop` (the HTTP layer answers 503: the instance is draining)."""


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = ""  # "" -> the engine numbers it


@dataclass(frozen=True)
class TokenEvent:
    """One generated token. `text_delta` is what to append to the text so far (may be empty while
    text is held back). The last event of a request has `finish_reason`: "stop" (an end-of-sequence
    id, a stop token id or a stop string), "length" (max_tokens or the context), "cancelled" (by
    the client, or by an engine stop past its drain timeout: then `error` says so) or "error".
    `token_id` is None on events that carry no token (cancelled, error). When the request asked for
    log-probabilities (`SamplingParams.logprobs`), `logprob` is the token's and `top_logprobs` the
    most likely tokens at its position, as (id, logprob), most likely first."""

    token_id: int | None
    text_delta: str
    finish_reason: str | None = None
    error: str | None = None
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class GenerationResult:
    """A whole generation, for non-streaming callers (`await handle.result()`)."""

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    error: str | None = None

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


class RequestHandle:
    """The caller's side of one request: iterate its events (`async for`, or `for` without a loop)."""

    def __init__(
        self, request_id: str, prompt_tokens: int, loop: asyncio.AbstractEventLoop | None, wake: threading.Condition
    ) -> None:
        self.request_id = request_id
        self.prompt_tokens = prompt_tokens
        self.submitted_at = time.monotonic()
        self._loop = loop
        self._async_queue: asyncio.Queue[TokenEvent] | None = asyncio.Queue() if loop is not None else None
        self._sync_queue: queue.SimpleQueue[TokenEvent] = queue.SimpleQueue()
        self._wake = wake
        self._cancelled = threading.Event()
        self._done = False  # consumer side: the finishing event was read

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """Stop generating (a client disconnect); the slot is freed at the scheduler's next step."""
        self._cancelled.set()
        with self._wake:
            self._wake.notify_all()

    def _deliver(self, event: TokenEvent) -> None:
        """Called on the scheduler thread."""
        if self._loop is None or self._async_queue is None:
            self._sync_queue.put(event)
            return
        try:
            self._loop.call_soon_threadsafe(self._async_queue.put_nowait, event)
        except RuntimeError:  # the loop is closed: nobody will read this request any more
            self._cancelled.set()

    def __aiter__(self) -> AsyncIterator[TokenEvent]:
        return self

    async def __anext__(self) -> TokenEvent:
        if self._done:
            raise StopAsyncIteration
        if self._async_queue is None:
            raise RuntimeError("this request was submitted outside an event loop: iterate it with `for`")
        event = await self._async_queue.get()
        self._done = event.finish_reason is not None
        return event

    def __iter__(self) -> Iterator[TokenEvent]:
        if self._loop is not None:
            raise RuntimeError("this request was submitted from an event loop: iterate it with `async for`")
        while not self._done:
            event = self._sync_queue.get()
            self._done = event.finish_reason is not None
            yield event

    async def result(self) -> GenerationResult:
        """Consume every event and return the whole generation."""
        events = [e async for e in self]
        return self._combine(events)

    def result_sync(self) -> GenerationResult:
        return self._combine(list(self))

    def _combine(self, events: list[TokenEvent]) -> GenerationResult:
        last = events[-1]
        return GenerationResult(
            text="".join(e.text_delta for e in events),
            token_ids=[e.token_id for e in events if e.token_id is not None],
            finish_reason=last.finish_reason or "error",
            prompt_tokens=self.prompt_tokens,
            error=last.error,
        )


class _Sequence:
    """A request once admitted: its slot, its tokens and its text (scheduler thread only)."""

    def __init__(self, engine: Engine, request: GenerationRequest, handle: RequestHandle, slot: int) -> None:
        self.request = request
        self.params = request.params
        self.handle = handle
        self.slot = slot
        self.prompt_len = len(request.prompt_ids)
        self.generated: list[int] = []
        self.generator = None if self.params.greedy else make_generator(self.params.seed, engine.device)
        # the last prompt ids are the decoder's left context, so the first token streams as it reads mid-text
        self.detok = IncrementalDecoder(engine.tokenizer, prompt_ids=request.prompt_ids)
        self.text = ""  # detokenized so far, cut at a stop string
        self.emitted = 0  # characters of self.text already delivered
        constraint = self.params.constraint
        self.matcher: Matcher | None = None
        if constraint is not None:
            if constraint.vocab_size != engine.config.vocab_size:
                raise ValueError(
                    f"the constraint was compiled for {constraint.vocab_size} token ids, the model has "
                    f"{engine.config.vocab_size}"
                )
            self.matcher = constraint.matcher()
        self.stop_ids: frozenset[int] = frozenset(self.params.stop_token_ids) | (
            frozenset() if self.params.ignore_eos and self.matcher is None else engine.eos_token_ids
        )

    @property
    def next_position(self) -> int:
        """Where the last generated token goes in the cache when fed back."""
        return self.prompt_len + len(self.generated) - 1

    def accept(self, token: int, max_seq_len: int) -> TokenEvent:
        """Record a sampled token and make its event (finishing the request when it is done)."""
        self.generated.append(token)
        stops = self.params.stop
        finish: str | None = None
        if token in self.stop_ids:  # the end-of-sequence token itself is never text
            finish, new = "stop", self.detok.flush()
        else:
            if self.matcher is not None and not self.matcher.advance(token):
                error = self.matcher.error or f"token {token} is not allowed here"
                return self.finish(token, "error", f"the grammar refused a sampled token: {error}")
            new = self.detok.step(token)
            if self.matcher is not None and self.matcher.done:
                finish, new = "stop", new + self.detok.flush()
            elif len(self.generated) >= self.params.max_tokens or self.prompt_len + len(self.generated) >= max_seq_len:
                finish, new = "length", new + self.detok.flush()
        if new:
            # a stop string may straddle the old text and the new: search from where it could start
            start = max(0, len(self.text) - max((len(s) for s in stops), default=1) + 1)
            self.text += new
            cut = find_stop(self.text, stops, start) if stops else None
            if cut is not None:
                self.text, finish = self.text[:cut], "stop"
        if finish is not None:
            return self.finish(token, finish)
        safe = len(self.text) - holdback(self.text, stops) if stops else len(self.text)
        delta = self.text[self.emitted : safe]
        self.emitted = max(self.emitted, safe)
        return TokenEvent(token, delta)

    def finish(self, token: int | None, reason: str, error: str | None = None) -> TokenEvent:
        """The last event: whatever text was held back, unless the request is abandoned."""
        delta = self.text[self.emitted :] if reason in ("stop", "length") else ""
        self.emitted = len(self.text)
        return TokenEvent(token, delta, reason, error)


class Engine:
    """Owns the model, the tokenizer and the KV cache; see the module docstring."""

    def __init__(
        self,
        model: LlamaForCausalLM,
        tokenizer: TokenizerLike,
        config: ModelConfig | None = None,
        *,
        max_batch: int = 8,
        max_seq_len: int | None = None,
        device: torch.device | str | None = None,
        cache: KVCache | None = None,
    ) -> None:
        """`cache`: a KV cache allocated ahead (a cold start allocates it while the restore runs); it must
        have `max_batch` slots of `max_seq_len` positions in the model's dtype, on its device."""
        self.model = model
        self.tokenizer = tokenizer
        self.config = config or model.config
        self.device = resolve_device(device) if device is not None else model.device
        if self.device != model.device:
            raise ValueError(f"the model is on {model.device}, not on {self.device}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.max_batch = max_batch
        self.max_seq_len = context_length(self.config, max_seq_len)
        self.eos_token_ids = frozenset(tokenizer.eos_token_ids) | frozenset(self.config.eos_token_ids)
        if cache is None:
            cache = KVCache(self.config, max_batch, self.max_seq_len, model.dtype, self.device)
        elif (cache.num_slots, cache.max_seq_len, cache.dtype, cache.device) != (
            max_batch,
            self.max_seq_len,
            model.dtype,
            self.device,
        ):
            raise ValueError(
                f"the KV cache ({cache.num_slots} slots x {cache.max_seq_len}, {cache.dtype}, {cache.device}) does "
                f"not fit this engine ({max_batch} x {self.max_seq_len}, {model.dtype}, {self.device})"
            )
        self.cache = cache

        self._cond = threading.Condition()
        self._waiting: deque[tuple[GenerationRequest, RequestHandle]] = deque()
        self._running: list[_Sequence] = []
        self._unfinished = 0  # submitted and not yet given their last event (waiting, being prefilled or running)
        self._accepting = True
        self._abort = False
        self._thread: threading.Thread | None = None
        self._ids = itertools.count(1)
        self._bitmask: torch.Tensor | None = None  # constrained rows' masks, [max_batch, words] int32 on the CPU
        self.tokens_generated = 0  # totals for metrics; written by the scheduler thread only
        self.prompt_tokens_processed = 0

    @classmethod
    def from_snapshot(
        cls,
        snapshot: RestoredSnapshot,
        tokenizer: TokenizerLike,
        *,
        max_batch: int = 8,
        max_seq_len: int | None = None,
        compute_dtype: torch.dtype | None = None,
    ) -> Engine:
        """An engine over a restored snapshot, on the device it was restored to (not started)."""
        model = build_model(snapshot, compute_dtype=compute_dtype)
        return cls(model, tokenizer, model.config, max_batch=max_batch, max_seq_len=max_seq_len)

    # -- caller side -------------------------------------------------------------------------------

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="kold-engine", daemon=True)
            self._thread.start()

    def submit(self, request: GenerationRequest) -> RequestHandle:
        """Queue a request; its events go to the running event loop (if any) of the caller."""
        ids = request.prompt_ids
        if not ids:
            raise InvalidRequestError("the prompt is empty")
        if len(ids) >= self.max_seq_len:
            raise PromptTooLongError(
                f"the prompt has {len(ids)} tokens but this model's context is {self.max_seq_len} "
                "(including at least one generated token)"
            )
        vocab = self.config.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise InvalidRequestError(f"prompt token ids must be in [0, {vocab})")
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        request_id = request.request_id or f"req-{next(self._ids)}"
        handle = RequestHandle(request_id, len(ids), loop, self._cond)
        with self._cond:
            if not self._accepting:
                raise EngineStoppedError("the engine is stopping and accepts no new requests")
            self._waiting.append((request, handle))
            self._unfinished += 1
            self._cond.notify_all()
        return handle

    def stop(self, drain_timeout: float = 30.0) -> bool:
        """Refuse new requests, let queued and running ones finish for up to `drain_timeout`
        seconds, then cancel what is left and join the scheduler. True if everything finished."""
        deadline = time.monotonic() + drain_timeout
        with self._cond:
            self._accepting = False
            self._cond.notify_all()
            while self._unfinished and self._thread is not None and self._thread.is_alive():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            drained = not self._unfinished
            self._abort = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
        else:
            self._abort_all()
        return drained

    # -- scheduler thread --------------------------------------------------------------------------

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not (self._waiting or self._running or self._abort):
                        self._cond.wait()
                    if self._abort:
                        break
                try:
                    self._step()
                except Exception as exc:  # a scheduler bug: fail what runs, keep serving
                    log.exception("engine step failed")
                    for seq in list(self._running):
                        self._release(seq, seq.finish(None, "error", f"{type(exc).__name__}: {exc}"))
        self._abort_all()

    def _step(self) -> None:
        self._drop_cancelled()
        self._admit()
        if self._running:
            self._decode()

    def _admit(self) -> None:
        while len(self._running) < self.max_batch:
            with self._cond:
                if not self._waiting:
                    return
                request, handle = self._waiting.popleft()
            if handle.cancelled:
                self._last_event(handle, TokenEvent(None, "", "cancelled"))
                continue
            slot = self.cache.allocate()
            try:
                seq = _Sequence(self, request, handle, slot)
                token, logprobs = self._prefill(seq)
            except Exception as exc:  # one bad request must not take the engine down
                log.exception("prefill of %s failed", handle.request_id)
                self.cache.free(slot)
                self._last_event(handle, TokenEvent(None, "", "error", f"{type(exc).__name__}: {exc}"))
                continue
            self._running.append(seq)
            self._emit(seq, seq.accept(token, self.max_seq_len), logprobs)

    def _prefill(self, seq: _Sequence) -> tuple[int, TokenLogprobs | None]:
        n = seq.prompt_len
        ids = torch.tensor([seq.request.prompt_ids], dtype=torch.long, device=self.device)
        positions = torch.arange(n, device=self.device)[None]
        slots = torch.tensor([seq.slot], dtype=torch.long, device=self.device)
        logits = self.model(ids, positions, self.cache, slots, kv_len=n, last_only=True)
        self.prompt_tokens_processed += n
        last = self._constrain(logits[:, -1].float(), [seq])
        token = sample_batch(last, [seq.params], [seq.generator], [seq.generated])[0]
        return token, token_logprobs(last, [token], [seq.params.logprobs])[0]

    def _decode(self) -> None:
        rows = self._running
        ids = torch.tensor([[s.generated[-1]] for s in rows], dtype=torch.long, device=self.device)
        pos = [s.next_position for s in rows]
        positions = torch.tensor(pos, dtype=torch.long, device=self.device)[:, None]
        slots = torch.tensor([s.slot for s in rows], dtype=torch.long, device=self.device)
        try:
            logits = self.model(ids, positions, self.cache, slots, kv_len=max(pos) + 1, last_only=True)
            last = self._constrain(logits[:, -1].float(), rows)
            params = [s.params for s in rows]
            tokens = sample_batch(last, params, [s.generator for s in rows], [s.generated for s in rows])
            logprobs = token_logprobs(last, tokens, [p.logprobs for p in params])
        except Exception as exc:
            log.exception("decode step for %d sequences failed", len(rows))
            for seq in list(rows):
                self._release(seq, seq.finish(None, "error", f"{type(exc).__name__}: {exc}"))
            return
        for seq, token, lp in zip(list(rows), tokens, logprobs, strict=True):
            self._emit(seq, seq.accept(token, self.max_seq_len), lp)

    def _constrain(self, logits: torch.Tensor, rows: Sequence[_Sequence]) -> torch.Tensor:
        """`logits [B, V]` with each constrained row masked to what its grammar allows (the others
        untouched). The masks are computed on the CPU while a GPU still runs the forward."""
        constrained = [i for i, s in enumerate(rows) if s.matcher is not None]
        if not constrained:
            return logits
        if self._bitmask is None:
            self._bitmask = torch.zeros((self.max_batch, mask_words(self.config.vocab_size)), dtype=torch.int32)
        matchers = [m for m in (rows[i].matcher for i in constrained) if m is not None]
        fill_bitmask(matchers, self._bitmask)
        for j, m in enumerate(matchers):
            if m.error is not None:  # e.g. a grammar past the library's limits: its row fails alone, at accept
                self._bitmask[j] = -1
        return apply_token_bitmask(logits, self._bitmask, constrained)

    def _emit(self, seq: _Sequence, event: TokenEvent, logprobs: TokenLogprobs | None = None) -> None:
        if logprobs is not None:
            event = replace(event, logprob=logprobs.logprob, top_logprobs=logprobs.top)
        self.tokens_generated += event.token_id is not None
        if event.finish_reason is not None:
            self._release(seq, event)
        else:
            seq.handle._deliver(event)

    def _release(self, seq: _Sequence, event: TokenEvent) -> None:
        if seq in self._running:
            self._running.remove(seq)
        seq.matcher = None  # its grammar state goes with the sequence
        self.cache.free(seq.slot)
        self._last_event(seq.handle, event)

    def _last_event(self, handle: RequestHandle, event: TokenEvent) -> None:
        handle._deliver(event)
        with self._cond:
            self._unfinished -= 1
            self._cond.notify_all()  # stop() waits for every request to finish

    def _drop_cancelled(self) -> None:
        for seq in [s for s in self._running if s.handle.cancelled]:
            self._release(seq, seq.finish(None, "cancelled"))

    def _abort_all(self) -> None:
        """Engine stop past its drain timeout: every request still here ends as cancelled."""
        for seq in list(self._running):
            self._release(seq, seq.finish(None, "cancelled", "the engine stopped"))
        with self._cond:
            waiting, self._waiting = list(self._waiting), deque()
        for _, handle in waiting:
            self._last_event(handle, TokenEvent(None, "", "cancelled", "the engine stopped"))
