"""Structured outputs below HTTP: constraints, the grammar compiler (errors, cache, off the event loop),
the bitmask, and the engine decoding a batch that mixes constrained and free rows, with a property
test over random JSON schemas.

The model is modelgen's random tiny Llama (fp32, its real byte-level BPE tokenizer of 512 tokens): its
choices are arbitrary, so whatever parses and validates does so because of the grammar. A generation
that runs into max_tokens ends with finish_reason "length" and an unfinished text (the API returns it
as such, as OpenAI does): the property test checks such a text is a prefix the grammar accepts, and
that nearly all of them finish.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import jsonschema
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kold.modelgen import write_random_model
from kold.runtime.config import ModelConfig
from kold.runtime.engine import Engine, GenerationRequest, GenerationResult
from kold.runtime.model import build_model
from kold.runtime.sampling import SamplingParams, apply_token_bitmask, token_logprobs
from kold.runtime.structured import (
    MAX_CONSTRAINT_CHARS,
    Compiled,
    Constraint,
    ConstraintError,
    GrammarCompiler,
    Vocabulary,
    estimated_bytes,
    mask_words,
)
from kold.runtime.tokenizer import Tokenizer

pytestmark = pytest.mark.timeout(300)

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}


class RecordingEngine(Engine):
    """The engine, keeping which rows of each sampled batch were constrained."""

    batches: list[list[bool]]

    def _constrain(self, logits: torch.Tensor, rows: Any) -> torch.Tensor:
        self.batches.append([r.matcher is not None for r in rows])
        return super()._constrain(logits, rows)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, ModelConfig, Tokenizer]:
    from safetensors.torch import load_file

    path = write_random_model(
        tmp_path_factory.mktemp("structured") / "tiny", "llama", "tiny", dtype=torch.float32, seed=7
    )
    config = ModelConfig.from_hf(json.loads((path / "config.json").read_text()))
    model = build_model(load_file(str(path / "model.safetensors")), config)
    return model, config, Tokenizer.from_dir(path)


@pytest.fixture(scope="module")
def engine(tiny: tuple[Any, ModelConfig, Tokenizer]) -> Iterator[RecordingEngine]:
    model, config, tokenizer = tiny
    eng = RecordingEngine(model, tokenizer, config, max_batch=4, max_seq_len=512)
    eng.batches = []
    eng.start()
    yield eng
    eng.stop(drain_timeout=5)


@pytest.fixture(scope="module")
def compiler(engine: Engine, tiny: tuple[Any, ModelConfig, Tokenizer]) -> Iterator[GrammarCompiler]:
    c = GrammarCompiler.for_tokenizer(tiny[2], engine.config.vocab_size, engine.eos_token_ids, cache_size=64)
    yield c
    c.close()


def prompt(tokenizer: Tokenizer, text: str = "Give me the record as JSON:") -> list[int]:
    return tokenizer.encode(text)


def generate(engine: Engine, ids: list[int], params: Sequence[SamplingParams]) -> list[GenerationResult]:
    """Submit every request at once (they share the batch) and wait for all."""

    async def run() -> list[GenerationResult]:
        handles = [engine.submit(GenerationRequest(ids, p)) for p in params]
        return list(await asyncio.gather(*(h.result() for h in handles)))

    return asyncio.run(run())


def accepted_prefix(compiled: Compiled, tokens: Sequence[int]) -> bool:
    """The grammar accepts every token of `tokens` in order (an unfinished output is a valid prefix)."""
    m = compiled.matcher()
    return all(m.advance(t) for t in tokens)


# -- constraints and the compiler ---------------------------------------------------------------------


def test_constraints_are_hashable_keys_that_keep_the_schema_order() -> None:
    a = Constraint.json_schema({"type": "object", "properties": {"b": {}, "a": {}}})
    assert a == Constraint.json_schema({"type": "object", "properties": {"b": {}, "a": {}}})
    assert a.value == '{"type":"object","properties":{"b":{},"a":{}}}'  # the order properties are generated in
    assert a != Constraint.json_schema({"type": "object", "properties": {"a": {}, "b": {}}})
    assert a != Constraint.json_schema({"type": "object", "properties": {"b": {}, "a": {}}}, strict=False)
    assert len({a, Constraint.json_object(), Constraint.regex("x"), Constraint.choice(["x"])}) == 4
    assert json.loads(Constraint.choice(["yes", "no"]).value) == ["yes", "no"]
    for bad in (lambda: Constraint.choice([]), lambda: Constraint.choice(["a", ""]), lambda: Constraint.grammar(" ")):
        with pytest.raises(ConstraintError):
            bad()
    with pytest.raises(ConstraintError, match="not JSON"):
        Constraint.json_schema({"type": "number", "maximum": float("nan")})


@pytest.mark.parametrize(
    ("constraint", "feature"),
    [
        (Constraint.json_schema({"not": {"type": "string"}}), '"not"'),
        (Constraint.json_schema({"type": "string", "format": "bogus"}), "format: bogus"),
        (Constraint.json_schema({"$ref": "#/$defs/missing"}), "/$defs/missing"),
        (Constraint.json_schema({"type": "frob"}), "frob"),
        (Constraint.json_schema({"type": "string", "pattern": "(?=a)b"}), "look-around"),
        (Constraint.regex("a(b"), "unclosed group"),
        (Constraint.grammar("start: undefined_rule"), "undefined_rule"),
    ],
)
def test_what_the_library_cannot_compile_is_an_error_naming_it(
    compiler: GrammarCompiler, constraint: Constraint, feature: str
) -> None:
    with pytest.raises(ConstraintError, match=re.escape(feature)):
        compiler.compile_sync(constraint)
    with pytest.raises(ConstraintError, match=re.escape(feature)):  # cached, and raised again
        compiler.compile_sync(constraint)


class CountingCompiler(GrammarCompiler):
    """The compiler, counting the compiles it runs (a cache hit runs none)."""

    builds = 0

    def _build(self, c: Constraint) -> Compiled:
        self.builds += 1
        return super()._build(c)


# grammars that compile but fail at their first mask or their first (forced) token
UNUSABLE = [
    (Constraint.json_schema({"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}),
     "allows no text"),
    (Constraint.json_schema({"type": "object", "properties": {"x": {"$ref": "#"}}, "required": ["x"]}),
     "Too many items"),
    (Constraint.choice([f"item{i}" for i in range(20000)]), "20001 items"),
    (Constraint.regex("a{1000}{1000}"), "too many expressions"),
    (Constraint.regex("[^\\x00-\\U0010FFFF]"), "allows no text"),
    (Constraint.grammar("start: a\na: a"), "allows no text"),
]  # fmt: skip


@pytest.mark.parametrize(("constraint", "words"), UNUSABLE)
def test_a_grammar_that_fails_at_its_first_step_is_a_cached_compile_error(
    engine: Engine, tiny: tuple[Any, ModelConfig, Tokenizer], constraint: Constraint, words: str
) -> None:
    compiler = CountingCompiler.for_tokenizer(tiny[2], engine.config.vocab_size, engine.eos_token_ids)
    try:
        for _ in range(2):
            with pytest.raises(ConstraintError, match=re.escape(words)) as raised:
                compiler.compile_sync(constraint)
            message = str(raised.value)
            assert "<state>" not in message and len(message) < 300 and "cannot be used" in message, message
        assert compiler.builds == 1  # the failure is cached
    finally:
        compiler.close()


def test_a_grammar_that_fails_further_in_fails_its_sequence_with_a_short_error(
    engine: Engine, compiler: GrammarCompiler, tiny: tuple[Any, ModelConfig, Tokenizer]
) -> None:
    late = compiler.compile_sync(Constraint.regex("[xy]a{1000}{1000}"))  # its first token is a free choice
    [r] = generate(engine, prompt(tiny[2]), [SamplingParams(max_tokens=20, temperature=0, constraint=late)])
    assert r.finish_reason == "error" and r.error is not None
    assert r.error.startswith("the grammar refused a sampled token: lexer error: too many expressions"), r.error
    assert "<state>" not in r.error and len(r.error) < 300


def test_a_lenient_schema_ignores_what_a_strict_one_refuses(compiler: GrammarCompiler, engine: Engine) -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 9}},
              "required": ["n"], "additionalProperties": False, "not": {"required": ["x"]}}  # fmt: skip
    with pytest.raises(ConstraintError, match="not"):
        compiler.compile_sync(Constraint.json_schema(schema))
    compiled = compiler.compile_sync(Constraint.json_schema(schema, strict=False))
    [r] = generate(engine, [5, 6, 7], [SamplingParams(max_tokens=50, temperature=1.0, seed=1, constraint=compiled)])
    assert r.finish_reason == "stop"
    assert 1 <= json.loads(r.text)["n"] <= 9


def test_the_compile_cache_is_an_lru_and_compiles_off_the_event_loop(
    tiny: tuple[Any, ModelConfig, Tokenizer], engine: Engine
) -> None:
    threads: list[str] = []
    tokenizer = tiny[2]

    def vocabulary() -> Vocabulary:
        threads.append(threading.current_thread().name)
        return Vocabulary.of(tokenizer, engine.config.vocab_size, engine.eos_token_ids)

    compiler = GrammarCompiler(vocabulary, cache_size=2)
    a, b, c = (Constraint.regex(p) for p in ("a+", "b+", "c+"))

    async def run() -> None:
        loop_thread = threading.current_thread().name
        first, seconds = await compiler.compile(a)
        assert seconds > 0
        assert threads == ["kold-grammar_0"] and threads[0] != loop_thread  # built in the compile thread
        again, seconds = await compiler.compile(a)
        assert again is first and seconds == 0.0
        both = await asyncio.gather(compiler.compile(b), compiler.compile(b))  # one compile, shared
        assert both[0][0] is both[1][0]
        await compiler.compile(c)  # a is the least recently used of a, b: evicted
        assert len(compiler) == 2
        assert (await compiler.compile(b))[1] == 0.0
        renewed, seconds = await compiler.compile(a)
        assert renewed is not first and seconds > 0

    try:
        asyncio.run(run())
    finally:
        compiler.close()
    assert len(threads) == 1  # the vocabulary is read once, on the first compile


def test_a_request_that_goes_away_leaves_the_compile_it_shares_and_a_crash_is_not_cached(
    tiny: tuple[Any, ModelConfig, Tokenizer], engine: Engine
) -> None:
    entered, release = threading.Event(), threading.Event()
    calls: list[int] = []

    def vocabulary() -> Vocabulary:
        calls.append(1)
        entered.set()
        assert release.wait(30)
        if len(calls) == 1:
            raise RuntimeError("the tokenizer is not there yet")
        return Vocabulary.of(tiny[2], engine.config.vocab_size, engine.eos_token_ids)

    compiler = GrammarCompiler(vocabulary, threads=1)
    a, b = Constraint.regex("a+"), Constraint.regex("b+")

    async def run() -> None:
        first = asyncio.ensure_future(compiler.compile(a))  # runs: its thread waits in `vocabulary`
        assert await asyncio.to_thread(entered.wait, 30)
        queued = asyncio.ensure_future(compiler.compile(b))  # waits for the one compile thread
        shared = asyncio.ensure_future(compiler.compile(b))
        await asyncio.sleep(0.05)
        queued.cancel()  # its client went away
        release.set()
        with pytest.raises(RuntimeError, match="not there yet"):
            await first
        assert (await shared)[0].vocab_size == engine.config.vocab_size  # b's compile went on
        assert queued.cancelled()
        assert (await compiler.compile(b))[1] == 0.0
        assert (await compiler.compile(a))[0].vocab_size == engine.config.vocab_size  # the crash was not kept

    try:
        asyncio.run(run())
    finally:
        compiler.close()


def test_a_constraint_past_the_size_limit_is_refused_and_the_cache_is_bounded_by_its_estimated_memory(
    tiny: tuple[Any, ModelConfig, Tokenizer], engine: Engine
) -> None:
    small = [Constraint.regex(f"{letter}+") for letter in "abcd"]
    large = Constraint.choice([f"word{i}" for i in range(200)])
    budget = 3 * estimated_bytes(small[0])
    assert estimated_bytes(large) > budget - estimated_bytes(small[0])  # it leaves room for no small one
    compiler = GrammarCompiler.for_tokenizer(
        tiny[2], engine.config.vocab_size, engine.eos_token_ids, cache_size=100, cache_bytes=budget
    )
    try:
        for c in small:
            compiler.compile_sync(c)
        assert len(compiler) == 3 and compiler.cached_bytes == budget  # the bytes bound, not the count
        compiler.compile_sync(large)
        assert len(compiler) == 1 and compiler.cached_bytes == estimated_bytes(large)  # the newest stays
        too_long = Constraint.regex("a" * (MAX_CONSTRAINT_CHARS + 1))
        with pytest.raises(ConstraintError, match="the regex is 262,145 characters; the limit is 262,144"):
            compiler.compile_sync(too_long)
        schema = Constraint.json_schema({"enum": ["x" * 1000] * 300})
        with pytest.raises(ConstraintError, match="as compact JSON; the limit is 262,144"):
            compiler.compile_sync(schema)
        assert len(compiler) == 1  # refused unread
    finally:
        compiler.close()


def test_a_compile_past_its_timeout_is_an_error_and_finishes_in_the_background(
    tiny: tuple[Any, ModelConfig, Tokenizer], engine: Engine
) -> None:
    release = threading.Event()

    def vocabulary() -> Vocabulary:
        assert release.wait(30)  # a compile that takes as long as the test says
        return Vocabulary.of(tiny[2], engine.config.vocab_size, engine.eos_token_ids)

    compiler = GrammarCompiler(vocabulary, compile_timeout_s=0.2)
    c = Constraint.regex("[a-z]+")

    async def run() -> None:
        with pytest.raises(ConstraintError, match=r"the regex is too complex to compile in 0.2 s"):
            await compiler.compile(c)
        with pytest.raises(ConstraintError, match="too complex"):
            compiler.compile_sync(c)
        release.set()
        compiled, _ = await compiler.compile(c)  # the same compile, done in the background
        assert compiled.vocab_size == engine.config.vocab_size and len(compiler) == 1

    try:
        asyncio.run(run())
    finally:
        release.set()
        compiler.close()


def test_apply_token_bitmask_masks_only_the_given_rows() -> None:
    vocab = 70
    logits = torch.randn(3, vocab)
    original = logits.clone()
    allowed = [[0, 31, 32, 69], [5]]
    mask = torch.zeros((2, mask_words(vocab)), dtype=torch.int32)
    for j, ids in enumerate(allowed):
        for t in ids:
            word = int(mask[j, t // 32]) | (1 << (t % 32))
            mask[j, t // 32] = word - (1 << 32) if word >= 1 << 31 else word  # int32 two's complement
    out = apply_token_bitmask(logits, mask, [2, 0])
    assert torch.equal(out[1], original[1])
    for row, ids in ((2, allowed[0]), (0, allowed[1])):
        finite = torch.isfinite(out[row]).nonzero().flatten().tolist()
        assert finite == ids
        assert torch.equal(out[row, ids], original[row, ids])
    # the log-probabilities of a masked row are the model's over the allowed tokens only
    [lp] = token_logprobs(out[2:3], [31], [2])
    assert lp is not None and {t for t, _ in lp.top} <= set(allowed[0])
    expected = torch.log_softmax(original[2, allowed[0]], dim=-1)[1]
    assert lp.logprob == pytest.approx(float(expected), abs=1e-5)


@pytest.mark.parametrize("chunk_tokens", [1, 250, 10**9])  # a row, 2 rows, every row at a time
def test_apply_token_bitmask_matches_its_bits_in_chunks_of_rows(chunk_tokens: int) -> None:
    vocab, batch = 100, 7
    gen = torch.Generator().manual_seed(5)
    allowed = torch.rand((5, mask_words(vocab) * 32), generator=gen) < 0.3
    allowed[:, vocab:] = False
    weights = torch.tensor([1 << i for i in range(32)], dtype=torch.int64)
    words = (allowed.view(5, -1, 32).long() * weights).sum(-1)
    mask = torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)  # int32 two's complement
    for rows in ([6, 0, 3, 2, 5], [0, 1, 2, 3, 4]):
        logits = torch.randn(batch, vocab, generator=gen)
        original = logits.clone()
        out = apply_token_bitmask(logits, mask, rows, chunk_tokens=chunk_tokens)
        expected = original.clone()
        for j, row in enumerate(rows):
            expected[row, ~allowed[j, :vocab]] = float("-inf")
        assert torch.equal(out, expected)
    whole = torch.randn(5, vocab, generator=gen)
    expected = whole.masked_fill(~allowed[:, :vocab], float("-inf"))
    assert torch.equal(apply_token_bitmask(whole, mask, range(5), chunk_tokens=chunk_tokens), expected)
    assert torch.equal(whole, expected)  # the whole batch is masked in place


# -- the engine ---------------------------------------------------------------------------------------


def test_a_mixed_batch_constrains_its_rows_and_leaves_the_free_ones_exactly_as_alone(
    engine: RecordingEngine, compiler: GrammarCompiler, tiny: tuple[Any, ModelConfig, Tokenizer]
) -> None:
    ids = prompt(tiny[2])
    person = compiler.compile_sync(Constraint.json_schema(PERSON))
    free = [
        SamplingParams(max_tokens=24, temperature=0, ignore_eos=True),
        SamplingParams(max_tokens=24, temperature=0.9, top_p=0.9, seed=3, ignore_eos=True),
    ]
    alone = [r.token_ids for r in generate(engine, ids, free)]
    engine.batches.clear()
    constrained = [
        SamplingParams(max_tokens=200, temperature=0, constraint=person),
        SamplingParams(max_tokens=200, temperature=1.0, top_k=50, seed=11, constraint=person, logprobs=3),
    ]
    results = generate(engine, ids, [constrained[0], free[0], constrained[1], free[1]])
    assert [results[1].token_ids, results[3].token_ids] == alone
    assert any(True in b and False in b for b in engine.batches)  # they shared decode steps
    for r in (results[0], results[2]):
        assert r.finish_reason == "stop", r.text
        jsonschema.validate(json.loads(r.text), PERSON)
        assert engine.eos_token_ids.isdisjoint(r.token_ids[:-1])
    assert engine.cache.num_free == engine.max_batch


def test_logprobs_of_a_constrained_row_are_its_allowed_tokens(
    engine: Engine, compiler: GrammarCompiler, tiny: tuple[Any, ModelConfig, Tokenizer]
) -> None:
    tokenizer = tiny[2]
    yes_no = compiler.compile_sync(Constraint.choice(["yes", "no"]))
    handle = engine.submit(
        GenerationRequest(
            prompt(tokenizer), SamplingParams(max_tokens=10, temperature=0, logprobs=5, constraint=yes_no)
        )
    )
    evs = list(handle)
    text = "".join(e.text_delta for e in evs)
    assert text in ("yes", "no") and evs[-1].finish_reason == "stop"
    first = evs[0]
    assert first.logprob is not None and first.logprob > -9999
    alternatives = {tokenizer.decode([t]) for t, _ in first.top_logprobs}
    assert alternatives <= {"y", "n", "ye", "yes", "no"} and len(first.top_logprobs) <= 5


def test_regex_choice_and_grammar_constraints(
    engine: Engine, compiler: GrammarCompiler, tiny: tuple[Any, ModelConfig, Tokenizer]
) -> None:
    ids = prompt(tiny[2])
    cases = [
        (Constraint.regex(r"[a-z]{3}-[0-9]{2}"), lambda t: re.fullmatch(r"[a-z]{3}-[0-9]{2}", t)),
        (Constraint.choice(["alpha", "beta", "gamma delta"]), lambda t: t in ("alpha", "beta", "gamma delta")),
        (Constraint.grammar('start: "(" start ")" | "x"'), lambda t: re.fullmatch(r"(\(*)x(\)*)", t) and t.count("(") == t.count(")")),
        (Constraint.grammar('root ::= "<" [a-c]+ ">"'), lambda t: re.fullmatch(r"<[a-c]+>", t)),  # GBNF
    ]  # fmt: skip
    params = [SamplingParams(max_tokens=60, temperature=1.0, seed=i, constraint=compiler.compile_sync(c))
              for i, (c, _) in enumerate(cases)]  # fmt: skip
    for (_, check), r in zip(cases, generate(engine, ids, params), strict=True):
        assert r.finish_reason == "stop" and check(r.text), r.text


def test_max_tokens_cuts_a_constrained_output_as_length(
    engine: Engine, compiler: GrammarCompiler, tiny: tuple[Any, ModelConfig, Tokenizer]
) -> None:
    person = compiler.compile_sync(Constraint.json_schema(PERSON))
    [r] = generate(engine, prompt(tiny[2]), [SamplingParams(max_tokens=3, temperature=0, constraint=person)])
    assert r.finish_reason == "length" and r.completion_tokens == 3
    assert r.text.startswith("{") and accepted_prefix(person, r.token_ids)


def test_a_cancelled_constrained_request_frees_its_slot_and_matcher(
    engine: Engine, compiler: GrammarCompiler, tiny: tuple[Any, ModelConfig, Tokenizer]
) -> None:
    endless = compiler.compile_sync(Constraint.regex("(ab){200}"))
    handle = engine.submit(
        GenerationRequest(prompt(tiny[2]), SamplingParams(max_tokens=400, temperature=1.0, seed=2, constraint=endless))
    )
    events = iter(handle)
    next(events)
    handle.cancel()
    assert [e.finish_reason for e in events][-1] == "cancelled"
    assert engine.num_running == 0 and engine.cache.num_free == engine.max_batch


# -- the property: random JSON schemas ----------------------------------------------------------------

NAMES = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=8)


@st.composite
def bounded_string(draw: st.DrawFn) -> dict[str, Any]:
    low = draw(st.integers(0, 3))
    return {"type": "string", "minLength": low, "maxLength": draw(st.integers(max(low, 1), 8))}


@st.composite
def number(draw: st.DrawFn) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": draw(st.sampled_from(["integer", "number"]))}
    if draw(st.booleans()):
        low = draw(st.integers(-1000, 1000))
        schema.update(minimum=low, maximum=low + draw(st.integers(0, 5000)))
    return schema


LEAVES = st.one_of(
    bounded_string(),
    number(),
    st.just({"type": "boolean"}),
    st.just({"type": "null"}),
    st.lists(st.one_of(NAMES, st.integers(-50, 50)), min_size=1, max_size=4, unique=True).map(lambda v: {"enum": v}),
)


@st.composite
def obj(draw: st.DrawFn, children: st.SearchStrategy[dict[str, Any]]) -> dict[str, Any]:
    props = draw(st.dictionaries(NAMES, children, min_size=1, max_size=4))
    required = [k for k in props if draw(st.booleans())]
    return {"type": "object", "properties": props, "required": required, "additionalProperties": False}


@st.composite
def array(draw: st.DrawFn, children: st.SearchStrategy[dict[str, Any]]) -> dict[str, Any]:
    low = draw(st.integers(0, 1))
    return {"type": "array", "items": draw(children), "minItems": low, "maxItems": draw(st.integers(max(low, 1), 3))}


SCHEMAS = st.recursive(LEAVES, lambda children: st.one_of(obj(children), array(children)), max_leaves=6)
TOP = obj(SCHEMAS)  # OpenAI's structured outputs want an object at the top


def test_random_schemas_give_outputs_that_parse_and_validate(
    engine: Engine, compiler: GrammarCompiler, tiny: tuple[Any, ModelConfig, Tokenizer]
) -> None:
    """Four random schemas a batch, decoded together with sampling; every finished output parses and
    validates with jsonschema, every cut one is a prefix the grammar accepts, and few are cut."""
    ids = prompt(tiny[2])
    outcomes: list[str] = []

    @settings(max_examples=15, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(st.lists(TOP, min_size=4, max_size=4), st.integers(0, 2**31))
    def property(schemas: list[dict[str, Any]], seed: int) -> None:
        compiled = [compiler.compile_sync(Constraint.json_schema(s)) for s in schemas]
        params = [SamplingParams(max_tokens=300, temperature=1.0, seed=seed + i, constraint=c)
                  for i, c in enumerate(compiled)]  # fmt: skip
        for schema, c, r in zip(schemas, compiled, generate(engine, ids, params), strict=True):
            outcomes.append(r.finish_reason)
            if r.finish_reason == "stop":
                jsonschema.validate(json.loads(r.text), schema)
            else:
                assert r.finish_reason == "length" and r.completion_tokens == 300, (r.finish_reason, r.error)
                assert accepted_prefix(c, r.token_ids), r.text

    property()
    assert outcomes.count("stop") >= 0.9 * len(outcomes), outcomes


def test_schema_order_is_generation_order(
    engine: Engine, compiler: GrammarCompiler, tiny: tuple[Any, ModelConfig, Tokenizer]
) -> None:
    schema = {"type": "object", "properties": {"zeta": {"type": "boolean"}, "alpha": {"type": "boolean"}},
              "required": ["zeta", "alpha"], "additionalProperties": False}  # fmt: skip
    compiled = compiler.compile_sync(Constraint.json_schema(schema))
    [r] = generate(engine, prompt(tiny[2]), [SamplingParams(max_tokens=40, temperature=0, constraint=compiled)])
    assert list(json.loads(r.text)) == ["zeta", "alpha"]


def test_the_model_vocabulary_past_the_tokenizer_is_never_allowed(tiny: tuple[Any, ModelConfig, Tokenizer]) -> None:
    tokenizer = tiny[2]
    padded = tokenizer.vocab_size + 40  # models pad their embedding past the tokenizer's ids
    compiler = GrammarCompiler.for_tokenizer(tokenizer, padded, [2])
    try:
        compiled = compiler.compile_sync(Constraint.regex("[a-z ]+"))
        assert compiled.vocab_size == padded
        mask = torch.zeros((1, mask_words(padded)), dtype=torch.int32)
        compiled.matcher().fill_mask(mask[0])
        allowed = apply_token_bitmask(torch.zeros(1, padded), mask, [0]).isfinite()[0]
        assert allowed[: tokenizer.vocab_size].any() and not allowed[tokenizer.vocab_size :].any()
        assert not allowed[sorted(tokenizer.special_token_ids)].any()
    finally:
        compiler.close()


def test_an_engine_refuses_a_grammar_compiled_for_another_vocabulary(
    engine: Engine, tiny: tuple[Any, ModelConfig, Tokenizer]
) -> None:
    compiler = GrammarCompiler.for_tokenizer(tiny[2], engine.config.vocab_size + 32, [2])
    try:
        other = compiler.compile_sync(Constraint.regex("a"))
    finally:
        compiler.close()
    [r] = generate(engine, [5, 6], [SamplingParams(max_tokens=5, constraint=other)])
    assert r.finish_reason == "error" and "compiled for" in (r.error or "")
