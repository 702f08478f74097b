"""OpenAI request parameters through HTTP: presence/frequency penalties, logprobs (chat and
completions, streamed and not), and tool choices that name no tool (tools themselves: test_tools*.py).

The numbers are checked against a direct computation: the same snapshot restored in this process,
its full forward pass over prompt + generated tokens, `log_softmax` of the logits, and greedy
decoding with the penalties applied by hand. The runtime computes in float32 here (`--dtype`), so
its batched, KV-cached decode and the direct forward agree to float32 rounding.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
import torch
from runtime_helpers import RuntimeProcess, app_client, parse_sse, run

from kold.runtime.kvcache import KVCache
from kold.runtime.model import build_model
from kold.runtime.tokenizer import Tokenizer
from kold.snapshot import restore

pytestmark = pytest.mark.timeout(180)

TOL = 1e-3  # float32: batched decode vs one full forward


class Reference:
    """The model computed directly: full forward passes, no engine, no server."""

    def __init__(self, uri: str) -> None:
        snap = restore(uri)
        self.model = build_model(snap, compute_dtype=torch.float32)
        self.tok = Tokenizer.from_files(snap.files)
        vocab = self.model.config.vocab_size
        normal = [i for i in range(vocab) if i not in self.tok.special_token_ids]
        self.by_bytes = {self.tok.token_bytes(i): i for i in normal}
        assert len(self.by_bytes) == len(normal)  # a byte-level vocabulary: bytes name a token

    def logprobs(self, ids: list[int]) -> torch.Tensor:
        """`[len(ids), V]`: row p is the log-distribution of the token after ids[: p + 1]."""
        n = len(ids)
        cache = KVCache(self.model.config, 1, n, self.model.dtype, self.model.device)
        with torch.inference_mode():
            logits = self.model(
                torch.tensor([ids]), torch.arange(n)[None], cache, torch.tensor([0]), kv_len=n, last_only=False
            )
        return torch.log_softmax(logits[0].float(), dim=-1)

    def greedy(self, prompt: list[int], n: int, presence: float = 0.0, frequency: float = 0.0) -> list[int]:
        """Greedy decoding, each step's logits lowered by OpenAI's penalties over the tokens so far."""
        out: list[int] = []
        for _ in range(n):
            logits = self.logprobs(prompt + out)[-1]  # log_softmax keeps the argmax of logits - penalties
            counts = torch.zeros_like(logits)
            for t in out:
                counts[t] += 1
            out.append(int(torch.argmax(logits - frequency * counts - presence * (counts > 0).float())))
        return out

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        return self.tok.encode(self.tok.apply_chat_template(messages), add_special_tokens=False)


@pytest.fixture(scope="module")
def ref(tiny_snapshot: str) -> Reference:
    return Reference(tiny_snapshot)


@pytest.fixture(scope="module")
def rt(tiny_snapshot: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RuntimeProcess]:
    process = RuntimeProcess(
        tiny_snapshot,
        tmp_path_factory.mktemp("params-runtime"),
        *("--dtype", "float32", "--max-batch", "4", "--max-seq-len", "128", "--served-model-name", "tiny"),
    )
    try:
        process.wait_listening()
        process.wait_ready()
        yield process
    finally:
        process.kill()


def post(rt: RuntimeProcess, path: str, body: dict[str, Any]) -> dict[str, Any]:
    r = httpx.post(f"{rt.base}{path}", json={"model": "tiny", **body}, timeout=60)
    assert r.status_code == 200, r.text
    data: dict[str, Any] = r.json()
    return data


def stream(rt: RuntimeProcess, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    r = httpx.post(f"{rt.base}{path}", json={"model": "tiny", "stream": True, **body}, timeout=60)
    assert r.status_code == 200, r.text
    return parse_sse(r.text)


def chat_ids(ref: Reference, content: list[dict[str, Any]]) -> list[int]:
    return [ref.by_bytes[bytes(e["bytes"])] for e in content]


def completion_ids(ref: Reference, tokens: list[str]) -> list[int]:
    by_text = {raw.decode("utf-8", errors="backslashreplace"): i for raw, i in ref.by_bytes.items()}
    return [by_text[t] for t in tokens]


PROMPT = "Once upon a time"
MESSAGES = [{"role": "user", "content": "Tell me a story."}]


# -- penalties --------------------------------------------------------------------------------------


def test_a_frequency_penalty_stops_greedy_repeats_each_row_with_its_own(rt: RuntimeProcess, ref: Reference) -> None:
    prompt = ref.tok.encode(PROMPT)
    plain_ref = ref.greedy(prompt, 40)
    penalized_ref = ref.greedy(prompt, 24, frequency=2.0)
    assert max(Counter(plain_ref).values()) > 2  # the random model loops when greedy
    assert max(Counter(penalized_ref).values()) == 1  # a generated token lost 2 per use: never again
    body = {"prompt": prompt, "temperature": 0, "ignore_eos": True, "logprobs": 0}

    # sent together, they decode in one batch: each row is penalized by its own request's settings
    with ThreadPoolExecutor(2) as pool:
        plain_f = pool.submit(post, rt, "/v1/completions", {**body, "max_tokens": 40})
        penalized_f = pool.submit(post, rt, "/v1/completions", {**body, "max_tokens": 24, "frequency_penalty": 2.0})
        plain, penalized = plain_f.result(), penalized_f.result()
    assert completion_ids(ref, plain["choices"][0]["logprobs"]["tokens"]) == plain_ref
    assert completion_ids(ref, penalized["choices"][0]["logprobs"]["tokens"]) == penalized_ref

    # a negative penalty rewards repeats
    eager_ref = ref.greedy(prompt, 24, frequency=-2.0)
    assert max(Counter(eager_ref).values()) > max(Counter(plain_ref[:24]).values())
    eager = post(rt, "/v1/completions", {**body, "max_tokens": 24, "frequency_penalty": -2.0})
    assert completion_ids(ref, eager["choices"][0]["logprobs"]["tokens"]) == eager_ref


def test_penalties_in_chat_streamed_and_not(rt: RuntimeProcess, ref: Reference) -> None:
    expected = ref.greedy(ref.chat_prompt(MESSAGES), 20, presence=1.5, frequency=0.5)
    body = {
        "messages": MESSAGES,
        "max_tokens": 20,
        "temperature": 0,
        "ignore_eos": True,
        "presence_penalty": 1.5,
        "frequency_penalty": 0.5,
        "logprobs": True,
    }
    whole = post(rt, "/v1/chat/completions", body)
    assert chat_ids(ref, whole["choices"][0]["logprobs"]["content"]) == expected
    chunks = stream(rt, "/v1/chat/completions", body)
    content = [e for c in chunks for ch in c["choices"] if ch["logprobs"] for e in ch["logprobs"]["content"]]
    assert chat_ids(ref, content) == expected
    text = "".join(ch["delta"].get("content") or "" for c in chunks for ch in c["choices"])
    assert text == whole["choices"][0]["message"]["content"]


# -- logprobs ---------------------------------------------------------------------------------------


def test_completion_logprobs_are_the_models_streamed_and_not(rt: RuntimeProcess, ref: Reference) -> None:
    prompt = ref.tok.encode(PROMPT)
    expected = ref.greedy(prompt, 12)
    logp = ref.logprobs(prompt + expected)
    body = {"prompt": PROMPT, "max_tokens": 12, "temperature": 0, "ignore_eos": True, "logprobs": 3}
    whole = post(rt, "/v1/completions", body)
    lp = whole["choices"][0]["logprobs"]
    assert set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert completion_ids(ref, lp["tokens"]) == expected
    for i, token in enumerate(expected):
        dist = logp[len(prompt) - 1 + i]
        assert lp["token_logprobs"][i] == pytest.approx(float(dist[token]), abs=TOL)
        values, ids = torch.topk(dist, 3)
        top = {
            ref.tok.token_bytes(int(t)).decode("utf-8", "backslashreplace"): float(v)
            for v, t in zip(values, ids, strict=True)
        }
        top.setdefault(lp["tokens"][i], lp["token_logprobs"][i])  # the chosen token is always there
        assert lp["top_logprobs"][i] == pytest.approx(top, abs=TOL)
    offsets = lp["text_offset"]
    assert offsets[0] == 0 and offsets == sorted(offsets) and offsets[-1] <= len(whole["choices"][0]["text"])

    # streamed, two choices: each chunk carries its own tokens' entries, and together they are the same
    chunks = stream(rt, "/v1/completions", {**body, "n": 2})
    for index in (0, 1):
        parts = [ch["logprobs"] for c in chunks for ch in c["choices"] if ch["index"] == index and ch["logprobs"]]
        joined = {k: [v for p in parts for v in p[k]] for k in lp}
        assert joined["tokens"] == lp["tokens"] and joined["text_offset"] == lp["text_offset"]
        assert joined["token_logprobs"] == pytest.approx(lp["token_logprobs"], abs=TOL)  # a batch of two rows
        for got, want in zip(joined["top_logprobs"], lp["top_logprobs"], strict=True):
            assert got == pytest.approx(want, abs=TOL)


def test_chat_logprobs_are_raw_whatever_the_sampling_settings(rt: RuntimeProcess, ref: Reference) -> None:
    """Sampled at temperature 1.5 among the top 3: the logprobs are still the model's own distribution's."""
    body = {
        "messages": MESSAGES,
        "max_tokens": 10,
        "temperature": 1.5,
        "top_k": 3,
        "seed": 11,
        "ignore_eos": True,
        "logprobs": True,
        "top_logprobs": 5,
    }
    whole = post(rt, "/v1/chat/completions", body)
    content = whole["choices"][0]["logprobs"]["content"]
    ids = chat_ids(ref, content)
    prompt = ref.chat_prompt(MESSAGES)
    logp = ref.logprobs(prompt + ids)
    for i, (entry, token) in enumerate(zip(content, ids, strict=True)):
        dist = logp[len(prompt) - 1 + i]
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}
        assert entry["token"] == bytes(entry["bytes"]).decode("utf-8", "backslashreplace")
        assert entry["logprob"] == pytest.approx(float(dist[token]), abs=TOL)
        values, top_ids = torch.topk(dist, 5)
        assert [ref.by_bytes[bytes(t["bytes"])] for t in entry["top_logprobs"]] == top_ids.tolist()
        assert [t["logprob"] for t in entry["top_logprobs"]] == pytest.approx(values.tolist(), abs=TOL)
        assert token in top_ids[:3].tolist()  # top_k 3 did restrict the sampling
    chunks = stream(rt, "/v1/chat/completions", body)  # seeded: the same tokens, entry by entry
    streamed = [e for c in chunks for ch in c["choices"] if ch["logprobs"] for e in ch["logprobs"]["content"]]
    assert [e["bytes"] for e in streamed] == [e["bytes"] for e in content]
    for a, b in zip(streamed, content, strict=True):
        assert a["logprob"] == pytest.approx(b["logprob"], abs=1e-6)


def test_the_openai_sdk_parses_logprobs(rt: RuntimeProcess) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{rt.base}/v1", api_key="x", max_retries=0, timeout=60)
    chat = client.chat.completions.create(
        model="tiny",
        messages=MESSAGES,
        max_tokens=4,
        logprobs=True,
        top_logprobs=2,
        temperature=0,  # type: ignore[arg-type]
    )
    content = chat.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and 1 <= len(content) <= 4
    assert all(len(t.top_logprobs) == 2 and t.bytes is not None and t.logprob <= 0 for t in content)
    assert content[0].top_logprobs[0].logprob >= content[0].logprob - TOL  # greedy: the top one

    done = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, logprobs=2, temperature=0)
    lp = done.choices[0].logprobs
    assert lp is not None and lp.tokens and lp.token_logprobs and lp.top_logprobs and lp.text_offset is not None
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)

    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=MESSAGES,
            max_tokens=4,
            logprobs=True,
            stream=True,  # type: ignore[arg-type]
        )
    )
    entries = [
        t for c in chunks for ch in c.choices if ch.logprobs and ch.logprobs.content for t in ch.logprobs.content
    ]
    assert 1 <= len(entries) <= 4 and all(t.top_logprobs == [] for t in entries)
    plain = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2)  # type: ignore[arg-type]
    assert plain.choices[0].logprobs is None


# -- in process: validation and shapes over a fake backend ------------------------------------------

CHAT = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
COMPLETION = {"model": "fake", "prompt": "a b", "max_tokens": 2}


@pytest.mark.parametrize(
    ("endpoint", "extra", "param"),
    [
        ("chat", {"presence_penalty": 2.5}, "presence_penalty"),
        ("chat", {"frequency_penalty": -2.01}, "frequency_penalty"),
        ("completions", {"presence_penalty": -3}, "presence_penalty"),
        ("completions", {"frequency_penalty": 9}, "frequency_penalty"),
        ("chat", {"frequency_penalty": "1"}, "frequency_penalty"),
        ("chat", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ("chat", {"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
        ("chat", {"top_logprobs": 2}, "top_logprobs"),  # needs logprobs: true
        ("chat", {"logprobs": 1}, "logprobs"),
        ("completions", {"logprobs": 6}, "logprobs"),
        ("completions", {"logprobs": -1}, "logprobs"),
        ("completions", {"logprobs": True}, "logprobs"),
        ("completions", {"logprobs": 1, "echo": True}, "echo"),
        ("chat", {"tool_choice": "required"}, "tool_choice"),
        ("chat", {"function_call": {"name": "f"}}, "function_call"),
    ],
)
def test_bad_or_unsupported_parameters_get_a_400_naming_them(endpoint: str, extra: dict[str, Any], param: str) -> None:
    async def main() -> None:
        async with app_client() as (client, _, _):
            base = CHAT if endpoint == "chat" else COMPLETION
            r = await client.post(
                f"/v1/{'chat/completions' if endpoint == 'chat' else 'completions'}", json={**base, **extra}
            )
            assert r.status_code == 400, r.text
            assert r.json()["error"]["param"] == param, r.text

    run(main)


@pytest.mark.parametrize(
    ("endpoint", "extra"),
    [
        ("chat", {"presence_penalty": 2, "frequency_penalty": -2}),
        ("completions", {"presence_penalty": 0.5, "frequency_penalty": 1.0}),
        ("chat", {"function_call": "auto", "tool_choice": "none"}),  # no call asked for: nothing to refuse
        ("chat", {"logprobs": False, "top_logprobs": 0}),
    ],
)
def test_supported_parameters_reach_the_backend(endpoint: str, extra: dict[str, Any]) -> None:
    async def main() -> None:
        async with app_client() as (client, _, loader):
            base = CHAT if endpoint == "chat" else COMPLETION
            r = await client.post(
                f"/v1/{'chat/completions' if endpoint == 'chat' else 'completions'}", json={**base, **extra}
            )
            assert r.status_code == 200, r.text
            sampling = loader.backend.generations[-1].sampling
            assert sampling.presence_penalty == extra.get("presence_penalty", 0)
            assert sampling.frequency_penalty == extra.get("frequency_penalty", 0)
            assert sampling.logprobs is None

    run(main)


def test_streamed_logprobs_come_per_chunk_in_openai_shapes() -> None:
    async def main() -> None:
        async with app_client() as (client, _, _):
            body = {**CHAT, "max_tokens": 3, "logprobs": True, "top_logprobs": 2, "stream": True}
            chunks = parse_sse((await client.post("/v1/chat/completions", json=body)).text)
            assert chunks[0]["choices"][0]["logprobs"] is None  # the role chunk carries no token
            carried = [c["choices"][0]["logprobs"]["content"] for c in chunks[1:] if c["choices"][0]["logprobs"]]
            assert [len(c) for c in carried] == [1, 1, 1]
            first = carried[0][0]
            assert first == {
                "token": " t0",
                "logprob": -0.25,
                "bytes": list(b" t0"),
                "top_logprobs": [
                    {"token": " t0", "logprob": -0.25, "bytes": list(b" t0")},
                    {"token": " t1", "logprob": -1.25, "bytes": list(b" t1")},
                ],
            }

            body = {**COMPLETION, "max_tokens": 3, "logprobs": 1, "stream": True}
            chunks = parse_sse((await client.post("/v1/completions", json=body)).text)
            lps = [c["choices"][0]["logprobs"] for c in chunks]
            assert [lp["tokens"] for lp in lps] == [[" t0"], [" t1"], [" t2"]]
            assert [lp["text_offset"] for lp in lps] == [[0], [3], [6]]  # running across chunks
            assert lps[1]["top_logprobs"] == [{" t1": -0.5}]  # the top one is the chosen one

    run(main)


def test_a_logprob_shape_round_trips_through_json() -> None:
    from kold.runtime.logprobs import ChoiceLogprobs, CompletionOffsets, chat_logprobs

    track = ChoiceLogprobs()
    track.add(1, -0.5, [(1, -0.5), (2, -1.0)])
    track.add(None, None, [])  # an event without a token adds nothing
    track.add(3, -2.0, [(2, -0.1), (3, -2.0)])
    entries = track.take()
    assert len(entries) == 2 and track.take() == [] and not track.pending
    pieces = {1: "é".encode()[:1], 2: b"x", 3: "é".encode()[1:]}  # one character split over two tokens
    chat = json.loads(chat_logprobs(entries, pieces.__getitem__).model_dump_json())
    assert [e["token"] for e in chat["content"]] == ["\\xc3", "\\xa9"] and chat["content"][0]["bytes"] == [0xC3]
    offsets = CompletionOffsets(5, pieces.__getitem__)
    lp = offsets.logprobs(entries)
    assert lp.text_offset == [5, 5] and offsets.offset == 6  # both begin where their character does
    assert lp.top_logprobs[1] == {"x": -0.1, "\\xa9": -2.0}
