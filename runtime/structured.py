"""Structured outputs: what a request asks the sampler to follow (`Constraint`), compiled once per
model into a grammar (`GrammarCompiler`, an LRU keyed by the constraint), and the per-sequence
matchers the engine's batched sampler follows.

The library is llguidance (pyproject says why). A JSON schema, a regex, a list of choices or a
Lark / GBNF grammar becomes an llguidance grammar; compiling it builds a matcher that is kept, never
advanced, as the cache entry, and each sequence gets a copy of it (microseconds). At every step the
engine asks each constrained row's matcher for its bitmask of allowed tokens (one bit per token id of
the model's logits), masks the logits, samples, and advances the matcher with the token. The
end-of-sequence ids are allowed only where the grammar may end, and a sequence ends as soon as its
matcher has terminated (nothing but end-of-sequence could follow).

JSON is generated compact (`,` and `:` without whitespace): the fewest tokens, and a weak model cannot
pad an answer with whitespace until it runs out of tokens.

Compiling runs in a worker thread (llguidance drops the GIL while it builds), so the event loop never
waits for it; concurrent requests for the same constraint share one compile (a request that goes away
leaves it to the others). The vocabulary (every token's bytes) is read from the tokenizer on the first
compile, not at a cold start.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:
    import llguidance
    import torch
    from llguidance._lib import JsonCompileOptions

ConstraintKind = Literal["json_object", "json_schema", "regex", "choice", "grammar"]

# A compile error's message as the client gets it: the library's, cut to this many characters
MAX_ERROR_CHARS = 600
# A compile also follows the tokens its grammar forces at the start, up to this many (see `_trial_error`)
FORCED_CHECK_TOKENS = 8
# A constraint's text (a schema as compact JSON, a regex, the choices as a JSON list, a grammar) is
# refused past this many characters: a compiled grammar's memory grows with it (a large enum: ~30-50
# bytes a character), and a request body may be far larger (16 MB)
MAX_CONSTRAINT_CHARS = 256 * 1024
# The compile cache, bounded by both its entries and their estimated memory (llguidance does not report
# an entry's own): ENTRY_BASE_BYTES + ENTRY_BYTES_PER_CHAR per character of the constraint's text
DEFAULT_CACHE_SIZE = 256
DEFAULT_CACHE_BYTES = 256 << 20
ENTRY_BASE_BYTES = 32 << 10
ENTRY_BYTES_PER_CHAR = 40
DEFAULT_COMPILE_TIMEOUT_S = 10.0
DEFAULT_COMPILE_THREADS = 4


class ConstraintError(ValueError):
    """A constraint the library cannot compile, or a malformed one: the message names the feature
    (the HTTP layer answers 400)."""


@dataclass(frozen=True)
class Constraint:
    """What a request asks the sampler to follow. Hashable: the compile cache's key.

    `value`: the schema as compact JSON for json_schema (keys in the schema's order, which is the order
    the properties are generated in: two schemas that differ only in it are two constraints), the
    regex, the JSON list of choices, the grammar's text; "" for json_object (any JSON object). `strict`
    (json_schema only): True refuses a schema that uses a keyword the library does not implement;
    False ignores such keywords (the output then follows the rest of the schema only)."""

    kind: ConstraintKind
    value: str = ""
    strict: bool = True

    @classmethod
    def json_object(cls) -> Constraint:
        return cls("json_object")

    @classmethod
    def json_schema(cls, schema: Mapping[str, Any], *, strict: bool = True) -> Constraint:
        if not isinstance(schema, Mapping):
            raise ConstraintError("a JSON schema must be a JSON object")
        try:
            value = json.dumps(schema, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ConstraintError(f"the JSON schema is not JSON: {exc}") from None
        return cls("json_schema", value, strict)

    @classmethod
    def regex(cls, pattern: str) -> Constraint:
        if not isinstance(pattern, str):
            raise ConstraintError("a regex must be a string")
        return cls("regex", pattern)

    @classmethod
    def choice(cls, choices: Sequence[str]) -> Constraint:
        if isinstance(choices, str) or not isinstance(choices, Sequence):
            raise ConstraintError("choices must be a list of strings")
        if not choices or not all(isinstance(c, str) and c for c in choices):
            raise ConstraintError("choices must be a non-empty list of non-empty strings")
        return cls("choice", json.dumps(list(choices), ensure_ascii=False))

    @classmethod
    def grammar(cls, text: str) -> Constraint:
        """A Lark grammar (llguidance's syntax) or a GBNF one (llama.cpp's), told apart by its text."""
        if not isinstance(text, str) or not text.strip():
            raise ConstraintError("a grammar must be a non-empty string")
        return cls("grammar", text)


# -- what the engine uses ---------------------------------------------------------------------------


class Matcher(Protocol):
    """One sequence's position in its grammar (scheduler thread only)."""

    def fill_mask(self, out: torch.Tensor) -> None:
        """Write the allowed next tokens into `out`: int32 [words] on the CPU, bit i of word j = token 32j+i."""

    def advance(self, token: int) -> bool:
        """Consume a sampled token (never an end-of-sequence id); False if the grammar refused it."""

    @property
    def done(self) -> bool:
        """The grammar has ended: nothing but end-of-sequence could follow."""

    @property
    def error(self) -> str | None: ...


class Compiled(Protocol):
    """A compiled constraint, shared by every request that asks for it."""

    @property
    def vocab_size(self) -> int:
        """The logits width its masks cover (the model's vocabulary)."""

    def matcher(self) -> Matcher:
        """A fresh matcher at the grammar's start."""


def mask_words(vocab_size: int) -> int:
    """int32 words of a bitmask over `vocab_size` tokens."""
    return (vocab_size + 31) // 32


def fill_bitmask(matchers: Sequence[Matcher], out: torch.Tensor) -> None:
    """Row i of `out` (int32 [>= len(matchers), words], CPU, contiguous) := matcher i's mask. Matchers of
    one class that has a `fill_batch(matchers, out)` (llguidance's: in parallel threads, the GIL
    released) fill theirs in one call; others one by one."""
    kind = type(matchers[0]) if matchers else None
    fill_batch = getattr(kind, "fill_batch", None)
    if len(matchers) > 1 and fill_batch is not None and all(type(m) is kind for m in matchers):
        fill_batch(matchers, out)
        return
    for i, m in enumerate(matchers):
        m.fill_mask(out[i])


# -- the vocabulary -----------------------------------------------------------------------------------


class TokenizerLike(Protocol):
    """What the compiler reads from a tokenizer (runtime/tokenizer.py's `Tokenizer` has it)."""

    @property
    def vocab_size(self) -> int: ...
    @property
    def special_token_ids(self) -> Collection[int]: ...
    def token_bytes(self, token_id: int) -> bytes: ...
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...


@dataclass(frozen=True)
class Vocabulary:
    """Every token id of the model's logits as the bytes it stands for in a text (b"" for ids the
    tokenizer does not have: the model's vocabulary may be padded past it), and the ids that end a
    sequence. Special tokens are never text to a grammar."""

    tokens: Sequence[bytes]
    eos_token_ids: Sequence[int]
    special_token_ids: Collection[int] = ()
    encode: Callable[[str], list[int]] | None = None

    @classmethod
    def of(cls, tokenizer: TokenizerLike, vocab_size: int, eos_token_ids: Collection[int]) -> Vocabulary:
        if not eos_token_ids:
            raise ValueError("a grammar needs at least one end-of-sequence token id")
        known = min(tokenizer.vocab_size, vocab_size)
        tokens = [tokenizer.token_bytes(i) for i in range(known)] + [b""] * (vocab_size - known)
        return cls(
            tokens,
            sorted(eos_token_ids),
            frozenset(tokenizer.special_token_ids),
            lambda text: tokenizer.encode(text, add_special_tokens=False),
        )


class _TokenizerForLLGuidance:
    """The tokenizer shape llguidance's `TokenizerWrapper` reads."""

    def __init__(self, vocab: Vocabulary) -> None:
        self.eos_token_id = vocab.eos_token_ids[0]
        self.bos_token_id = None
        self.tokens = list(vocab.tokens)
        self.special_token_ids = sorted(vocab.special_token_ids)
        self._encode = vocab.encode

    def __call__(self, text: str | bytes) -> list[int]:
        if self._encode is None:
            raise NotImplementedError("this vocabulary has no tokenizer")
        return self._encode(text.decode("utf-8", "replace") if isinstance(text, bytes) else text)


# -- llguidance ---------------------------------------------------------------------------------------

_EXECUTOR: llguidance.LLExecutor | None = None
_EXECUTOR_LOCK = threading.Lock()


def _executor() -> llguidance.LLExecutor:
    global _EXECUTOR
    with _EXECUTOR_LOCK:
        if _EXECUTOR is None:
            import llguidance

            _EXECUTOR = llguidance.LLExecutor()
        return _EXECUTOR


class _LLGuidanceMatcher:
    def __init__(self, inner: llguidance.LLMatcher) -> None:
        self.inner = inner

    def fill_mask(self, out: torch.Tensor) -> None:
        self.inner.unsafe_compute_mask_ptr(out.data_ptr(), out.numel() * 4)

    @staticmethod
    def fill_batch(matchers: Sequence[_LLGuidanceMatcher], out: torch.Tensor) -> None:
        pairs = [(m.inner, i) for i, m in enumerate(matchers)]
        _executor().unsafe_compute_mask_ptr(pairs, out.data_ptr(), out.shape[1] * 4, out.shape[0])

    def advance(self, token: int) -> bool:
        return bool(self.inner.consume_token(token))

    @property
    def done(self) -> bool:
        return bool(self.inner.is_stopped())

    @property
    def error(self) -> str | None:
        return _library_error(self.inner.get_error()) if self.inner.is_error() else None


@dataclass(frozen=True)
class _LLGuidanceGrammar:
    """A compiled grammar: a matcher at its start, copied for each sequence and never advanced."""

    start: llguidance.LLMatcher
    vocab_size: int

    def matcher(self) -> Matcher:
        return _LLGuidanceMatcher(self.start.deep_copy())


def _describe(kind: ConstraintKind) -> str:
    return {
        "json_object": "the JSON object grammar",
        "json_schema": "the JSON schema",
        "regex": "the regex",
        "choice": "the choices",
        "grammar": "the grammar",
    }[kind]


def _json_options(*, lenient: bool) -> JsonCompileOptions:
    """JSON as the grammar writes it: no whitespace between tokens (see the module docstring); options
    given as overrides, so that a schema's own `x-guidance` cannot turn them off."""
    return {"whitespace_flexible": False, "lenient": lenient}


def _llguidance_grammar(c: Constraint) -> str:
    import llguidance

    if c.kind == "json_object":
        return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, overrides=_json_options(lenient=False))
    if c.kind == "json_schema":
        try:
            return llguidance.LLMatcher.grammar_from_json_schema(c.value, overrides=_json_options(lenient=not c.strict))
        except ValueError as exc:
            raise ConstraintError(f"the JSON schema is not valid: {exc}") from None
    if c.kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(c.value)
    if c.kind == "choice":
        return llguidance.grammar_from("choice", c.value)
    try:
        return llguidance.grammar_from("grammar", c.value)  # Lark, or GBNF translated to Lark
    except ValueError as exc:
        raise ConstraintError(f"the grammar is not valid: {exc}") from None


def _short(message: str) -> str:
    message = message.strip()
    return message if len(message) <= MAX_ERROR_CHARS else message[: MAX_ERROR_CHARS - 3] + "..."


def _library_error(raw: str) -> str:
    """A matcher's error as a client reads it: llguidance appends its parser state and the whole grammar
    after "<state>" (for its own debugging, and as long as the grammar), cut here; its stop reason for a
    grammar that allows nothing at all is told in words."""
    text = raw.split("<state>", 1)[0].strip()
    if text == "NoExtensionBias":
        return (
            "it allows no text at all (e.g. an empty character class, or rules or $refs that only refer to each other)"
        )
    return _short(text) or "unknown error"


def _trial_error(m: llguidance.LLMatcher) -> str | None:
    """Why a grammar that compiled fails as soon as it is used, or None. llguidance finds some limits only
    when it computes a mask (a rule or $ref cycle with no way out, an empty character class, a regex past
    its lexer's limits) or consumes a token (a choice or an object too wide for its parser): `m`, a copy of
    the start, computes the first mask and follows the tokens the grammar forces, up to FORCED_CHECK_TOKENS,
    as every sequence will. A failure further in is the sequence's own (finish_reason "error")."""
    for _ in range(FORCED_CHECK_TOKENS):
        allowed = int.from_bytes(m.compute_bitmask(), "little")  # bit t: token t
        if m.is_error():
            return _library_error(m.get_error())
        if allowed == 0:
            return _library_error("NoExtensionBias")
        if allowed & (allowed - 1) or m.is_accepting():  # more than one token, or the end: nothing forced
            return None
        if not m.consume_token(allowed.bit_length() - 1):
            return _library_error(m.get_error())
    return None


# -- the compiler -------------------------------------------------------------------------------------


def estimated_bytes(c: Constraint) -> int:
    """What the cache counts for `c`'s entry (see ENTRY_BYTES_PER_CHAR)."""
    return ENTRY_BASE_BYTES + ENTRY_BYTES_PER_CHAR * len(c.value)


def _check_size(c: Constraint) -> None:
    if len(c.value) > MAX_CONSTRAINT_CHARS:
        raise ConstraintError(
            f"{_describe(c.kind)} is {len(c.value):,} characters"
            f"{' as compact JSON' if c.kind == 'json_schema' else ''}; the limit is {MAX_CONSTRAINT_CHARS:,}"
        )


class GrammarCompiler:
    """Compiles constraints for one model's vocabulary and keeps the most recently used results (a
    ConstraintError too: a schema that failed fails again at no cost; any other failure is dropped, so
    that a retry compiles again), at most `cache_size` of them and `cache_bytes` by `estimated_bytes`
    (the newest is always kept). A constraint longer than MAX_CONSTRAINT_CHARS is refused unread.

    Compiles run in a pool of `threads`, so that a slow one does not hold up the others. A request waits
    at most `compile_timeout_s` for its compile (in the pool's queue included), then gets a
    ConstraintError ("too complex to compile"). A thread cannot be stopped: that compile goes on in the
    background, holding its worker until it ends (llguidance's own limits bound it), and its result is
    cached as any other, so a retry may find it done. `vocabulary` is called once, on the first compile,
    in a compile thread."""

    def __init__(
        self,
        vocabulary: Callable[[], Vocabulary],
        *,
        cache_size: int = DEFAULT_CACHE_SIZE,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        compile_timeout_s: float = DEFAULT_COMPILE_TIMEOUT_S,
        threads: int = DEFAULT_COMPILE_THREADS,
    ) -> None:
        if cache_size < 1:
            raise ValueError(f"cache_size must be >= 1, got {cache_size}")
        if compile_timeout_s <= 0:
            raise ValueError(f"compile_timeout_s must be > 0, got {compile_timeout_s}")
        self._vocabulary = vocabulary
        self.cache_size = cache_size
        self.cache_bytes = cache_bytes
        self.compile_timeout_s = compile_timeout_s
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="kold-grammar")
        self._lock = threading.RLock()  # a done callback may run at once, in `_lookup`
        self._cache: OrderedDict[Constraint, Future[Compiled]] = OrderedDict()
        self._cached_bytes = 0
        self._tokenizer_lock = threading.Lock()
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._vocab_size = 0

    @classmethod
    def for_tokenizer(
        cls, tokenizer: TokenizerLike, vocab_size: int, eos_token_ids: Collection[int], **kwargs: Any
    ) -> GrammarCompiler:
        """A compiler for a model whose logits are `vocab_size` wide, ending on `eos_token_ids`."""
        ids = frozenset(eos_token_ids)
        return cls(lambda: Vocabulary.of(tokenizer, vocab_size, ids), **kwargs)

    def __len__(self) -> int:
        return len(self._cache)

    @property
    def cached_bytes(self) -> int:
        """The cache's entries' `estimated_bytes`, summed."""
        return self._cached_bytes

    async def compile(self, c: Constraint) -> tuple[Compiled, float]:
        """The compiled constraint and the seconds this call waited for it (0.0 on a cache hit): the
        compile in the worker thread, or another request's compile of the same constraint in flight.
        Raises ConstraintError."""
        future, hit = self._lookup(c)
        if hit and future.done():
            return future.result(), 0.0
        t0 = time.perf_counter()
        # shielded: neither a request that goes away (its task cancelled) nor the timeout cancels the
        # compile, which other requests may share
        try:
            compiled = await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), self.compile_timeout_s)
        except TimeoutError:
            raise self._too_slow(c) from None
        return compiled, time.perf_counter() - t0

    def compile_sync(self, c: Constraint) -> Compiled:
        """`compile` for callers without an event loop (scripts, tests)."""
        try:
            return self._lookup(c)[0].result(timeout=self.compile_timeout_s)
        except TimeoutError:
            raise self._too_slow(c) from None

    def _too_slow(self, c: Constraint) -> ConstraintError:
        return ConstraintError(f"{_describe(c.kind)} is too complex to compile in {self.compile_timeout_s:g} s")

    def _lookup(self, c: Constraint) -> tuple[Future[Compiled], bool]:
        _check_size(c)
        with self._lock:
            future = self._cache.get(c)
            if future is not None:
                self._cache.move_to_end(c)
                return future, True
            future = self._pool.submit(self._build, c)
            self._cache[c] = future
            self._cached_bytes += estimated_bytes(c)
            while len(self._cache) > 1 and (
                len(self._cache) > self.cache_size or self._cached_bytes > self.cache_bytes
            ):
                self._cached_bytes -= estimated_bytes(self._cache.popitem(last=False)[0])
            future.add_done_callback(lambda f: self._settled(c, f))
            return future, False

    def _settled(self, c: Constraint, future: Future[Compiled]) -> None:
        """A compile is done: a cancelled one or one that failed other than with a ConstraintError is not
        kept (it says nothing about the constraint)."""
        if not future.cancelled() and isinstance(future.exception(), (ConstraintError, type(None))):
            return
        with self._lock:
            if self._cache.get(c) is future:
                del self._cache[c]
                self._cached_bytes -= estimated_bytes(c)

    def _llg_tokenizer(self) -> llguidance.LLTokenizer:
        """Built once, in a compile thread (a large vocabulary takes a few hundred ms)."""
        with self._tokenizer_lock:
            if self._tokenizer is None:
                import llguidance

                vocab = self._vocabulary()
                self._tokenizer = llguidance.LLTokenizer(
                    llguidance.TokenizerWrapper(_TokenizerForLLGuidance(vocab)), eos_token=list(vocab.eos_token_ids)
                )
                self._vocab_size = len(vocab.tokens)
            return self._tokenizer

    def _build(self, c: Constraint) -> Compiled:
        import llguidance

        tokenizer = self._llg_tokenizer()
        grammar = _llguidance_grammar(c)
        start = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        if start.is_error():
            raise ConstraintError(f"{_describe(c.kind)} cannot be compiled: {_short(start.get_error())}")
        error = _trial_error(start.deep_copy())
        if error is not None:
            raise ConstraintError(f"{_describe(c.kind)} cannot be used: {error}")
        return _LLGuidanceGrammar(start, self._vocab_size)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
