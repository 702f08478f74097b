"""`SamplingParams` and the pure functions that turn logits into tokens, report their log-probabilities
and find stop strings.

Every request carries its own `torch.Generator`, seeded from `seed` when given: its draws do not
depend on what else is in the batch, so a seeded request reproduces its tokens (on the same device
and model) however the scheduler interleaves it with others.

Log-probabilities are the model's own ("raw", as vLLM reports them by default): `log_softmax` of
the logits before penalties, temperature, top-k and top-p change them, so that an evaluation scores
the model and not the sampling settings of the request that asked. A constrained request
(`SamplingParams.constraint`, runtime/structured.py) is the exception that follows from what it asks:
its logits are masked to what its grammar allows before anything else, so its log-probabilities are
the model's distribution over the allowed tokens (renormalised over them, as vLLM reports them), and
its top alternatives are allowed tokens only.
"""

from __future__ import annotations

import math
import secrets
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from kold.runtime.structured import Compiled

MAX_TOP_LOGPROBS = 20  # OpenAI's limit for top_logprobs
# OpenAI reports a log-probability too small to matter as -9999.0 (JSON has no -inf)
MIN_LOGPROB = -9999.0
# apply_token_bitmask unpacks about this many tokens' bits at a time (~32 MB of temporaries)
MASK_CHUNK_TOKENS = 1 << 24


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded. Invalid values raise ValueError naming the field."""

    max_tokens: int = 16  # OpenAI's completions default
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0  # nucleus: the smallest set of tokens whose probability reaches top_p
    top_k: int = 0  # 0 (or -1): off
    seed: int | None = None
    stop: Sequence[str] = ()  # the returned text ends before the first one that appears (kept as a tuple)
    stop_token_ids: Sequence[int] = ()  # besides the tokenizer's end-of-sequence ids (kept as a tuple)
    ignore_eos: bool = False  # generate exactly max_tokens (benchmarks)
    # OpenAI's penalties: each token's logit is lowered by presence_penalty once it has been generated,
    # plus frequency_penalty for every time it has been (applied before temperature, greedy too)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # None: no log-probabilities; k >= 0: each generated token's, and the k most likely alternatives'
    logprobs: int | None = None
    # a compiled structured-output constraint (runtime/structured.py): the tokens its grammar does not
    # allow are masked out before sampling, and the sequence ends where the grammar does
    constraint: Compiled | None = None

    def __post_init__(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be >= 0 (or -1 for off), got {self.top_k!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)!r}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.logprobs!r}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {self.seed!r}")
        if isinstance(self.stop, str):  # a lone string is one stop string, not its characters
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A request's own generator: seeded for reproducibility, else from the OS's entropy."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed if seed is not None else secrets.randbits(63))
    return gen


def apply_penalties(logits: torch.Tensor, generated: Sequence[int], params: SamplingParams) -> torch.Tensor:
    """`logits [V]` lowered by the presence and frequency penalties of the tokens generated so far."""
    if not params.penalized or not generated:
        return logits
    ids = torch.tensor(generated, dtype=torch.long, device=logits.device)
    counts = torch.zeros_like(logits).index_add_(0, ids, torch.ones_like(ids, dtype=logits.dtype))
    return logits - params.frequency_penalty * counts - params.presence_penalty * (counts > 0).to(logits.dtype)


def apply_token_bitmask(
    logits: torch.Tensor, bitmask: torch.Tensor, rows: Sequence[int], *, chunk_tokens: int = MASK_CHUNK_TOKENS
) -> torch.Tensor:
    """`logits [B, V]` (fp32, modified in place and returned) with row `rows[j]` set to -inf wherever bit
    t of `bitmask[j]` (int32 [len(rows), words], words * 32 >= V; bit i of word k is token 32k + i) is
    clear. The other rows are untouched.

    The bits are unpacked a byte at a time (8 tokens), a chunk of about `chunk_tokens` rows x V at a
    time: the step's temporaries are ~2 bytes a token of a chunk, whatever the batch."""
    n, vocab = len(rows), logits.shape[-1]
    if n == 0:
        return logits
    packed = bitmask[:n].contiguous().view(torch.uint8)  # byte b of word k: tokens 32k + 8b ..
    if sys.byteorder == "big":
        packed = packed.view(n, -1, 4).flip(-1).reshape(n, -1)
    packed = packed[:, : (vocab + 7) // 8].to(logits.device)
    bits = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8, device=logits.device)
    whole = n == logits.shape[0] and list(rows) == list(range(n))
    index = None if whole else torch.tensor(list(rows), dtype=torch.long, device=logits.device)
    step = max(1, chunk_tokens // vocab)
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        blocked = (packed[lo:hi, :, None] & bits).eq(0).view(hi - lo, -1)[:, :vocab]
        if index is None:
            logits[lo:hi].masked_fill_(blocked, -math.inf)
        else:
            ids = index[lo:hi]
            logits.index_copy_(0, ids, logits.index_select(0, ids).masked_fill_(blocked, -math.inf))
    return logits


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """`logits [V]` (fp32) divided by temperature, with tokens outside top_k / top_p set to -inf."""
    x = logits / params.temperature
    if 0 < params.top_k < x.shape[-1]:
        kth = torch.topk(x, params.top_k).values[-1]
        x = x.masked_fill(x < kth, -math.inf)
    if params.top_p < 1:
        ordered, order = torch.sort(x, descending=True)
        probs = torch.softmax(ordered, dim=-1)
        # drop a token once the ones ranked before it already reach top_p (the first always stays)
        drop = (torch.cumsum(probs, dim=-1) - probs) >= params.top_p
        x = x.clone()
        x[order[drop]] = -math.inf
    return x


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token from `logits [V]`: argmax when greedy, else a draw from the filtered distribution."""
    if params.greedy:
        return int(torch.argmax(logits))
    probs = torch.softmax(filter_logits(logits.float(), params), dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def sample_batch(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
    generated: Sequence[Sequence[int]] | None = None,
) -> list[int]:
    """One token per row of `logits [B, V]` (fp32); `generated[i]`: row i's tokens so far (penalties).

    Plain greedy rows share one argmax (one device sync for them all).
    """
    if generated is not None and any(p.penalized for p in params):
        logits = torch.stack([apply_penalties(logits[i], generated[i], p) for i, p in enumerate(params)])
    greedy = [i for i, p in enumerate(params) if p.greedy]
    out = [0] * len(params)
    if greedy:
        rows = logits if len(greedy) == len(params) else logits[greedy]
        for i, token in zip(greedy, torch.argmax(rows, dim=-1).tolist(), strict=True):
            out[i] = token
    for i, p in enumerate(params):
        if not p.greedy:
            out[i] = sample(logits[i], p, generators[i])
    return out


@dataclass(frozen=True)
class TokenLogprobs:
    """A generated token's log-probability and the most likely tokens at its position (id, logprob),
    most likely first; raw: see the module docstring."""

    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def token_logprobs(
    logits: torch.Tensor, tokens: Sequence[int], top_n: Sequence[int | None]
) -> list[TokenLogprobs | None]:
    """Row i of `logits [B, V]` (as the model gave them): the log-probability of `tokens[i]` and the
    `top_n[i]` most likely tokens, or None where `top_n[i]` is None (the request did not ask).

    The rows that ask share one log_softmax and one top-k, and their values come back to the host in
    one transfer each, whatever the batch."""
    rows = [i for i, k in enumerate(top_n) if k is not None]
    out: list[TokenLogprobs | None] = [None] * len(tokens)
    if not rows:
        return out
    x = logits if len(rows) == len(tokens) else logits[rows]
    logp = torch.log_softmax(x.float(), dim=-1)
    chosen_ids = torch.tensor([tokens[i] for i in rows], dtype=torch.long, device=logp.device)
    chosen = logp.gather(1, chosen_ids[:, None])[:, 0].tolist()
    k = min(max(top_n[i] or 0 for i in rows), logp.shape[-1])
    top_values: list[list[float]] = [[] for _ in rows]
    top_ids: list[list[int]] = [[] for _ in rows]
    if k > 0:
        values, ids = torch.topk(logp, k, dim=-1)
        top_values, top_ids = values.tolist(), ids.tolist()
    for j, i in enumerate(rows):
        n = top_n[i] or 0
        # a token a grammar masked out (-inf) is no alternative: a constrained row may list fewer than n
        pairs = zip(top_ids[j][:n], top_values[j][:n], strict=True)
        top = tuple((t, max(v, MIN_LOGPROB)) for t, v in pairs if v != -math.inf)
        out[i] = TokenLogprobs(max(chosen[j], MIN_LOGPROB), top)
    return out


def find_stop(text: str, stops: Sequence[str], start: int = 0) -> int | None:
    """Index in `text` of the earliest stop string found at or after `start`, else None."""
    found = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(found) if found else None


def holdback(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters of `text` might be the start of a stop string (not safe to stream)."""
    longest = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:n]):
                longest = n
                break
    return longest
