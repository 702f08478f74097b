"""`/v1/embeddings`: mean pooling over the served model's last hidden state, L2-normalised.

What an embedding is here: the input's tokens are run through the decoder (no KV cache, no LM head)
and the final norm's outputs are averaged over the input's tokens, then scaled to unit length, in
float32. A causal LM was not trained for this (it is no retrieval model); what it gives is a
deterministic vector that retrievers can call, not one whose cosine similarities mean much.

Which tokens: a text is tokenized as `/v1/completions` tokenizes a prompt (with the tokenizer's
special tokens, e.g. the BOS a Llama puts first); token ids are taken as they are. All of them run
through the model; every one is pooled except a leading BOS when more follow (its state is the same
for every input, so it would only pull all embeddings towards one vector).

Running beside the engine: the engine's scheduler thread owns the KV cache and runs the decode
steps; embeddings read the weights only (`LlamaForCausalLM.final_hidden_states`), in one worker
thread of their own, so they never touch the engine's state or hold up its steps (they share the
cores). One forward at a time, of at most `EmbeddingLimits.batch_tokens` tokens (padding
included), bounds their compute and memory beside the engine's; a request's batches queue behind
other requests' between forwards, and a client that leaves stops its request at the next batch.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from kold.runtime.backend import EngineBackend
from kold.runtime.httpserver import Disconnected, unless_gone
from kold.runtime.protocol import (
    ContextLengthError,
    DrainingError,
    InternalError,
    InvalidRequestError,
    ModelNotFoundError,
)

if TYPE_CHECKING:
    import torch

    from kold.runtime.backend import Backend
    from kold.runtime.demand import Call
    from kold.runtime.model import LlamaForCausalLM
    from kold.runtime.service import Service

events = logging.getLogger("kold.runtime.events")

ENDPOINT = "embeddings"
# Texts up to this many characters in all are tokenized on the event loop; more in a thread.
INLINE_TOKENIZE_CHARS = 8192


@dataclass(frozen=True)
class EmbeddingLimits:
    """What one request may ask for (OpenAI's own limits: 2048 inputs, 300k tokens in all; each input
    at most the model's context), and how much one forward computes."""

    max_inputs: int = 2048
    max_request_tokens: int = 300_000
    batch_tokens: int = 8192  # padded tokens a forward; at least one whole input (up to the context)
    batch_rows: int = 64


# -- the request ----------------------------------------------------------------------------------


class EmbeddingRequest(BaseModel):
    """OpenAI's embeddings request, validated strictly as protocol.py's requests are."""

    model_config = ConfigDict(extra="ignore", strict=True)

    input: str | list[str] | list[int] | list[list[int]]
    model: str
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Field(ge=1)] | None = None
    user: str | None = None  # ignored, as the other endpoints ignore it

    def inputs(self) -> list[str | list[int]]:
        """The input as a list of texts or token id lists; empty ones are refused."""
        given = self.input
        if isinstance(given, str):
            items: list[str | list[int]] = [given]
        elif not given:
            raise InvalidRequestError("input must not be empty", param="input")
        elif isinstance(given[0], int):
            items = [[t for t in given if isinstance(t, int)]]
        else:
            items = [x for x in given if isinstance(x, str | list)]
        for i, item in enumerate(items):
            if not item:
                where = "input" if isinstance(given, str) or isinstance(given[0], int) else f"input[{i}]"
                raise InvalidRequestError(f"{where} must not be empty", param="input")
        return items


@dataclass(frozen=True)
class Tokenized:
    """The inputs as token ids, and where each one's pooled tokens begin (1 past a leading BOS)."""

    ids: list[list[int]]
    starts: list[int]

    @property
    def tokens(self) -> int:
        return sum(len(x) for x in self.ids)


def tokenize(
    items: list[str | list[int]], backend: EngineBackend, limits: EmbeddingLimits, max_seq_len: int
) -> Tokenized:
    """Token ids of every input, refusing (400) what cannot run: an input longer than the context,
    ids outside the vocabulary, a text with no tokens, a request over its token budget."""
    if len(items) > limits.max_inputs:
        raise InvalidRequestError(
            f"input has {len(items)} items; at most {limits.max_inputs} are allowed in one request", param="input"
        )
    vocab = backend.engine.config.vocab_size
    bos = backend.tokenizer.bos_token_id
    ids: list[list[int]] = []
    starts: list[int] = []
    total = 0
    for i, item in enumerate(items):
        where = f"input[{i}]" if len(items) > 1 else "input"
        if isinstance(item, str):
            try:
                tokens = backend.encode(item, special=True)
            except ContextLengthError as exc:  # refused from its length alone
                raise ContextLengthError(f"{where}: {exc.message}", param="input") from None
            if not tokens:
                raise InvalidRequestError(f"{where} has no tokens", param="input")
        else:
            if any(not 0 <= t < vocab for t in item):
                raise InvalidRequestError(f"{where}: token ids must be in [0, {vocab})", param="input")
            tokens = item
        if len(tokens) > max_seq_len:
            raise ContextLengthError(
                f"this model's maximum context length is {max_seq_len} tokens, but {where} has {len(tokens)} tokens",
                param="input",
            )
        total += len(tokens)
        if total > limits.max_request_tokens:
            raise InvalidRequestError(
                f"the request's inputs have more than {limits.max_request_tokens} tokens in all "
                "(split them over several requests)",
                param="input",
            )
        ids.append(tokens)
        starts.append(1 if len(tokens) > 1 and tokens[0] == bos else 0)
    return Tokenized(ids, starts)


def batches(lengths: list[int], max_tokens: int, max_rows: int) -> list[list[int]]:
    """Indices of the inputs grouped into forwards: longest first (so that rows padded to the longest
    of their batch waste little), each batch at most `max_tokens` padded tokens and `max_rows` rows,
    and at least one input whatever its length."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    out: list[list[int]] = []
    for i in order:
        if out and len(out[-1]) < max_rows and (len(out[-1]) + 1) * lengths[out[-1][0]] <= max_tokens:
            out[-1].append(i)
        else:
            out.append([i])
    return out


# -- the computation (the worker thread) --------------------------------------------------------------


def pooled(model: LlamaForCausalLM, ids: list[list[int]], starts: list[int]) -> torch.Tensor:
    """Unit-length mean-pooled final hidden states `[len(ids), hidden]` (float32, on the CPU) of one
    batch: rows right-padded to the longest (causal attention: padding only follows a row's tokens)."""
    import torch

    device = model.device
    width = max(len(x) for x in ids)
    padded = torch.tensor([x + [0] * (width - len(x)) for x in ids], dtype=torch.long)
    positions = torch.arange(width)
    lengths = torch.tensor([len(x) for x in ids])
    first = torch.tensor(starts)
    keep = (positions >= first[:, None]) & (positions < lengths[:, None])
    with torch.inference_mode():
        hidden = model.final_hidden_states(padded.to(device)).float()
        weights = keep.to(device=device, dtype=torch.float32)[:, :, None]
        mean = (hidden * weights).sum(dim=1) / weights.sum(dim=1)
        unit = torch.nn.functional.normalize(mean, dim=-1)
        return unit.cpu()


class Embedder:
    """One model's embeddings, computed in one worker thread of their own (the module docstring)."""

    def __init__(self, model: LlamaForCausalLM) -> None:
        self.model = model
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="kold-embed")

    def _forward(self, ids: list[list[int]], starts: list[int]) -> torch.Tensor:
        device = self.model.device
        if device.type == "cuda":  # kernels on the model's GPU, whichever is this thread's current one
            import torch

            with torch.cuda.device(device):
                return pooled(self.model, ids, starts)
        return pooled(self.model, ids, starts)

    async def embed(self, tokenized: Tokenized, limits: EmbeddingLimits) -> torch.Tensor:
        """Every input's vector `[n, hidden]`, in the inputs' order, batch by batch in the worker."""
        import torch

        loop = asyncio.get_running_loop()
        lengths = [len(x) for x in tokenized.ids]
        out = torch.empty(len(lengths), self.model.config.hidden_size, dtype=torch.float32)
        for batch in batches(lengths, limits.batch_tokens, limits.batch_rows):
            ids = [tokenized.ids[i] for i in batch]
            starts = [tokenized.starts[i] for i in batch]
            out[batch] = await loop.run_in_executor(self._worker, self._forward, ids, starts)
        return out

    def close(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)


def response_body(vectors: torch.Tensor, encoding: str, model: str, tokens: int) -> bytes:
    """OpenAI's embeddings response; base64 is each vector's little-endian float32 bytes."""
    array = vectors.numpy().astype("<f4", copy=False)
    data: list[Any]
    if encoding == "base64":
        data = [base64.b64encode(row.tobytes()).decode("ascii") for row in array]
    else:
        data = array.tolist()
    body = {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(data)],
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
    return json.dumps(body, separators=(",", ":")).encode()


# -- the endpoint -----------------------------------------------------------------------------------


class Embeddings:
    """The endpoint over the service's backend: validate, wait for the weights, tokenize, embed, answer;
    counted, logged (one `request` line) and reported (demand) as the other endpoints are."""

    def __init__(self, service: Service, limits: EmbeddingLimits | None = None) -> None:
        self.service = service
        self.limits = limits or EmbeddingLimits()
        self._embedder: tuple[EngineBackend, Embedder] | None = None

    async def create(
        self, req: EmbeddingRequest, disconnected: Disconnected, request_id: str = "", call: Call | None = None
    ) -> Response:
        received = time.perf_counter()
        service, lifecycle = self.service, self.service.lifecycle
        if req.model not in service.model_names:
            raise ModelNotFoundError(
                f"the model {req.model!r} does not exist on this server (it serves {service.served_name!r})",
                param="model",
            )
        items = req.inputs()
        queue_s = 0.0
        if not lifecycle.ready:  # the whole restore: embeddings never run behind it
            queue_s = await unless_gone(
                self._ready(), disconnected, "the client closed the connection while the model was loading"
            )
        service.metrics.queue_wait.observe(queue_s)
        backend = self._backend(service.backend)
        hidden = backend.engine.config.hidden_size
        if req.dimensions is not None and req.dimensions != hidden:
            raise InvalidRequestError(
                f"dimensions must be this model's hidden size, {hidden} (its embeddings are not trained to be "
                "truncated)",
                param="dimensions",
            )
        max_seq_len = backend.max_seq_len
        chars = sum(len(x) for x in items if isinstance(x, str))

        def work() -> Tokenized:
            return tokenize(items, backend, self.limits, max_seq_len)

        tokenized = work() if chars <= INLINE_TOKENIZE_CHARS else await asyncio.to_thread(work)
        embedder = self._embedder_for(backend)
        vectors = await unless_gone(
            embedder.embed(tokenized, self.limits),
            disconnected,
            "the client closed the connection before its embeddings were done",
        )
        if lifecycle.error is not None:  # the weights were found corrupt meanwhile: the vectors are not sent
            raise DrainingError(f"the instance stopped serving: {lifecycle.error}", code=lifecycle.error_code)
        if not bool(vectors.isfinite().all()):  # JSON has no NaN: a model that overflows is our failure
            raise InternalError("the model's hidden state is not finite for this input")
        body = await asyncio.to_thread(response_body, vectors, req.encoding_format, req.model, tokenized.tokens)
        headers = {"X-Kold-Queue-Ms": f"{queue_s * 1000:.1f}", **lifecycle.take_cold_start_headers()}
        self._finished(request_id, call, tokenized, queue_s, received)
        return Response(body, media_type="application/json", headers=headers)

    async def _ready(self) -> float:
        lifecycle = self.service.lifecycle
        started = time.perf_counter()
        await lifecycle.wait_ready()
        await lifecycle.wait_settled()
        return time.perf_counter() - started

    def _backend(self, backend: Backend | None) -> EngineBackend:
        if backend is None:
            raise InternalError("the instance is ready but has no model")
        if not isinstance(backend, EngineBackend):
            raise InvalidRequestError("this instance's model does not expose a hidden state for embeddings")
        return backend

    def _embedder_for(self, backend: EngineBackend) -> Embedder:
        if self._embedder is None or self._embedder[0] is not backend:
            if self._embedder is not None:
                self._embedder[1].close()
            self._embedder = (backend, Embedder(backend.engine.model))
        return self._embedder[1]

    def _finished(
        self, request_id: str, call: Call | None, tokenized: Tokenized, queue_s: float, received: float
    ) -> None:
        service = self.service
        service.metrics.requests.labels(ENDPOINT, "200").inc()
        if call is not None and service.demand is not None:
            service.demand.finished(call, "200", None, tokenized.tokens, None)
        line = {
            "event": "request",
            "request_id": request_id,
            "endpoint": ENDPOINT,
            "status": "200",
            "inputs": len(tokenized.ids),
            "prompt_tokens": tokenized.tokens,
            "queue_ms": round(queue_s * 1000, 1),
            "duration_ms": round((time.perf_counter() - received) * 1000, 1),
        }
        events.info(json.dumps(line), extra={"request_id": request_id})
