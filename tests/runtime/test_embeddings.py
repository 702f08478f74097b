"""`/v1/embeddings` (runtime/embeddings.py): a real runtime on a tiny random Llama, through the official
`openai` client and raw HTTP, checked against transformers' own last hidden state; its 400s; beside a
running generation; and the endpoint in process over a real model (waiting for the weights, the
request's token budget)."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
import torch
import transformers
from runtime_helpers import FakeBackend, RuntimeProcess, app_client

from kold.runtime.backend import EngineBackend
from kold.runtime.embeddings import EmbeddingLimits, batches

CONTEXT = 256
HIDDEN = 64  # the tiny model's hidden size
TEXTS = ["the quick brown fox", "jumps over the lazy dog", "a", "Ünïcödé ✓ and emoji 🦊"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from kold.modelgen import write_random_model

    return write_random_model(tmp_path_factory.mktemp("embed-model") / "tiny", "llama", "tiny", seed=11)


@pytest.fixture(scope="module")
def snapshot(model_dir: Path) -> str:
    from kold.snapshot import build_snapshot

    return build_snapshot(model_dir, (model_dir.parent / "store").as_uri(), chunk_size=64 << 10).uri


@pytest.fixture(scope="module")
def rt(snapshot: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RuntimeProcess]:
    """A runtime computing in float32 (the reference below is transformers in float32)."""
    process = RuntimeProcess(
        snapshot, tmp_path_factory.mktemp("embed-rt"), "--max-batch", "4", "--max-seq-len", str(CONTEXT),
        "--served-model-name", "tiny", "--dtype", "float32",
    )  # fmt: skip
    try:
        process.wait_listening()
        process.wait_ready()
        yield process
    finally:
        process.kill()


@pytest.fixture(scope="module")
def reference(model_dir: Path) -> tuple[Any, Any]:
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    return model, tokenizer


def client(rt: RuntimeProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{rt.base}/v1", api_key="x", max_retries=0, timeout=60)


def expected(reference: tuple[Any, Any], ids: list[int]) -> np.ndarray:
    """transformers' last hidden state (after the final norm), meaned over every token but a leading
    BOS, normalised: what the endpoint documents."""
    model, tokenizer = reference
    with torch.inference_mode():
        hidden = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0]
    pooled = hidden[1:] if len(ids) > 1 and ids[0] == tokenizer.bos_token_id else hidden
    mean = pooled.mean(dim=0)
    return (mean / mean.norm()).numpy()


def post(rt: RuntimeProcess, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{rt.base}/v1/embeddings", json=body, timeout=60)


# -- the openai client against a real runtime ------------------------------------------------------------


def test_openai_client_embeds_texts_as_unit_vectors_of_the_hidden_size(rt: RuntimeProcess) -> None:
    sdk = client(rt)
    # the client asks for base64 unless told otherwise, and decodes it itself
    batch = sdk.embeddings.create(model="tiny", input=TEXTS)
    assert batch.object == "list" and batch.model == "tiny"
    assert [d.index for d in batch.data] == list(range(len(TEXTS)))
    vectors = np.array([d.embedding for d in batch.data], dtype=np.float32)
    assert vectors.shape == (len(TEXTS), HIDDEN)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    # different texts, different vectors
    assert not np.allclose(vectors[0], vectors[1], atol=1e-3)
    # each text alone gives its vector in the batch (rows padded beside longer ones are unchanged)
    for text, row in zip(TEXTS, vectors, strict=True):
        alone = sdk.embeddings.create(model="tiny", input=text, encoding_format="float")
        np.testing.assert_allclose(np.array(alone.data[0].embedding), row, atol=1e-5)
        again = sdk.embeddings.create(model="tiny", input=text, encoding_format="float")
        assert again.data[0].embedding == alone.data[0].embedding  # the same text, the same vector
    assert batch.usage.prompt_tokens == batch.usage.total_tokens > len(TEXTS)


def test_vectors_equal_transformers_mean_pooled_last_hidden_state(
    rt: RuntimeProcess, reference: tuple[Any, Any]
) -> None:
    _, tokenizer = reference
    sdk = client(rt)
    got = sdk.embeddings.create(model="tiny", input=TEXTS, encoding_format="float")
    tokens = 0
    for text, item in zip(TEXTS, got.data, strict=True):
        ids = tokenizer(text).input_ids
        assert ids[0] == tokenizer.bos_token_id  # pooled without it
        tokens += len(ids)
        np.testing.assert_allclose(np.array(item.embedding), expected(reference, ids), atol=2e-5)
    assert got.usage.prompt_tokens == tokens  # the BOS runs through the model: it is counted
    # token ids are taken as they are: a list of ids, and a list of lists, one of a single token
    id_lists = [[5, 17, 300, 42, 9], [1, 77, 78], [255], [1]]
    one = sdk.embeddings.create(model="tiny", input=id_lists[0], encoding_format="float")
    np.testing.assert_allclose(np.array(one.data[0].embedding), expected(reference, id_lists[0]), atol=2e-5)
    many = sdk.embeddings.create(model="tiny", input=id_lists, encoding_format="float")
    for ids, item in zip(id_lists, many.data, strict=True):
        np.testing.assert_allclose(np.array(item.embedding), expected(reference, ids), atol=2e-5)
    assert many.usage.prompt_tokens == sum(map(len, id_lists))


def test_base64_is_the_float32_bytes_of_the_float_answer(rt: RuntimeProcess) -> None:
    floats = post(rt, {"model": "tiny", "input": TEXTS})
    packed = post(rt, {"model": "tiny", "input": TEXTS, "encoding_format": "base64", "user": "ignored"})
    assert floats.status_code == packed.status_code == 200, (floats.text, packed.text)
    assert floats.headers["content-type"] == "application/json"
    for f, b in zip(floats.json()["data"], packed.json()["data"], strict=True):
        assert isinstance(b["embedding"], str)
        decoded = np.frombuffer(base64.b64decode(b["embedding"]), dtype="<f4")
        assert decoded.tolist() == np.array(f["embedding"], dtype=np.float32).tolist()  # bit for bit
    body = floats.json()
    assert set(body["usage"]) == {"prompt_tokens", "total_tokens"}
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] > len(TEXTS)
    # dimensions equal to the hidden size is no change
    same = post(rt, {"model": "tiny", "input": TEXTS, "dimensions": HIDDEN})
    assert same.json()["data"] == body["data"]
    # the request's own line in the runtime's log
    deadline = time.monotonic() + 5
    while not [e for e in rt.events("request") if e.get("endpoint") == "embeddings" and e["status"] == "200"]:
        assert time.monotonic() < deadline, rt.output
        time.sleep(0.05)
    line = [e for e in rt.events("request") if e.get("endpoint") == "embeddings"][-1]
    assert line["inputs"] == len(TEXTS) and line["prompt_tokens"] == body["usage"]["prompt_tokens"]
    metrics = httpx.get(f"{rt.base}/metrics").text
    assert 'kold_requests_total{endpoint="embeddings",status="200"}' in metrics


BAD = [
    ({"input": ""}, 400, "input", "input must not be empty"),
    ({"input": []}, 400, "input", "input must not be empty"),
    ({"input": ["a", ""]}, 400, "input", "input[1] must not be empty"),
    ({"input": [[1, 2], []]}, 400, "input", "input[1] must not be empty"),
    ({"input": 7}, 400, "input", None),
    ({"input": [1.5]}, 400, "input", None),
    ({"input": [1, "a"]}, 400, "input", None),
    ({"input": [["a"]]}, 400, "input", None),
    ({"input": [True, False]}, 400, "input", None),
    ({"input": {"text": "a"}}, 400, "input", None),
    ({"input": None}, 400, "input", None),
    ({}, 400, "input", None),
    ({"input": [3, 512]}, 400, "input", "token ids must be in [0, 512)"),
    ({"input": [[3], [-1]]}, 400, "input", "input[1]: token ids must be in [0, 512)"),
    ({"input": [3] * (CONTEXT + 1)}, 400, "input", f"maximum context length is {CONTEXT} tokens"),
    ({"input": ["ok", "x " * 400]}, 400, "input", "input[1]"),
    ({"input": "x" * 100_000}, 400, "input", "maximum context length"),
    ({"input": ["a"] * 2049}, 400, "input", "at most 2048"),
    ({"input": "a", "dimensions": 32}, 400, "dimensions", f"hidden size, {HIDDEN}"),
    ({"input": "a", "dimensions": 0}, 400, "dimensions", None),
    ({"input": "a", "encoding_format": "int8"}, 400, "encoding_format", None),
    ({"input": "a", "model": "other"}, 404, "model", "does not exist"),
    ({"input": "a", "model": 3}, 400, "model", None),
]


@pytest.mark.parametrize(("change", "status", "param", "message"), BAD)
def test_bad_input_is_an_openai_error(
    rt: RuntimeProcess, change: dict[str, Any], status: int, param: str, message: str | None
) -> None:
    r = post(rt, {"model": "tiny", **change})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error", error
    if message is not None:
        assert message in error["message"], error


def test_openai_client_sees_400s(rt: RuntimeProcess) -> None:
    sdk = client(rt)
    with pytest.raises(openai.BadRequestError) as empty:
        sdk.embeddings.create(model="tiny", input="")
    assert empty.value.status_code == 400
    with pytest.raises(openai.BadRequestError) as dims:
        sdk.embeddings.create(model="tiny", input="hi", dimensions=8)
    assert "dimensions" in str(dims.value)
    with pytest.raises(openai.NotFoundError):
        sdk.embeddings.create(model="nope", input="hi")


# -- beside a running generation -----------------------------------------------------------------


def test_embeddings_beside_a_generation_change_neither(rt: RuntimeProcess) -> None:
    """A greedy generation gives the same tokens whether or not embeddings run meanwhile, and the
    embeddings computed meanwhile equal those computed alone."""
    gen = {"model": "tiny", "prompt": "once upon a time", "max_tokens": 200, "temperature": 0, "ignore_eos": True}
    alone = httpx.post(f"{rt.base}/v1/completions", json=gen, timeout=120).json()["choices"][0]["text"]
    quiet = post(rt, {"model": "tiny", "input": TEXTS}).json()["data"]

    chunks: list[str] = []
    started, done = threading.Event(), threading.Event()

    def generate() -> None:
        with httpx.stream("POST", f"{rt.base}/v1/completions", json={**gen, "stream": True}, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    chunks.append(json.loads(line[6:])["choices"][0]["text"])
                    started.set()
        done.set()

    thread = threading.Thread(target=generate)
    thread.start()
    assert started.wait(60)
    beside = 0
    answers = []
    while not done.is_set() or not answers:
        answers.append(post(rt, {"model": "tiny", "input": TEXTS}))
        beside += not done.is_set()
    thread.join(120)
    assert beside >= 1, "the generation ended before an embedding request did: nothing ran beside it"
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers if a.status_code != 200]
    for a in answers:
        for got, want in zip(a.json()["data"], quiet, strict=True):
            np.testing.assert_allclose(got["embedding"], want["embedding"], atol=1e-6)
    assert "".join(chunks) == alone


def test_concurrent_embedding_requests_each_get_their_own(rt: RuntimeProcess) -> None:
    singles = {t: post(rt, {"model": "tiny", "input": t}).json()["data"][0]["embedding"] for t in TEXTS}

    async def many() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=rt.base, timeout=60) as http:
            bodies = [{"model": "tiny", "input": [TEXTS[i % 4], TEXTS[(i + 1) % 4]]} for i in range(12)]
            return await asyncio.gather(*(http.post("/v1/embeddings", json=b) for b in bodies))

    for i, r in enumerate(asyncio.run(many())):
        assert r.status_code == 200, r.text
        data = r.json()["data"]
        np.testing.assert_allclose(data[0]["embedding"], singles[TEXTS[i % 4]], atol=1e-5)
        np.testing.assert_allclose(data[1]["embedding"], singles[TEXTS[(i + 1) % 4]], atol=1e-5)


# -- in process, over a real model ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine_backend(snapshot: str) -> EngineBackend:
    """A real model and tokenizer behind the service's interface; its engine is never started (the
    endpoint does not use the scheduler)."""
    from kold.runtime.engine import Engine
    from kold.runtime.tokenizer import Tokenizer
    from kold.snapshot import restore

    snap = restore(snapshot, "cpu")
    tokenizer = Tokenizer.from_files(snap.files)
    return EngineBackend(Engine.from_snapshot(snap, tokenizer, max_batch=1, max_seq_len=64), tokenizer)


def test_a_request_waits_for_the_weights_then_is_answered(engine_backend: EngineBackend) -> None:
    async def go() -> None:
        async with app_client(engine_backend, release=False) as (http, runtime, loader):  # type: ignore[arg-type]
            pending = asyncio.ensure_future(http.post("/v1/embeddings", json={"model": "fake", "input": "hello"}))
            await asyncio.sleep(0.3)
            assert not pending.done() and runtime.lifecycle.waiting == 1
            loader.release.set()
            r = await asyncio.wait_for(pending, 30)
            assert r.status_code == 200, r.text
            assert float(r.headers["x-kold-queue-ms"]) >= 250
            assert "x-kold-cold-start-ms" in {k.lower() for k in r.headers}
            vector = np.array(r.json()["data"][0]["embedding"])
            assert vector.shape == (HIDDEN,) and abs(np.linalg.norm(vector) - 1) < 1e-5

    asyncio.run(go())


def test_the_request_token_budget_and_the_model_context(engine_backend: EngineBackend) -> None:
    async def go() -> None:
        async with app_client(engine_backend) as (http, runtime, _):  # type: ignore[arg-type]
            runtime.embeddings.limits = EmbeddingLimits(max_inputs=5, max_request_tokens=40)
            ok = await http.post("/v1/embeddings", json={"model": "fake", "input": [[3] * 20, [4] * 20]})
            assert ok.status_code == 200 and ok.json()["usage"]["prompt_tokens"] == 40
            over = await http.post("/v1/embeddings", json={"model": "fake", "input": [[3] * 20, [4] * 21]})
            assert over.status_code == 400 and "more than 40 tokens" in over.json()["error"]["message"]
            many = await http.post("/v1/embeddings", json={"model": "fake", "input": ["a"] * 6})
            assert many.status_code == 400 and "at most 5" in many.json()["error"]["message"]
            # this engine's context is 64: 64 tokens embed (no room for a generated token is needed), 65 do not
            runtime.embeddings.limits = EmbeddingLimits()
            fits = await http.post("/v1/embeddings", json={"model": "fake", "input": [3] * 64})
            assert fits.status_code == 200, fits.text
            long = await http.post("/v1/embeddings", json={"model": "fake", "input": [3] * 65})
            assert long.status_code == 400 and long.json()["error"]["code"] == "context_length_exceeded"

    asyncio.run(go())


def test_a_backend_without_a_hidden_state_refuses() -> None:
    async def go() -> None:
        async with app_client(FakeBackend()) as (http, _, _):
            r = await http.post("/v1/embeddings", json={"model": "fake", "input": "hello"})
            assert r.status_code == 400 and "hidden state" in r.json()["error"]["message"]

    asyncio.run(go())


def test_batches_pack_longest_first_within_the_budget() -> None:
    assert batches([3, 10, 5, 10], max_tokens=20, max_rows=8) == [[1, 3], [2, 0]]
    assert batches([30, 2], max_tokens=20, max_rows=8) == [[0], [1]]  # one input is always a batch
    assert batches([1] * 5, max_tokens=100, max_rows=2) == [[0, 1], [2, 3], [4]]
    lengths = [7, 1, 12, 3, 3, 9, 2]
    packed = batches(lengths, max_tokens=16, max_rows=3)
    assert sorted(i for b in packed for i in b) == list(range(len(lengths)))
    assert all(len(b) * max(lengths[i] for i in b) <= 16 or len(b) == 1 for b in packed)


def test_the_embedder_keeps_each_forward_within_the_token_budget() -> None:
    """On a model whose context is past the budget, a forward is still at most `batch_tokens` padded
    tokens, but for one input over the budget alone; the vectors are those of each input alone."""
    from test_model import VARIANTS, checkpoint, hf_model, ours

    from kold.runtime.config import ModelConfig
    from kold.runtime.embeddings import Embedder, Tokenized

    config = ModelConfig.from_hf(VARIANTS["llama2"])  # a context of 256
    model = ours(config, checkpoint(hf_model(VARIANTS["llama2"]), config))

    forwards: list[list[int]] = []

    class Recording(Embedder):
        def _forward(self, ids: list[list[int]], starts: list[int]) -> torch.Tensor:
            forwards.append([len(x) for x in ids])
            return super()._forward(ids, starts)

    gen = torch.Generator().manual_seed(6)
    lengths = [40, 20, 10, 10, 10, 5, 5, 3]
    ids = [torch.randint(3, config.vocab_size, (n,), generator=gen).tolist() for n in lengths]
    tokenized = Tokenized(ids, [0] * len(ids))
    embedder = Recording(model)
    try:
        got = asyncio.run(embedder.embed(tokenized, EmbeddingLimits(batch_tokens=32)))
        alone = [asyncio.run(embedder.embed(Tokenized([x], [0]), EmbeddingLimits()))[0] for x in ids]
    finally:
        embedder.close()
    batched = forwards[: -len(ids)]
    assert sorted(n for b in batched for n in b) == sorted(lengths)
    assert [40] in batched and all(len(b) * max(b) <= 32 for b in batched if b != [40]), batched
    torch.testing.assert_close(got, torch.stack(alone), atol=1e-5, rtol=1e-5)


# -- the model's hidden state ----------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["llama2", "llama3-scaled-tied", "mistral", "qwen2"])
def test_final_hidden_states_equal_transformers_for_every_variant(variant: str) -> None:
    """Every architecture (Mistral's sliding window of 12 takes the masked path at 20 tokens, a single
    token too), right-padded rows included; and the LM head over it gives `forward`'s logits."""
    from test_model import VARIANTS, checkpoint, hf_model, ours

    from kold.runtime.config import ModelConfig
    from kold.runtime.kvcache import KVCache

    config = ModelConfig.from_hf(VARIANTS[variant])
    reference = hf_model(VARIANTS[variant])
    model = ours(config, checkpoint(reference, config))
    ids = torch.randint(3, config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        want = reference(ids, output_hidden_states=True).hidden_states[-1]
        got = model.final_hidden_states(ids)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        padded = torch.cat([torch.cat([ids, torch.zeros(1, 6, dtype=torch.long)], 1), torch.cat([ids[:, :1]] * 26, 1)])
        torch.testing.assert_close(model.final_hidden_states(padded)[:1, :20], want, atol=1e-5, rtol=1e-5)
        one = model.final_hidden_states(ids[:, :1])
        torch.testing.assert_close(one, reference(ids[:, :1], output_hidden_states=True).hidden_states[-1])
        logits = model(ids, torch.arange(20)[None], KVCache(config, 1, 32, torch.float32), torch.tensor([0]))
        torch.testing.assert_close(model.lm_head(got), logits)


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")],
        ),
    ],
)
def test_final_hidden_states_from_another_thread_leave_decoding_alone(device: str) -> None:
    """What the runtime does: one thread decodes through the KV cache while another computes hidden
    states on the same model; each gets exactly what it gets alone."""
    from test_model import VARIANTS, checkpoint, hf_model, ours

    from kold.runtime.config import ModelConfig
    from kold.runtime.kvcache import KVCache

    config = ModelConfig.from_hf(VARIANTS["llama2"])
    model = ours(config, checkpoint(hf_model(VARIANTS["llama2"]), config)).to(device)
    ids = torch.randint(3, config.vocab_size, (3, 17), generator=torch.Generator().manual_seed(5)).to(device)

    def decode() -> list[int]:
        with torch.inference_mode():
            cache = KVCache(config, 1, 96, torch.float32, torch.device(device))
            slot = torch.tensor([0], device=device)
            logits = model(ids[:1], torch.arange(17, device=device)[None], cache, slot)
            out = [int(logits[0, -1].argmax())]
            for i in range(40):
                pos = torch.tensor([[17 + i]], device=device)
                out.append(int(model(torch.tensor([[out[-1]]], device=device), pos, cache, slot)[0, -1].argmax()))
            return out

    def hidden() -> torch.Tensor:
        with torch.inference_mode():
            return model.final_hidden_states(ids).cpu()

    tokens_alone, hidden_alone = decode(), hidden()
    results: dict[str, Any] = {}
    stop = threading.Event()

    def embed_meanwhile() -> None:
        got = []
        while not stop.is_set() or not got:
            got.append(hidden())
        results["hidden"] = got

    thread = threading.Thread(target=embed_meanwhile)
    thread.start()
    try:
        results["tokens"] = [decode() for _ in range(2)]
    finally:
        stop.set()
        thread.join(60)
    assert results["tokens"] == [tokens_alone] * 2
    assert len(results["hidden"]) >= 2
    for h in results["hidden"]:
        torch.testing.assert_close(h, hidden_alone, atol=0, rtol=0)
