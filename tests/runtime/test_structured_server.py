"""Structured outputs end to end: a real runtime process (the random tiny Llama) asked through the
official `openai` client for response_format json_schema / json_object (plain, parsed into a pydantic
model, streamed), through completions with vLLM's guided_regex / guided_choice / guided_grammar /
guided_json, the 400s of malformed and uncompilable constraints, and the compile cache's header.

The model's choices are random, so every output that parses does so because of the grammar. Requests
are seeded, so each test's outputs are the same on every run.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Annotated, Any, Literal

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field
from runtime_helpers import RuntimeProcess

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
MESSAGES: Any = [{"role": "user", "content": "Who is it? Answer in JSON."}]


class Person(BaseModel):
    name: Annotated[str, Field(max_length=10)]
    age: Annotated[int, Field(ge=0, le=120)]
    tags: Annotated[list[Literal["a", "b", "c"]], Field(max_length=3)]


@pytest.fixture(scope="module")
def runtime(tiny_snapshot: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RuntimeProcess]:
    process = RuntimeProcess(
        tiny_snapshot,
        tmp_path_factory.mktemp("structured-runtime"),
        "--max-batch", "4", "--max-seq-len", "512", "--served-model-name", "tiny",
    )  # fmt: skip
    try:
        process.wait_listening()
        process.wait_ready()
        yield process
    finally:
        process.kill()


@pytest.fixture(scope="module")
def client(runtime: RuntimeProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{runtime.base}/v1", api_key="none", max_retries=0)


def person_format(name: str = "person", strict: bool = True, schema: dict[str, Any] = PERSON) -> Any:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": strict}}


def test_chat_json_schema_validates_and_its_grammar_is_compiled_once(client: openai.OpenAI) -> None:
    schema = {**PERSON, "title": "once"}  # a schema no other test compiles
    headers = []
    for seed in (1, 2):
        raw = client.chat.completions.with_raw_response.create(
            model="tiny", messages=MESSAGES, response_format=person_format(schema=schema),
            max_tokens=300, temperature=1.0, seed=seed,
        )  # fmt: skip
        headers.append(raw.headers["x-kold-grammar-compile-ms"])
        choice = raw.parse().choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content or ""), schema)
    assert float(headers[0]) > 0 and headers[1] == "0.0"  # the second request found it in the cache
    plain = client.chat.completions.with_raw_response.create(model="tiny", messages=MESSAGES, max_tokens=3)
    assert "x-kold-grammar-compile-ms" not in plain.headers


def test_parse_into_a_pydantic_model(client: openai.OpenAI) -> None:
    completion = client.beta.chat.completions.parse(
        model="tiny", messages=MESSAGES, response_format=Person, max_tokens=300, temperature=1.0, seed=4
    )
    parsed = completion.choices[0].message.parsed
    assert isinstance(parsed, Person)
    assert 0 <= parsed.age <= 120 and len(parsed.name) <= 10


def test_streamed_json_schema_is_whole_once_joined(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="tiny", messages=MESSAGES, response_format=person_format(), max_tokens=300, temperature=1.0,
        seed=5, stream=True, n=2,
    )  # fmt: skip
    texts = {0: "", 1: ""}
    finish: dict[int, str | None] = {}
    chunks = 0
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            chunks += 1
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    assert finish == {0: "stop", 1: "stop"} and chunks > 10
    for text in texts.values():
        jsonschema.validate(json.loads(text), PERSON)


def test_json_object_mode(client: openai.OpenAI) -> None:
    done = 0
    for seed in range(3):
        choice = client.chat.completions.create(
            model="tiny", messages=MESSAGES, response_format={"type": "json_object"}, max_tokens=150,
            temperature=1.0, seed=seed,
        ).choices[0]  # fmt: skip
        text = choice.message.content or ""
        assert text.startswith("{")
        if choice.finish_reason == "stop":  # a random model's free-form strings may run past max_tokens
            assert isinstance(json.loads(text), dict)
            done += 1
    assert done >= 1


def test_completions_guided_regex_choice_grammar_and_json(client: openai.OpenAI) -> None:
    def complete(seed: int = 0, **extra: Any) -> Any:
        return client.completions.create(
            model="tiny", prompt="The answer is", max_tokens=80, temperature=1.0, seed=seed, extra_body=extra
        ).choices[0]

    for seed in range(3):
        c = complete(seed, guided_regex=r"[A-Z][a-z]{2,5} [0-9]{1,3}")
        assert c.finish_reason == "stop" and re.fullmatch(r"[A-Z][a-z]{2,5} [0-9]{1,3}", c.text), c.text
        c = complete(seed, guided_choice=["red", "green", "light blue"])
        assert c.finish_reason == "stop" and c.text in ("red", "green", "light blue")
        c = complete(seed, guided_grammar='start: "[" item ("," item)* "]"\nitem: /[0-9]/')
        assert c.finish_reason == "stop" and re.fullmatch(r"\[[0-9](,[0-9])*\]", c.text), c.text
    c = complete(7, guided_json=json.dumps(PERSON))  # vLLM takes the schema as an object or as its text
    jsonschema.validate(json.loads(c.text), PERSON)
    chat = client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=20, seed=1, extra_body={"guided_choice": ["yes", "no"]}
    )  # vLLM's names work on chat too
    assert chat.choices[0].message.content in ("yes", "no")


def test_streamed_completion_with_guided_regex(runtime: RuntimeProcess) -> None:
    body = {"model": "tiny", "prompt": "x", "max_tokens": 60, "seed": 3, "stream": True, "guided_regex": "(ab){5}c"}
    r = httpx.post(f"{runtime.base}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200
    chunks = [json.loads(line[6:]) for line in r.text.split("\n\n") if line.startswith("data: {")]
    assert "".join(c["choices"][0]["text"] for c in chunks) == "abababababc"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


BAD = [
    # (endpoint, extra body fields, param, words the message must contain)
    ("chat", {"response_format": {"type": "xml"}}, "response_format.type", "xml"),
    ("chat", {"response_format": {"type": "json_schema"}}, "response_format.json_schema", "object"),
    ("chat", {"response_format": {"type": "json_schema", "json_schema": {"schema": PERSON}}},
     "response_format.json_schema.name", "name"),
    ("chat", {"response_format": {"type": "json_schema", "json_schema": {"name": "a b", "schema": PERSON}}},
     "response_format.json_schema.name", "name"),
    ("chat", {"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": [1]}}},
     "response_format.json_schema.schema", "schema"),
    ("chat", {"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON,
                                                                          "strict": "yes"}}},
     "response_format.json_schema.strict", "boolean"),
    ("chat", {"response_format": "json"}, "response_format", "dictionary"),
    ("chat", {"response_format": person_format(schema={"not": {"type": "string"}})}, "response_format", '"not"'),
    ("chat", {"response_format": person_format(schema={"type": "string", "format": "ipv9"})}, "response_format",
     "ipv9"),
    ("chat", {"response_format": person_format(schema={"$ref": "#/$defs/gone"})}, "response_format", "gone"),
    ("chat", {"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex", "only one"),
    ("completions", {"guided_choice": []}, "guided_choice", "non-empty"),
    ("completions", {"guided_choice": "yes"}, "guided_choice", "list"),
    ("completions", {"guided_regex": "a(b"}, "guided_regex", "unclosed group"),
    ("completions", {"guided_json": "{not json"}, "guided_json", "not a JSON schema"),
    ("completions", {"guided_json": {"type": "object", "properties": {"a": {"type": "frob"}}}}, "guided_json",
     "frob"),
    ("completions", {"guided_grammar": "start: nowhere"}, "guided_grammar", "nowhere"),
    ("completions", {"guided_json": {**PERSON, "not": {"required": ["x"]}}}, "guided_json", '"not"'),  # strict
    ("completions", {"guided_json": PERSON, "guided_choice": ["a"]}, "guided_choice", "only one"),
]  # fmt: skip


@pytest.mark.parametrize(("endpoint", "extra", "param", "words"), BAD)
def test_malformed_and_uncompilable_constraints_are_400s_naming_them(
    runtime: RuntimeProcess, endpoint: str, extra: dict[str, Any], param: str, words: str
) -> None:
    base: dict[str, Any] = {"model": "tiny", "max_tokens": 5}
    base.update({"messages": MESSAGES} if endpoint == "chat" else {"prompt": "x"})
    path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
    r = httpx.post(runtime.base + path, json={**base, **extra}, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and words in error["message"], error
    assert error["type"] == "invalid_request_error"


UNUSABLE = [
    # constraints that compile but fail at their first mask or first forced token: (extra body, param, words)
    ({"guided_json": {"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}},
     "guided_json", "allows no text"),
    ({"response_format": person_format(schema={"type": "object", "properties": {"x": {"$ref": "#"}},
                                               "required": ["x"]})}, "response_format", "Too many items"),
    ({"guided_choice": [f"item{i}" for i in range(20000)]}, "guided_choice", "20001 items"),
    ({"guided_regex": "a{1000}{1000}"}, "guided_regex", "too many expressions"),
    ({"guided_regex": "[^\\x00-\\U0010FFFF]"}, "guided_regex", "allows no text"),
    ({"guided_grammar": "start: a\na: a"}, "guided_grammar", "allows no text"),
]  # fmt: skip


@pytest.mark.parametrize(("extra", "param", "words"), UNUSABLE)
def test_a_grammar_that_fails_at_its_first_step_is_a_400_every_time(
    runtime: RuntimeProcess, extra: dict[str, Any], param: str, words: str
) -> None:
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 5, **extra}
    for _ in range(2):  # the second finds the failure in the cache
        r = httpx.post(f"{runtime.base}/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["code"] == "unsupported_constraint" and error["param"] == param, error
        assert words in error["message"] and "<state>" not in error["message"], error
        assert len(error["message"]) < 300, error


def test_a_constraint_past_the_size_limit_is_a_400_naming_the_limit(runtime: RuntimeProcess) -> None:
    body = {"model": "tiny", "prompt": "x", "max_tokens": 5, "guided_regex": "a" * (256 * 1024 + 1)}
    r = httpx.post(f"{runtime.base}/v1/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "unsupported_constraint" and error["param"] == "guided_regex", error
    assert error["message"] == "guided_regex: the regex is 262,145 characters; the limit is 262,144", error


def test_the_sdk_reports_an_uncompilable_schema_and_strict_false_ignores_the_keyword(client: openai.OpenAI) -> None:
    schema = {**PERSON, "not": {"required": ["x"]}}
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model="tiny", messages=MESSAGES, response_format=person_format(schema=schema))
    assert raised.value.code == "unsupported_constraint" and "not" in raised.value.message
    lenient = client.chat.completions.create(
        model="tiny", messages=MESSAGES, response_format=person_format(schema=schema, strict=False),
        max_tokens=300, temperature=1.0, seed=1,
    )  # fmt: skip
    jsonschema.validate(json.loads(lenient.choices[0].message.content or ""), PERSON)


def test_response_format_text_is_no_constraint(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="tiny", messages=MESSAGES, response_format={"type": "text"}, max_tokens=5, temperature=0
    )
    assert "x-kold-grammar-compile-ms" not in raw.headers
    assert raw.parse().choices[0].finish_reason in ("stop", "length")
