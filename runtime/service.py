"""The service layer: OpenAI requests in, engine generations out, OpenAI responses (or SSE) back.

Routes (server.py) only parse and hand over; the engine only knows token ids. In between, this
module waits for readiness (bounded, see lifecycle.py), compiles a structured-output constraint
(response_format / guided_*: runtime/structured.py, off the event loop, cached; or the call a
tool_choice forces), renders chat templates (with the request's tools), tokenizes, checks the
context, submits one generation per (prompt, n), merges their token streams, reads tool calls out
of the text (tools.py), turns token log-probabilities into OpenAI's shapes (logprobs.py), and
times them (TTFT, inter-token latency). A client that goes away cancels its generations, which
frees their batch slots. Every request ends in one `request` event line (JSON, on the
`kold.runtime.events` logger) naming its `x-request-id`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from starlette.responses import JSONResponse, Response

from kold.runtime.backend import Backend, EngineStats, Generation, Sampling, TokenEvent
from kold.runtime.chat_template import template_messages
from kold.runtime.httpserver import Disconnected, unless_gone
from kold.runtime.lifecycle import Lifecycle
from kold.runtime.logprobs import ChoiceLogprobs, CompletionOffsets, chat_logprobs
from kold.runtime.metrics import RuntimeMetrics
from kold.runtime.protocol import (
    SSE_DONE,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatResponseMessage,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ConstraintCompileError,
    ContextLengthError,
    DrainingError,
    FunctionCallOut,
    InternalError,
    ModelCard,
    ModelList,
    ModelNotFoundError,
    NotReadyError,
    ToolCallOut,
    Usage,
    error_body,
    new_id,
    now,
    sse,
)
from kold.runtime.streams import EventStream, aclose, merge
from kold.runtime.structured import Constraint, ConstraintError
from kold.runtime.tools import Delta, ToolFamily, ToolRequest, mistral_call_id, output_parser, parse

if TYPE_CHECKING:
    from kold.runtime.demand import Call, DemandReporter
    from kold.runtime.structured import Compiled

events = logging.getLogger("kold.runtime.events")  # one JSON object a line (server.py logs there too)

# -- the service ------------------------------------------------------------------------------------

T = TypeVar("T")

# Prompts up to this many characters are tokenized on the event loop (a millisecond or two: a thread
# hop would cost more than it saves); longer ones in one of TOKENIZE_THREADS threads.
INLINE_TOKENIZE_CHARS = 8192
TOKENIZE_THREADS = 2


@dataclass
class _Choice:
    index: int
    prompt_tokens: int
    gen: Generation
    text: list[str] = field(default_factory=list)
    tokens: int = 0
    finish: str | None = None
    last_event: float = 0.0
    logprobs: ChoiceLogprobs | None = None  # when the request asked for them


@dataclass
class _Job:
    """One HTTP request's generations, with its timing."""

    id: str
    model: str
    received: float
    queue_s: float
    choices: list[_Choice]
    headers: dict[str, str]
    request_id: str = ""  # the HTTP request's x-request-id
    call: Call | None = None  # its demand record's start, when the instance reports demand
    first_token: float | None = None
    closed: bool = False

    n: int = 1  # choices per prompt: choice i answers prompt i // n

    @property
    def prompt_tokens(self) -> int:
        # OpenAI counts each prompt once, not once per choice
        return sum(c.prompt_tokens for c in self.choices if c.index % self.n == 0)

    @property
    def completion_tokens(self) -> int:
        return sum(c.tokens for c in self.choices)

    def usage(self) -> Usage:
        return Usage.of(self.prompt_tokens, self.completion_tokens)


class Service:
    def __init__(
        self,
        lifecycle: Lifecycle,
        metrics: RuntimeMetrics,
        *,
        model_names: Sequence[str],
        on_first_token: Callable[[str], None] | None = None,
        demand: DemandReporter | None = None,
    ) -> None:
        """`on_first_token(request_id)`: called once, on the instance's first generated token. `demand`
        gets each finished request that arrived with a `Call` (runtime/demand.py)."""
        self.lifecycle = lifecycle
        self.demand = demand
        self.metrics = metrics
        self.model_names = list(model_names)  # the first is the one /v1/models lists
        self.backend: Backend | None = None
        self._on_first_token = on_first_token
        self._first_token_seen = False
        self._tokenize_pool: ThreadPoolExecutor | None = None  # made on the first long prompt

    @property
    def served_name(self) -> str:
        return self.model_names[0]

    def pending(self) -> int:
        return self.lifecycle.waiting + (self.backend.pending() if self.backend is not None else 0)

    def engine_stats(self) -> EngineStats | None:
        return self.backend.stats() if self.backend is not None else None

    def models(self) -> ModelList:
        created = int(self.lifecycle.cold_start.process_start)
        max_len = self.backend.max_seq_len if self.backend is not None else None
        return ModelList(
            data=[ModelCard(id=self.served_name, created=created, root=self.served_name, max_model_len=max_len)]
        )

    # -- endpoints --------------------------------------------------------------------------------

    async def _admit(
        self, req: CompletionRequest | ChatCompletionRequest, disconnected: Disconnected
    ) -> tuple[float, tuple[str, ...], float, Backend]:
        """What both endpoints do first: validate, then wait (bounded) for the model to be ready.

        Returns when the request arrived, its stop strings, how long it queued, and the backend."""
        received = time.perf_counter()
        req.check_supported()
        stop = tuple(req.stop_list())
        self._check_model(req.model)
        queue_s = await self._wait_ready(disconnected)
        return received, stop, queue_s, self._backend()

    async def completions(
        self, req: CompletionRequest, disconnected: Disconnected, request_id: str = "", call: Call | None = None
    ) -> Response:
        received, stop, queue_s, backend = await self._admit(req, disconnected)
        constraint, compile_s = await self._compile(req, backend)
        prompts = req.prompts()

        def tokenize() -> list[tuple[list[int], Sampling]]:
            # prompt by prompt: one that cannot fit is refused before the next is tokenized
            out = []
            for p in prompts:
                ids = _encode(backend, p, special=True, param="prompt") if isinstance(p, str) else p
                out.append(
                    (ids, self._sampling(req, req.max_tokens, len(ids), backend, stop, req.logprobs, constraint))
                )
            return out

        size = sum(len(p) for p in prompts if isinstance(p, str))
        jobs = await self._tokenizing(tokenize, size)
        job = self._submit(backend, jobs, req.n, req.model, received, queue_s, "cmpl", request_id, call, compile_s)
        await self._await_weights(job, disconnected)
        echo = [self._echo(backend, p) if req.echo else "" for p in prompts]
        offsets = [CompletionOffsets(len(echo[c.index // req.n]), backend.token_bytes) for c in job.choices]
        if req.stream:
            return self._stream(
                job,
                self._completion_events(
                    job, echo, offsets, bool(req.stream_options and req.stream_options.include_usage)
                ),
                "completions",
            )
        await self._collect(job, disconnected)
        body = CompletionResponse(
            id=job.id,
            created=now(),
            model=job.model,
            choices=[
                CompletionChoice(
                    index=c.index,
                    text=echo[c.index // req.n] + "".join(c.text),
                    logprobs=offsets[c.index].logprobs(c.logprobs.take()) if c.logprobs is not None else None,
                    finish_reason=_finish(c.finish),
                )
                for c in job.choices
            ],
            usage=job.usage(),
        )
        return self._json(job, body.model_dump(), "completions")

    async def chat(
        self, req: ChatCompletionRequest, disconnected: Disconnected, request_id: str = "", call: Call | None = None
    ) -> Response:
        received, stop, queue_s, backend = await self._admit(req, disconnected)
        tools = req.tool_request()
        family = backend.tool_family if req.uses_tools() else None
        forced = (
            Constraint.json_schema(tools.forced_schema(family), strict=tools.strict) if tools and tools.forced else None
        )
        constraint, compile_s = await self._compile(req, backend, forced)
        messages = req.chat_messages()
        if req.uses_tools():  # tool turns in the shape templates read (Mistral's: call ids of 9 characters)
            messages = template_messages(messages, call_id=mistral_call_id if family == "mistral" else None)

        def tokenize() -> tuple[list[int], Sampling]:
            # tools are rendered by the model's own template (`none` too: the model sees them, never calls)
            prompt = backend.chat_prompt(messages, tools.template_tools()) if tools else backend.chat_prompt(messages)
            ids = _encode(backend, prompt, special=False, param="messages")
            limit = req.token_limit()
            return ids, self._sampling(req, limit, len(ids), backend, stop, req.top_logprobs_asked(), constraint)

        chars = sum(len(m.get("content") or "") for m in messages) + len(json.dumps(req.tools or req.functions or []))
        ids, sampling = await self._tokenizing(tokenize, chars)
        job = self._submit(
            backend, [(ids, sampling)], req.n, req.model, received, queue_s, "chatcmpl", request_id, call, compile_s
        )
        await self._await_weights(job, disconnected)
        if req.stream:
            return self._stream(
                job,
                self._chat_events(
                    job, backend, bool(req.stream_options and req.stream_options.include_usage), tools, family
                ),
                "chat",
            )
        await self._collect(job, disconnected)
        choices = []
        for c in job.choices:
            message = _chat_message("".join(c.text), tools, family)
            choices.append(
                ChatChoice(
                    index=c.index,
                    message=message,
                    logprobs=chat_logprobs(c.logprobs.take(), backend.token_bytes) if c.logprobs is not None else None,
                    finish_reason=_chat_finish(
                        c.finish, tools, called=bool(message.tool_calls or message.function_call)
                    ),
                )
            )
        body = ChatCompletionResponse(
            id=job.id,
            created=now(),
            model=job.model,
            choices=choices,
            usage=job.usage(),
        )
        return self._json(job, body.model_dump(), "chat")

    # -- steps ------------------------------------------------------------------------------------

    async def _compile(
        self, req: CompletionRequest | ChatCompletionRequest, backend: Backend, forced: Constraint | None = None
    ) -> tuple[Compiled | None, float | None]:
        """The request's structured-output constraint compiled for the model (in the backend's compile
        thread; cached per constraint), and the seconds it took (0 on a cache hit); (None, None)
        without one. A constraint the library cannot compile is a 400 naming its param and the
        feature. `forced`: the schema of a tool call the request forces (the tools' param)."""
        constraint = forced if forced is not None else req.constraint()
        if constraint is None:
            return None, None
        try:
            return await backend.grammar.compile(constraint)
        except ConstraintError as exc:
            param = "tools" if forced is not None else req.constraint_param()
            raise ConstraintCompileError(f"{param}: {exc}", param=param) from None

    async def _tokenizing(self, work: Callable[[], T], chars: int) -> T:
        """`work` (template, tokenizer, context checks) for a prompt of `chars` characters: on the event loop
        when it is short (a millisecond or two), else in a tokenizer thread, so that the loop goes on
        serving every other request while a long prompt takes seconds. The tokenizer releases the GIL
        while it works (tokenizer.py); the long prompts queue for the threads among themselves, never
        in front of short ones."""
        if chars <= INLINE_TOKENIZE_CHARS:
            return work()
        if self._tokenize_pool is None:
            self._tokenize_pool = ThreadPoolExecutor(TOKENIZE_THREADS, thread_name_prefix="kold-tokenize")
        return await asyncio.get_running_loop().run_in_executor(self._tokenize_pool, work)

    def _check_model(self, name: str) -> None:
        if name not in self.model_names:
            raise ModelNotFoundError(
                f"the model {name!r} does not exist on this server (it serves {self.served_name!r})",
                param="model",
            )

    async def _wait_ready(self, disconnected: Disconnected) -> float:
        """Wait for the model, unless the client leaves first: a request that waits out a restore
        must not keep its place in the bounded wait queue (or run a generation) for nobody."""
        queue_s = 0.0
        if not self.lifecycle.can_serve:
            queue_s = await unless_gone(
                self.lifecycle.wait_ready(),
                disconnected,
                "the client closed the connection while the model was loading",
            )
        self.metrics.queue_wait.observe(queue_s)
        return queue_s

    async def _await_weights(self, job: _Job, disconnected: Disconnected) -> None:
        """A job admitted while the weights were still landing runs at once (its prefill follows the
        restore layer by layer); its response starts once the restore is over, so the first response
        carries the whole cold-start breakdown. Its first token cannot come sooner anyway: the LM
        head lands last. If the restore fails, or the client leaves, the job is cancelled."""
        if self.lifecycle.ready:
            return
        try:
            await unless_gone(
                self.lifecycle.wait_settled(),
                disconnected,
                "the client closed the connection while the model was loading",
            )
        except BaseException:
            self._close(job)
            raise
        job.headers.update(self.lifecycle.take_cold_start_headers())

    def _backend(self) -> Backend:
        if self.backend is None:
            if self.lifecycle.error is not None:  # the restore failed under a request admitted behind it
                raise NotReadyError(
                    f"the model could not be loaded: {self.lifecycle.error}", code=self.lifecycle.error_code or None
                )
            raise InternalError("the instance is ready but has no model")  # ready implies a backend: a bug
        return self.backend

    def _sampling(
        self,
        req: CompletionRequest | ChatCompletionRequest,
        max_tokens: int | None,
        prompt_len: int,
        backend: Backend,
        stop: tuple[str, ...],
        logprobs: int | None,
        constraint: Compiled | None = None,
    ) -> Sampling:
        """The engine's settings for one prompt; `logprobs`: how many alternatives each token's
        log-probabilities carry (None: none); `constraint`: the compiled structured output."""
        limit = backend.max_seq_len
        if prompt_len >= limit:
            raise ContextLengthError(
                f"this model's maximum context length is {limit} tokens, but the prompt has {prompt_len} tokens "
                "(no room is left for a completion)",
                param="messages" if isinstance(req, ChatCompletionRequest) else "prompt",
            )
        if max_tokens is None:
            max_tokens = limit - prompt_len
        elif prompt_len + max_tokens > limit:
            param = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) else "max_tokens"
            raise ContextLengthError(
                f"this model's maximum context length is {limit} tokens, but {prompt_len + max_tokens} were "
                f"requested ({prompt_len} in the prompt, {max_tokens} for the completion)",
                param=param,
            )
        return Sampling(
            max_tokens=max_tokens,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=max(0, req.top_k or 0),
            seed=req.seed,
            stop=stop,
            ignore_eos=req.ignore_eos,
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            logprobs=logprobs,
            constraint=constraint,
        )

    def _submit(
        self,
        backend: Backend,
        prompts: list[tuple[list[int], Sampling]],
        n: int,
        model: str,
        received: float,
        queue_s: float,
        prefix: str,
        request_id: str,
        call: Call | None = None,
        compile_s: float | None = None,
    ) -> _Job:
        """`compile_s`: the seconds the request waited for its grammar (x-kold-grammar-compile-ms)."""
        choices: list[_Choice] = []
        try:
            for ids, sampling in prompts:
                for k in range(n):
                    # n > 1 with a seed: distinct but reproducible samples
                    s = sampling if sampling.seed is None or k == 0 else _with_seed(sampling, sampling.seed + k)
                    index = len(choices)
                    gen = backend.generate(ids, s, request_id=f"{request_id}#{index}" if request_id else "")
                    tracked = ChoiceLogprobs() if s.logprobs is not None else None
                    choices.append(_Choice(index, len(ids), gen, logprobs=tracked))
        except BaseException:
            for c in choices:
                c.gen.cancel()
            raise
        self.metrics.prompt_tokens.inc(sum(len(ids) for ids, _ in prompts))
        headers = {"X-Kold-Queue-Ms": f"{queue_s * 1000:.1f}", **self.lifecycle.take_cold_start_headers()}
        if compile_s is not None:
            headers["X-Kold-Grammar-Compile-Ms"] = f"{compile_s * 1000:.1f}"
        return _Job(new_id(prefix), model, received, queue_s, choices, headers, request_id=request_id, call=call, n=n)

    def _echo(self, backend: Backend, prompt: str | list[int]) -> str:
        return prompt if isinstance(prompt, str) else backend.decode(prompt)

    async def _events(self, job: _Job) -> AsyncIterator[tuple[_Choice, TokenEvent]]:
        """Every choice's token events, merged as they come, timed; cancels what is left on exit."""
        try:
            async for choice, event in merge([(c, c.gen) for c in job.choices]):
                t = time.perf_counter()
                if event.token_id is not None:
                    choice.tokens += 1
                    if choice.logprobs is not None:
                        choice.logprobs.add(event.token_id, event.logprob, event.top_logprobs)
                    if job.first_token is None:
                        job.first_token = t
                        self.metrics.ttft.observe(t - job.received)
                        self._first_token(job.request_id)
                    elif choice.last_event:
                        self.metrics.itl.observe(t - choice.last_event)
                    choice.last_event = t
                if event.text_delta:
                    choice.text.append(event.text_delta)
                if event.finish_reason is not None:
                    choice.finish = event.finish_reason
                    if event.finish_reason == "error":
                        raise InternalError(f"the generation failed: {event.error or 'engine error'}")
                    if event.finish_reason == "cancelled":
                        # the instance's own failure, when it has one (e.g. tier_corrupted), says why
                        raise DrainingError(
                            f"the generation was cancelled: {self.lifecycle.error or event.error or 'engine stopped'}",
                            code=self.lifecycle.error_code or None,
                        )
                yield choice, event
        finally:
            self._close(job)

    def _close(self, job: _Job) -> None:
        """Cancel the job's unfinished generations (a client that left); once, synchronously."""
        if job.closed:
            return
        job.closed = True
        unfinished = [c for c in job.choices if c.finish is None]
        for c in unfinished:
            c.gen.cancel()
        if unfinished:
            self.metrics.cancelled.inc(len(unfinished))
        self.metrics.e2e.observe(time.perf_counter() - job.received)

    def _first_token(self, request_id: str) -> None:
        if not self._first_token_seen:
            self._first_token_seen = True
            self.lifecycle.cold_start.first_token = time.time()
            if self._on_first_token is not None:
                self._on_first_token(request_id)

    async def _collect(self, job: _Job, disconnected: Disconnected) -> None:
        """Run a non-streamed job to the end; a client that disconnects first cancels it (leaving
        `_events` cancels the generations)."""

        async def consume() -> None:
            async for _ in self._events(job):
                pass

        await unless_gone(consume(), disconnected, "the client closed the connection before the completion was done")

    async def _completion_events(
        self, job: _Job, echo: list[str], offsets: list[CompletionOffsets], usage: bool
    ) -> AsyncIterator[bytes]:
        def chunk(choices: list[CompletionChoice]) -> bytes:
            return sse(CompletionResponse(id=job.id, created=created, model=job.model, choices=choices))

        created = now()
        echoed = set()
        async for choice, event in self._events(job):
            text = event.text_delta
            if choice.index not in echoed:
                echoed.add(choice.index)
                text = echo[choice.index // job.n] + text
            if text or event.finish_reason is not None:  # held-back text keeps its tokens' logprobs too
                track = choice.logprobs
                yield chunk(
                    [
                        CompletionChoice(
                            index=choice.index,
                            text=text,
                            logprobs=offsets[choice.index].logprobs(track.take()) if track is not None else None,
                            finish_reason=_finish(event.finish_reason),
                        )
                    ]
                )
        if usage:
            yield sse(CompletionResponse(id=job.id, created=created, model=job.model, choices=[], usage=job.usage()))
        yield SSE_DONE

    async def _chat_events(
        self,
        job: _Job,
        backend: Backend,
        usage: bool,
        tools: ToolRequest | None = None,
        family: ToolFamily | None = None,
    ) -> AsyncIterator[bytes]:
        """The chat stream. With tools read for calls, each choice's text goes through its parser:
        content deltas until a call starts, then `delta.tool_calls` pieces (runtime/tools.py)."""

        def chunk(choice: ChatChunkChoice) -> bytes:
            return sse(ChatCompletionChunk(id=job.id, created=created, model=job.model, choices=[choice]))

        def logprobs(choice: _Choice) -> ChatLogprobs | None:
            """The entries of the tokens since the last chunk (held-back text keeps its tokens')."""
            if choice.logprobs is None:
                return None
            return chat_logprobs(choice.logprobs.take(), backend.token_bytes)

        created = now()
        parsers = {c.index: output_parser(tools, family, eager=True) if tools else None for c in job.choices}
        for c in job.choices:  # the role first, as OpenAI sends it
            yield chunk(ChatChunkChoice(index=c.index, delta=ChatDelta(role="assistant", content="")))
        async for choice, event in self._events(job):
            parser = parsers[choice.index]
            if event.text_delta:
                if parser is None:
                    delta = ChatDelta(content=event.text_delta)
                    yield chunk(ChatChunkChoice(index=choice.index, delta=delta, logprobs=logprobs(choice)))
                else:
                    for piece in parser.feed(event.text_delta):
                        delta = _chat_delta(piece, legacy=bool(tools and tools.legacy))
                        yield chunk(ChatChunkChoice(index=choice.index, delta=delta, logprobs=logprobs(choice)))
            if event.finish_reason is not None:
                for piece in parser.finish() if parser is not None else ():
                    delta = _chat_delta(piece, legacy=bool(tools and tools.legacy))
                    yield chunk(ChatChunkChoice(index=choice.index, delta=delta, logprobs=logprobs(choice)))
                left = logprobs(choice) if choice.logprobs is not None and choice.logprobs.pending else None
                reason = _chat_finish(event.finish_reason, tools, called=bool(parser and parser.calls))
                yield chunk(ChatChunkChoice(index=choice.index, delta=ChatDelta(), logprobs=left, finish_reason=reason))
        if usage:
            yield sse(ChatCompletionChunk(id=job.id, created=created, model=job.model, choices=[], usage=job.usage()))
        yield SSE_DONE

    def _stream(self, job: _Job, events: AsyncIterator[bytes], endpoint: str) -> Response:
        outcome = {"status": "disconnected"}  # until the stream ends on its own

        async def body() -> AsyncIterator[bytes]:
            try:
                async for data in events:
                    yield data
                outcome["status"] = "200"
            except Exception as exc:  # headers are sent: report in the stream, as OpenAI does
                code, payload = error_body(exc)
                outcome["status"] = str(code)
                yield sse(payload.model_dump())
                yield SSE_DONE
            finally:
                await aclose(events)

        def closed() -> None:
            # however the response ended (a disconnect may cancel it anywhere), free the batch slots now
            self._close(job)
            self.finished(endpoint, outcome["status"], job.request_id, job)

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **job.headers}
        return EventStream(body(), closed, headers=headers)

    def _json(self, job: _Job, body: dict[str, Any], endpoint: str) -> Response:
        self.finished(endpoint, "200", job.request_id, job)
        return JSONResponse(body, headers=job.headers)

    def finished(
        self,
        endpoint: str,
        status: str,
        request_id: str,
        job: _Job | None = None,
        *,
        call: Call | None = None,
        error: BaseException | None = None,
    ) -> None:
        """A request is answered (or its client left): count it, log its one `request` line, and queue
        its demand record (`call`, or the job's; `error`: what failed it before it had a job)."""
        self.metrics.requests.labels(endpoint, status).inc()
        call = job.call if job is not None else call
        if call is not None and self.demand is not None:
            tokens = (job.prompt_tokens, job.completion_tokens) if job is not None else (None, None)
            self.demand.finished(call, status, error, *tokens)
        line: dict[str, Any] = {"event": "request", "request_id": request_id, "endpoint": endpoint, "status": status}
        if job is not None:
            done = time.perf_counter()
            line.update(
                prompt_tokens=job.prompt_tokens,
                completion_tokens=job.completion_tokens,
                queue_ms=round(job.queue_s * 1000, 1),
                ttft_ms=round((job.first_token - job.received) * 1000, 1) if job.first_token is not None else None,
                duration_ms=round((done - job.received) * 1000, 1),
            )
        events.info(json.dumps(line), extra={"request_id": request_id})


def _encode(backend: Backend, text: str, *, special: bool, param: str) -> list[int]:
    try:
        return backend.encode(text, special=special)
    except ContextLengthError as exc:  # refused from its length alone: say which field
        exc.param = exc.param or param
        raise


def _finish(reason: str | None) -> Any:
    if reason is None:
        return None
    return "length" if reason == "length" else "stop"


def _chat_message(text: str, tools: ToolRequest | None, family: ToolFamily | None) -> ChatResponseMessage:
    """A whole answer: its text, or what of it is content and the calls it made."""
    if tools is None or not tools.parses:
        return ChatResponseMessage(content=text)
    parsed = parse(text, tools, family)
    if not parsed.calls:
        return ChatResponseMessage(content=parsed.content or "")
    calls = [ToolCallOut(id=c.id, function=FunctionCallOut(name=c.name, arguments=c.arguments)) for c in parsed.calls]
    if tools.legacy:  # the deprecated functions: one call, as message.function_call
        return ChatResponseMessage(content=parsed.content, function_call=calls[0].function)
    return ChatResponseMessage(content=parsed.content, tool_calls=calls)


def _chat_finish(reason: str | None, tools: ToolRequest | None, *, called: bool) -> Any:
    """`tool_calls` (`function_call` for the deprecated functions) when a generation that stopped on its
    own made calls (one cut short by max_tokens says `length`, as OpenAI's does)."""
    finish = _finish(reason)
    if finish != "stop" or tools is None or not called:
        return finish
    return "function_call" if tools.legacy else "tool_calls"


def _chat_delta(piece: Delta, *, legacy: bool) -> ChatDelta:
    if not piece.calls:
        return ChatDelta(content=piece.content)
    if legacy:  # the deprecated functions' delta.function_call: the one call's name, then its arguments
        first = piece.calls[0]
        fields = {"name": first.name} if first.name is not None else {}
        return ChatDelta(function_call={**fields, "arguments": first.arguments})
    return ChatDelta(tool_calls=[c.openai() for c in piece.calls])


def _with_seed(s: Sampling, seed: int) -> Sampling:
    from dataclasses import replace

    return replace(s, seed=seed)
