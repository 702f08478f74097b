"""Sampling functions and the Engine: continuous batching, cancel, limits, stop strings, seeds.

The engine runs a random tiny Llama published and restored through a real file:// snapshot store,
with a character-level test tokenizer (the real one lives in runtime/tokenizer.py).
"""

from __future__ import annotations

import asyncio
import string
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import torch

from kold.modelgen import write_random_model
from kold.runtime.engine import (
    Engine,
    EngineStoppedError,
    GenerationRequest,
    InvalidRequestError,
    PromptTooLongError,
    RequestHandle,
)
from kold.runtime.kvcache import KVCache
from kold.runtime.model import LlamaForCausalLM, build_model
from kold.runtime.sampling import (
    SamplingParams,
    apply_penalties,
    filter_logits,
    find_stop,
    holdback,
    make_generator,
    sample,
    sample_batch,
)
from kold.snapshot import build_snapshot, restore

# a broken engine tends to hang (a request never finishes) rather than fail: fail fast instead
pytestmark = pytest.mark.timeout(60)

ALPHABET = string.ascii_lowercase + string.digits + " .,"
EOS = 2


class CharTokenizer:
    """Test tokenizer: id i is one character of ALPHABET (cycled); EOS decodes to nothing."""

    def __init__(self) -> None:
        self.eos_token_ids = [EOS]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return "".join(ALPHABET[i % len(ALPHABET)] for i in ids if i != EOS)

    def encode(self, text: str) -> list[int]:
        return [ALPHABET.index(c) for c in text]


class ByteTokenizer:
    """Byte-level decode, as byte-fallback tokenizers do: a character may span several tokens."""

    def __init__(self) -> None:
        self.eos_token_ids: list[int] = []

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> LlamaForCausalLM:
    """The modelgen tiny Llama (vocab 512, 2 layers, GQA) through build_snapshot -> restore -> build_model."""
    root = tmp_path_factory.mktemp("engine")
    model_dir = write_random_model(root / "tiny", "llama", "tiny", dtype=torch.float32, seed=7)
    snap = restore(build_snapshot(model_dir, (root / "store").as_uri(), chunk_size=64 << 10).uri)
    return build_model(snap)


@pytest.fixture
def engine(model: LlamaForCausalLM) -> Iterator[Engine]:
    eng = Engine(model, CharTokenizer(), max_batch=2, max_seq_len=64)
    eng.start()
    yield eng
    eng.stop(drain_timeout=5)


@pytest.fixture
def roomy_engine(model: LlamaForCausalLM) -> Iterator[Engine]:
    """For cancel tests: a context long enough (~500 steps) that an uncancelled request cannot end
    by itself before the test cancels it, however slow the machine."""
    eng = Engine(model, CharTokenizer(), max_batch=2, max_seq_len=512)
    eng.start()
    yield eng
    eng.stop(drain_timeout=5)


def run(engine: Engine, prompt: list[int], **params: object) -> tuple[list[int], str, str]:
    """Submit from a thread with no event loop and collect (token ids, text, finish reason)."""
    result = engine.submit(GenerationRequest(prompt, SamplingParams(**params))).result_sync()  # type: ignore[arg-type]
    return result.token_ids, result.text, result.finish_reason


PROMPTS = [[5, 9, 13], [40, 41, 42, 43, 44, 45, 46, 47], [100, 7], [300, 301, 302, 303, 304], [11] * 12]


# -- sampling (pure functions) ----------------------------------------------------------------------


def test_greedy_is_argmax_and_top_k_1_is_greedy() -> None:
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))
    best = int(logits.argmax())
    assert sample(logits, SamplingParams(temperature=0), None) == best
    assert sample(logits, SamplingParams(temperature=5.0, top_k=1), make_generator(1)) == best


def test_top_k_and_top_p_restrict_the_support() -> None:
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0, -1.0])
    kept = filter_logits(logits, SamplingParams(top_k=3))
    assert torch.isfinite(kept).tolist() == [True, True, True, False, False, False]
    # softmax of these logits: 0.64, 0.23, 0.09, ...: top_p 0.8 needs the first two, 0.5 only the first
    assert torch.isfinite(filter_logits(logits, SamplingParams(top_p=0.8))).sum() == 2
    assert torch.isfinite(filter_logits(logits, SamplingParams(top_p=0.5))).sum() == 1
    gen = make_generator(0)
    draws = {sample(logits, SamplingParams(temperature=1.0, top_k=2), gen) for _ in range(200)}
    assert draws == {0, 1}


def test_temperature_flattens_the_distribution() -> None:
    logits = torch.tensor([2.0, 0.0, 0.0, 0.0])
    gen = make_generator(0)
    cold = [sample(logits, SamplingParams(temperature=0.1), gen) for _ in range(200)]
    hot = [sample(logits, SamplingParams(temperature=10.0), gen) for _ in range(200)]
    assert cold.count(0) == 200
    assert hot.count(0) < 120  # ~ 0.30 of the draws at T=10


def test_seeded_generators_reproduce_and_differ() -> None:
    logits = torch.zeros(1000)
    p = SamplingParams(temperature=1.0)

    def draws(seed: int) -> list[int]:
        gen = make_generator(seed)
        return [sample(logits, p, gen) for _ in range(20)]

    assert draws(42) == draws(42)
    assert draws(42) != draws(43)


def test_sample_batch_rows_are_independent() -> None:
    logits = torch.randn(3, 100, generator=torch.Generator().manual_seed(1))
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0, seed=5), SamplingParams(temperature=0)]
    tokens = sample_batch(logits, params, [None, make_generator(5), None])
    assert tokens[0] == int(logits[0].argmax()) and tokens[2] == int(logits[2].argmax())
    assert tokens[1] == sample(logits[1], params[1], make_generator(5))


def test_penalties_lower_generated_tokens() -> None:
    logits = torch.tensor([1.0, 0.9, 0.0])
    p = SamplingParams(temperature=0, presence_penalty=0.5, frequency_penalty=0.25)
    assert apply_penalties(logits, [0, 0], p).tolist() == pytest.approx([0.0, 0.9, 0.0])
    assert sample_batch(logits[None], [p], [None], [[0, 0]]) == [1]


def test_stop_string_helpers() -> None:
    assert find_stop("hello world", ["wor", "lo"]) == 3
    assert find_stop("hello world", ["xyz"]) is None
    assert find_stop("abcabc", ["abc"], start=1) == 3
    assert holdback("the end", ["ending"]) == 3  # "end" may become "ending"
    assert holdback("the end.", ["ending"]) == 0
    assert holdback("ab", ["abc", "b"]) == 2


def test_sampling_params_validation() -> None:
    for bad in ({"max_tokens": 0}, {"temperature": -1}, {"top_p": 0}, {"top_k": -2}, {"stop": [""]}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SamplingParams(**bad)
    assert SamplingParams(stop="###").stop == ("###",)


def test_incremental_decoder_streams_whole_characters_for_any_decoder() -> None:
    """The engine streams through runtime/tokenizer.py's IncrementalDecoder, with any `decode`."""
    from kold.runtime.tokenizer import IncrementalDecoder

    text = "héllo wörld €!"
    detok = IncrementalDecoder(ByteTokenizer())
    deltas = [detok.step(b) for b in text.encode()] + [detok.flush()]
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)


# -- engine -----------------------------------------------------------------------------------------


def test_concurrent_requests_match_each_run_alone(model: LlamaForCausalLM) -> None:
    """Five requests through a 2-slot engine (three wait in the queue; rows join and leave the batch
    at different steps) give the same greedy tokens as each request run on its own."""
    alone_engine = Engine(model, CharTokenizer(), max_batch=1, max_seq_len=64)
    alone_engine.start()
    lengths = [6, 11, 3, 9, 14]
    try:
        alone = [
            run(alone_engine, p, temperature=0, max_tokens=n, ignore_eos=True)
            for p, n in zip(PROMPTS, lengths, strict=True)
        ]
    finally:
        alone_engine.stop()

    eng = Engine(model, CharTokenizer(), max_batch=2, max_seq_len=64)
    eng.start()

    async def together() -> list[tuple[list[int], str, str]]:
        handles = [
            eng.submit(GenerationRequest(p, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)))
            for p, n in zip(PROMPTS, lengths, strict=True)
        ]
        assert eng.num_waiting + eng.num_running <= 5
        results = await asyncio.gather(*(h.result() for h in handles))
        return [(r.token_ids, r.text, r.finish_reason) for r in results]

    try:
        assert asyncio.run(together()) == alone
        assert eng.cache.num_free == 2
    finally:
        eng.stop()
    assert [len(t) for t, _, _ in alone] == lengths
    assert all(reason == "length" for _, _, reason in alone)


def test_streamed_events(engine: Engine) -> None:
    async def stream() -> list[tuple[int | None, str, str | None]]:
        handle = engine.submit(
            GenerationRequest([1, 2, 3], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
        )
        return [(e.token_id, e.text_delta, e.finish_reason) async for e in handle]

    events = asyncio.run(stream())
    assert len(events) == 5
    assert [r for _, _, r in events] == [None] * 4 + ["length"]
    assert "".join(d for _, d, _ in events) == CharTokenizer().decode([t for t, _, _ in events if t is not None])


def test_max_tokens_is_respected(engine: Engine) -> None:
    tokens, text, reason = run(engine, [4, 5, 6], temperature=1.0, seed=3, max_tokens=7, ignore_eos=True)
    assert (len(tokens), reason) == (7, "length")
    assert text == CharTokenizer().decode(tokens)


def test_context_limit_ends_with_length(engine: Engine) -> None:
    tokens, _, reason = run(engine, list(range(10, 73)), temperature=0, max_tokens=50, ignore_eos=True)
    assert (len(tokens), reason) == (1, "length")  # 63 prompt tokens + 1 fill the 64-token context


def test_prompt_too_long_is_a_value_error(engine: Engine) -> None:
    with pytest.raises(PromptTooLongError, match="64"):
        engine.submit(GenerationRequest(list(range(10, 74))))
    assert issubclass(PromptTooLongError, ValueError)
    with pytest.raises(InvalidRequestError):
        engine.submit(GenerationRequest([]))
    with pytest.raises(InvalidRequestError):
        engine.submit(GenerationRequest([512]))  # vocab is 512
    assert run(engine, [1, 2], temperature=0, max_tokens=2, ignore_eos=True)[2] == "length"  # still serving


def test_stop_strings_cut_the_text(engine: Engine) -> None:
    prompt = [7, 8, 9, 10]
    _, full, _ = run(engine, prompt, temperature=0, max_tokens=30, ignore_eos=True)
    assert len(full) == 30
    stop = full[12:15]
    expected = full[: full.find(stop)]

    handle = engine.submit(
        GenerationRequest(
            prompt, SamplingParams(temperature=0, max_tokens=30, stop=(stop, "never seen"), ignore_eos=True)
        )
    )
    deltas = [e.text_delta for e in handle]
    result_text = "".join(deltas)
    assert result_text == expected
    assert stop not in result_text
    assert len(deltas) == full.find(stop) + len(stop)  # generation ended on the token completing the stop string


def test_stop_token_ends_generation(engine: Engine) -> None:
    tokens, _, _ = run(engine, [20, 21], temperature=0, max_tokens=12, ignore_eos=True)
    stop_token = tokens[5]
    cut = tokens.index(stop_token)
    got, text, reason = run(engine, [20, 21], temperature=0, max_tokens=12, stop_token_ids=[stop_token])
    assert (got, reason) == (tokens[: cut + 1], "stop")  # the stop token is reported ...
    assert text == CharTokenizer().decode(tokens[:cut])  # ... but is not text


def test_seeded_sampling_reproduces_and_seeds_differ(engine: Engine) -> None:
    params = {"temperature": 1.0, "top_p": 0.95, "max_tokens": 16, "ignore_eos": True}
    a = run(engine, [3, 4, 5], seed=1234, **params)[0]
    b = run(engine, [3, 4, 5], seed=1234, **params)[0]
    c = run(engine, [3, 4, 5], seed=4321, **params)[0]
    assert a == b
    assert a != c


def test_cancel_frees_the_slot(roomy_engine: Engine) -> None:
    """A 2-slot engine: two endless requests are cancelled; two more are then served to the end."""
    long = SamplingParams(temperature=0, max_tokens=10_000, ignore_eos=True)  # only the context ends it
    first = [roomy_engine.submit(GenerationRequest([1, 2, 3], long)) for _ in range(2)]
    queued = roomy_engine.submit(GenerationRequest([4, 5], long))
    for handle in first:
        next(iter(handle))  # running: it produced a token
    assert roomy_engine.num_running == 2
    queued.cancel()  # cancelled while still waiting for a slot
    for handle in first:
        handle.cancel()
    for handle in [*first, queued]:
        assert [e.finish_reason for e in handle][-1] == "cancelled"
    _wait_for(lambda: roomy_engine.cache.num_free == 2)
    later = [run(roomy_engine, [6, 7], temperature=0, max_tokens=4, ignore_eos=True) for _ in range(2)]
    assert all(len(t) == 4 for t, _, _ in later)
    _wait_for(lambda: roomy_engine.cache.num_free == 2)


def test_async_cancel_of_a_stream(roomy_engine: Engine) -> None:
    async def client() -> list[str | None]:
        handle = roomy_engine.submit(
            GenerationRequest([1, 2, 3], SamplingParams(temperature=0, max_tokens=1000, ignore_eos=True))
        )
        reasons = []
        async for event in handle:
            reasons.append(event.finish_reason)
            if len(reasons) == 3:
                handle.cancel()
        return reasons

    reasons = asyncio.run(client())
    assert reasons[-1] == "cancelled"
    _wait_for(lambda: roomy_engine.cache.num_free == 2)


def test_stop_drains_then_refuses(model: LlamaForCausalLM) -> None:
    eng = Engine(model, CharTokenizer(), max_batch=2, max_seq_len=64)
    eng.start()
    handles = [
        eng.submit(GenerationRequest([1, 2], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)))
        for _ in range(3)
    ]
    assert eng.stop(drain_timeout=30) is True
    assert all(h.result_sync().finish_reason == "length" for h in handles)
    with pytest.raises(EngineStoppedError):
        eng.submit(GenerationRequest([1]))


def test_stop_past_the_drain_timeout_cancels(model: LlamaForCausalLM) -> None:
    eng = Engine(model, CharTokenizer(), max_batch=1, max_seq_len=512)
    eng.start()
    endless = SamplingParams(temperature=0, max_tokens=10_000, ignore_eos=True)
    handles: list[RequestHandle] = [eng.submit(GenerationRequest([1, 2], endless)) for _ in range(2)]
    next(iter(handles[0]))
    assert eng.stop(drain_timeout=0) is False
    results = [h.result_sync() for h in handles]
    assert [r.finish_reason for r in results] == ["cancelled", "cancelled"]
    assert all(r.error for r in results)


def _wait_for(condition: object, timeout: float = 5.0) -> None:
    """The scheduler frees a slot before delivering the finishing event, but give it a moment anyway."""
    assert callable(condition)
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_engine_from_snapshot(tmp_path: Path) -> None:
    model_dir = write_random_model(tmp_path / "m", "llama", "tiny", dtype=torch.float32, seed=9)
    snap = restore(build_snapshot(model_dir, (tmp_path / "store").as_uri(), chunk_size=64 << 10).uri)
    eng = Engine.from_snapshot(snap, CharTokenizer(), max_batch=2, max_seq_len=32)
    assert eng.max_seq_len == 32 and eng.config.vocab_size == 512 and eng.eos_token_ids == {EOS}
    eng.start()
    try:
        tokens, _, reason = run(eng, [1, 2, 3], temperature=0, max_tokens=3, ignore_eos=True)
        assert (len(tokens), reason) == (3, "length")
    finally:
        eng.stop()


def test_a_failing_forward_fails_its_requests_not_the_engine(model: LlamaForCausalLM) -> None:
    class Flaky:
        """The model, except that its first call raises (an OOM, a device error)."""

        def __init__(self) -> None:
            self.calls = 0

        def __call__(self, *args: object, **kwargs: object) -> torch.Tensor:
            self.calls += 1
            if self.calls == 1:
                raise RuntimeError("device on fire")
            out: torch.Tensor = model(*args, **kwargs)
            return out

    eng = Engine(model, CharTokenizer(), max_batch=2, max_seq_len=64)
    eng.model = Flaky()  # type: ignore[assignment]
    eng.start()
    try:
        failed = eng.submit(GenerationRequest([1, 2], SamplingParams(temperature=0, max_tokens=3))).result_sync()
        assert (failed.finish_reason, failed.error) == ("error", "RuntimeError: device on fire")
        assert run(eng, [1, 2], temperature=0, max_tokens=3, ignore_eos=True)[2] == "length"
        assert eng.cache.num_free == 2
    finally:
        eng.stop()


def test_token_logprobs_are_the_raw_distribution_per_row() -> None:
    from kold.runtime.sampling import token_logprobs

    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(2))
    tokens = [4, 7, int(logits[2].argmax())]
    out = token_logprobs(logits, tokens, [None, 0, 3])
    assert out[0] is None  # row 0 did not ask
    logp = torch.log_softmax(logits, dim=-1)
    assert out[1] is not None and out[1].top == () and out[1].logprob == pytest.approx(float(logp[1, 7]))
    values, ids = torch.topk(logp[2], 3)
    assert out[2] is not None and [t for t, _ in out[2].top] == ids.tolist()
    assert [v for _, v in out[2].top] == pytest.approx(values.tolist()) and out[2].logprob == pytest.approx(values[0])


def test_engine_events_carry_logprobs_only_for_requests_that_ask(engine: Engine, model: LlamaForCausalLM) -> None:
    """Two requests in one batch, one asking: its events carry the model's log_softmax at each step."""
    prompt = [5, 9, 13]
    asking = engine.submit(GenerationRequest(prompt, SamplingParams(max_tokens=6, temperature=0, logprobs=2)))
    other = engine.submit(GenerationRequest(prompt, SamplingParams(max_tokens=6, temperature=0)))
    events, plain = list(asking), list(other)
    assert all(e.logprob is None and e.top_logprobs == () for e in plain)
    ids = [e.token_id for e in events if e.token_id is not None]
    assert ids == [e.token_id for e in plain]
    full = prompt + ids
    n = len(full)
    cache = KVCache(model.config, 1, n, model.dtype, model.device)
    with torch.inference_mode():
        logits = model(torch.tensor([full]), torch.arange(n)[None], cache, torch.tensor([0]), kv_len=n, last_only=False)
    logp = torch.log_softmax(logits[0].float(), dim=-1)
    for i, e in enumerate(events):
        dist = logp[len(prompt) - 1 + i]
        assert e.logprob == pytest.approx(float(dist[ids[i]]), abs=1e-3)
        assert [t for t, _ in e.top_logprobs] == torch.topk(dist, 2).indices.tolist()
