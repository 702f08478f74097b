"""Tool calls against a real runtime (`kold runtime serve` on loopback, the random tiny models): the
official `openai` SDK's round trip (a forced call with JSON arguments valid for the schema, the tool's
result sent back as a `tool` message, an answer), streamed `delta.tool_calls`, `required`, a named
function, `none`, the deprecated `functions`, 400s for bad tool fields, and LangChain's `bind_tools`
agent loop. The grammar forces the calls, so a random model's answers are deterministic in shape."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import httpx
import jsonschema
import pytest
from runtime_helpers import RuntimeProcess

from kold.modelgen import model_shape, write_random_model, write_tokenizer
from kold.runtime.chat_template import template_messages
from kold.runtime.tokenizer import Tokenizer
from kold.runtime.tools import mistral_call_id

WEATHER_PARAMS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "enum": ["Paris", "Oslo"]},
        "unit": {"type": "string", "enum": ["c", "f"]},
    },
    "required": ["city", "unit"],
}
TIME_PARAMS = {"type": "object", "properties": {"utc": {"type": "boolean"}}, "required": ["utc"]}
TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather in a city", "parameters": WEATHER_PARAMS},
    },
    {"type": "function", "function": {"name": "get_time", "description": "The time", "parameters": TIME_PARAMS}},
]
SCHEMAS = {"get_weather": WEATHER_PARAMS, "get_time": TIME_PARAMS}
ASK = [{"role": "user", "content": "Weather in Paris?"}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}


def runtime(snapshot: str, tmp: Path) -> Iterator[RuntimeProcess]:
    # the Llama 3.1 tool prompt is ~1200 tokens of the tiny tokenizer (~2000 with a pydantic model's
    # schema), about a token a character of the calls: a context past the model's 512
    process = RuntimeProcess(snapshot, tmp, "--max-batch", "4", "--max-seq-len", "4096", "--served-model-name", "tiny")
    try:
        process.wait_listening()
        process.wait_ready()
        yield process
    finally:
        process.kill()


@pytest.fixture(scope="module")
def llama(tiny_snapshot: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RuntimeProcess]:
    """The tiny Llama (family llama3: Llama 3.1's tool template)."""
    yield from runtime(tiny_snapshot, tmp_path_factory.mktemp("tools-llama"))


@pytest.fixture(scope="module", params=["mistral", "qwen2"])
def other(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, RuntimeProcess]]:
    """The tiny Mistral (Mistral v0.3's template, 9-character call ids) and Qwen2 (Qwen2.5's <tool_call>)."""
    from kold.snapshot import build_snapshot

    root = tmp_path_factory.mktemp(f"tools-{request.param}")
    model = write_random_model(root / "model", request.param, "tiny", seed=4)
    uri = build_snapshot(model, (root / "store").as_uri(), chunk_size=64 << 10).uri
    for process in runtime(uri, root):
        yield request.param, process


def client(rt: RuntimeProcess) -> Any:
    import openai

    return openai.OpenAI(base_url=f"{rt.base}/v1", api_key="x", max_retries=0, timeout=120)


def prompt_tokens(arch: str, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, tmp: Path) -> int:
    """The prompt's length as the model's own template renders it here (tools and tool turns included)."""
    write_tokenizer(tmp / arch, arch, model_shape(arch, "tiny"))
    tok = Tokenizer.from_dir(tmp / arch)
    turns = template_messages(messages, call_id=mistral_call_id if arch == "mistral" else None)
    return len(tok.encode_chat(turns, tools=tools))


def check_call(call: Any) -> dict[str, Any]:
    assert call.type == "function" and call.id.startswith("call_") and len(call.id) > 10
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, SCHEMAS[call.function.name])
    return dict(arguments)


def round_trip(arch: str, rt: RuntimeProcess, tmp: Path) -> None:
    """Forced call -> valid arguments -> the tool's result back as a `tool` message -> an answer."""
    api = client(rt)
    first = api.chat.completions.create(
        model="tiny", messages=ASK, tools=TOOLS, tool_choice=NAMED, max_tokens=40, temperature=0
    )
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert [c.function.name for c in choice.message.tool_calls] == ["get_weather"]
    args = check_call(choice.message.tool_calls[0])
    assert first.usage.prompt_tokens == prompt_tokens(arch, ASK, TOOLS, tmp)

    assistant = choice.message.model_dump(exclude_none=True)
    result = {
        "role": "tool",
        "tool_call_id": choice.message.tool_calls[0].id,
        "content": json.dumps({"sky": "clear", **args}),
    }
    conversation = [*ASK, assistant, result]
    second = api.chat.completions.create(model="tiny", messages=conversation, tools=TOOLS, max_tokens=8, temperature=0)
    answer = second.choices[0]
    assert answer.message.tool_calls is None and isinstance(answer.message.content, str)
    assert answer.finish_reason in ("stop", "length")
    # the call and its result went through the template, as the model's family writes them
    assert second.usage.prompt_tokens == prompt_tokens(arch, conversation, TOOLS, tmp)


def test_the_openai_sdk_round_trip_on_llama(llama: RuntimeProcess, tmp_path: Path) -> None:
    round_trip("llama", llama, tmp_path)


def test_the_openai_sdk_round_trip_on_mistral_and_qwen(other: tuple[str, RuntimeProcess], tmp_path: Path) -> None:
    arch, rt = other
    round_trip(arch, rt, tmp_path)
    # and streamed, `required`: the family's parser reads the grammar's array of calls
    chunks = list(
        client(rt).chat.completions.create(
            model="tiny",
            messages=ASK,
            tools=TOOLS,
            tool_choice="required",
            parallel_tool_calls=False,
            max_tokens=100,
            temperature=0,
            stream=True,
        )
    )
    calls = assemble(chunks)
    assert len(calls) == 1 and calls[0]["name"] in SCHEMAS
    jsonschema.validate(json.loads(calls[0]["arguments"]), SCHEMAS[calls[0]["name"]])


def assemble(chunks: list[Any]) -> list[dict[str, str]]:
    """A streamed answer's calls as a client puts them together; checks the pieces' order and finish."""
    calls: dict[int, dict[str, str]] = {}
    finish = None
    for chunk in chunks:
        for choice in chunk.choices:
            assert finish is None  # nothing after the finish
            for piece in choice.delta.tool_calls or []:
                if piece.index not in calls:
                    assert piece.id.startswith("call_") and piece.type == "function" and piece.function.name
                    calls[piece.index] = {"id": piece.id, "name": piece.function.name, "arguments": ""}
                else:
                    assert piece.id is None and piece.function.name is None
                calls[piece.index]["arguments"] += piece.function.arguments or ""
            assert not (choice.delta.tool_calls and choice.delta.content)
            finish = choice.finish_reason
    assert finish == "tool_calls"
    assert sorted(calls) == list(range(len(calls)))
    return [calls[i] for i in sorted(calls)]


def test_streamed_tool_calls(llama: RuntimeProcess) -> None:
    api = client(llama)
    chunks = list(
        api.chat.completions.create(
            model="tiny", messages=ASK, tools=TOOLS, tool_choice=NAMED, max_tokens=40, temperature=0, stream=True
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    calls = assemble(chunks)
    assert [c["name"] for c in calls] == ["get_weather"]
    pieces = [p for c in chunks for ch in c.choices for p in ch.delta.tool_calls or []]
    assert len(pieces) > 3  # the arguments came token by token, not in one piece
    # the same call as the whole answer's (greedy: the same tokens)
    whole = api.chat.completions.create(
        model="tiny", messages=ASK, tools=TOOLS, tool_choice=NAMED, max_tokens=40, temperature=0
    )
    assert json.loads(calls[0]["arguments"]) == json.loads(whole.choices[0].message.tool_calls[0].function.arguments)
    # the SDK's own stream helper accumulates and parses them too
    with api.chat.completions.stream(
        model="tiny", messages=ASK, tools=TOOLS, tool_choice=NAMED, max_tokens=40, temperature=0
    ) as stream:
        final = stream.get_final_completion()
    check_call(final.choices[0].message.tool_calls[0])


def test_required_calls_one_of_the_tools_with_valid_arguments(llama: RuntimeProcess) -> None:
    api = client(llama)
    for parallel in (False, True):
        done = api.chat.completions.create(
            model="tiny",
            messages=ASK,
            tools=TOOLS,
            tool_choice="required",
            parallel_tool_calls=parallel,
            max_tokens=150,
            temperature=0,
        )
        choice = done.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        calls = choice.message.tool_calls
        assert calls and (parallel or len(calls) == 1)
        for call in calls:
            check_call(call)
        assert len({c.id for c in calls}) == len(calls)
    sampled = api.chat.completions.create(
        model="tiny",
        messages=ASK,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=100,
        temperature=1.0,
        seed=7,
        n=3,
    )
    for choice in sampled.choices:
        assert choice.finish_reason == "tool_calls"
        check_call(choice.message.tool_calls[0])


def test_pydantic_tools_of_nested_models_are_called_required_and_named(llama: RuntimeProcess) -> None:
    """The SDK's `pydantic_function_tool` of a model with nested models: parameters with `$defs` and
    `#/$defs/...` refs (items, anyOf), strict; forced by `required` and by name, parsed back by the SDK."""
    from openai import pydantic_function_tool
    from pydantic import BaseModel, Field

    class Place(BaseModel):
        city: Literal["Paris", "Oslo"]
        indoor: bool

    class Plan(BaseModel):
        where: Place
        backup: Place | None
        stops: list[Place] = Field(max_length=2)

    tool = pydantic_function_tool(Plan)
    assert "$defs" in tool["function"]["parameters"]
    api = client(llama)
    for choice in ("required", {"type": "function", "function": {"name": "Plan"}}):
        done = api.chat.completions.parse(
            model="tiny", messages=ASK, tools=[tool], tool_choice=choice, max_tokens=300, temperature=0
        )
        calls = done.choices[0].message.tool_calls
        assert calls and [c.function.name for c in calls] == ["Plan"] * len(calls), done
        assert all(isinstance(c.function.parsed_arguments, Plan) for c in calls)


def test_none_renders_the_tools_and_never_calls(llama: RuntimeProcess, tmp_path: Path) -> None:
    api = client(llama)
    done = api.chat.completions.create(
        model="tiny", messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=8, temperature=0
    )
    choice = done.choices[0]
    assert choice.message.tool_calls is None and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert done.usage.prompt_tokens == prompt_tokens("llama", ASK, TOOLS, tmp_path)
    plain = api.chat.completions.create(model="tiny", messages=ASK, max_tokens=1, temperature=0)
    assert plain.usage.prompt_tokens < done.usage.prompt_tokens  # without tools: the plain template
    auto = api.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, max_tokens=8, temperature=0)
    assert auto.choices[0].message.tool_calls is None and auto.choices[0].message.content == choice.message.content


def test_the_deprecated_functions_answer_with_function_call(llama: RuntimeProcess) -> None:
    body = {
        "model": "tiny",
        "messages": ASK,
        "functions": [t["function"] for t in TOOLS],
        "function_call": {"name": "get_time"},
        "max_tokens": 30,
        "temperature": 0,
    }
    done = httpx.post(f"{llama.base}/v1/chat/completions", json=body, timeout=60).json()
    choice = done["choices"][0]
    assert choice["finish_reason"] == "function_call" and "tool_calls" not in choice["message"]
    assert choice["message"]["function_call"]["name"] == "get_time"
    jsonschema.validate(json.loads(choice["message"]["function_call"]["arguments"]), TIME_PARAMS)
    streamed = httpx.post(f"{llama.base}/v1/chat/completions", json={**body, "stream": True}, timeout=60).text
    events = [json.loads(line[6:]) for line in streamed.splitlines() if line.startswith("data: {")]
    pieces = [e["choices"][0]["delta"].get("function_call") for e in events if e["choices"]]
    pieces = [p for p in pieces if p]
    assert pieces[0]["name"] == "get_time" and all("name" not in p for p in pieces[1:])
    assert "".join(p["arguments"] for p in pieces) == choice["message"]["function_call"]["arguments"]
    assert events[-1]["choices"][0]["finish_reason"] == "function_call"


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"tool_choice": {"type": "function", "function": {"name": "launch"}}}, "tool_choice"),
        ({"tools": [{"type": "code_interpreter"}]}, "tools[0].type"),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
            "tools[0].function.parameters",
        ),
        ({"tools": "get_weather"}, "tools"),
        ({"tool_choice": "required", "tools": None}, "tool_choice"),
        ({"tool_choice": NAMED, "response_format": {"type": "json_object"}}, "response_format"),
        ({"messages": [*ASK, {"role": "tool", "content": "x"}]}, "messages[1].tool_call_id"),
        (
            {
                "tools": [
                    {
                        "type": "function",
                        "function": {
                            "name": "f",
                            "parameters": {
                                "type": "object",
                                "properties": {"a": {"type": "string", "pattern": "(?<=x)a"}},
                            },
                        },
                    }
                ],
                "tool_choice": "required",
            },
            "tools",
        ),
    ],
)
def test_bad_tool_requests_are_400_json(llama: RuntimeProcess, change: dict[str, Any], param: str) -> None:
    body = {"model": "tiny", "messages": ASK, "tools": TOOLS, "max_tokens": 4, **change}
    for stream in (False, True):
        r = httpx.post(f"{llama.base}/v1/chat/completions", json={**body, "stream": stream}, timeout=60)
        assert r.status_code == 400 and r.headers["content-type"] == "application/json", r.text
        error = r.json()["error"]
        assert error["type"] == "invalid_request_error" and error["param"] == param, error


def test_langchain_bind_tools_agent_loop(llama: RuntimeProcess) -> None:
    """The agent loop LangChain users write: the model bound to a tool, forced to call it first, the
    tool run on its arguments, its result sent back, until the model answers without a call."""
    from langchain_core.messages import AIMessage, BaseMessage, HumanMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    ran: list[dict[str, Any]] = []

    @tool
    def get_weather(city: Literal["Paris", "Oslo"], unit: Literal["c", "f"]) -> str:
        """The weather in a city."""
        ran.append({"city": city, "unit": unit})
        return f"clear, 21 degrees {unit} in {city}"

    llm = ChatOpenAI(
        model="tiny", base_url=f"{llama.base}/v1", api_key="x", temperature=0, max_tokens=40, max_retries=0
    )
    messages: list[BaseMessage] = [HumanMessage("What is the weather in Paris?")]
    for turn in range(3):
        bound = llm.bind_tools([get_weather], tool_choice="get_weather" if turn == 0 else "auto")
        reply = bound.invoke(messages)
        assert isinstance(reply, AIMessage)
        messages.append(reply)
        if not reply.tool_calls:
            break
        assert [c["name"] for c in reply.tool_calls] == ["get_weather"] and not reply.invalid_tool_calls
        for call in reply.tool_calls:
            messages.append(get_weather.invoke(call))
    else:
        raise AssertionError(f"the agent never answered: {messages}")
    assert turn == 1 and len(ran) == 1 and ran[0]["city"] in ("Paris", "Oslo")
    assert isinstance(messages[-1].content, str) and messages[2].tool_call_id == messages[1].tool_calls[0]["id"]

    # streamed, LangChain assembles the call from its chunks
    chunks = list(llm.bind_tools([get_weather], tool_choice="get_weather").stream(messages[:1]))
    merged = chunks[0]
    for chunk in chunks[1:]:
        merged = merged + chunk
    assert [c["name"] for c in merged.tool_calls] == ["get_weather"]  # type: ignore[attr-defined]
    jsonschema.validate(merged.tool_calls[0]["args"], WEATHER_PARAMS)  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def chatml(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RuntimeProcess]:
    """A tiny Llama whose template is ChatML without tools (SmolLM2's kind)."""
    from kold.runtime.chat_template import DEFAULT_CHAT_TEMPLATE
    from kold.snapshot import build_snapshot

    root = tmp_path_factory.mktemp("tools-chatml")
    model = write_random_model(root / "model", "llama", "tiny", seed=5)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["chat_template"] = DEFAULT_CHAT_TEMPLATE
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    (model / "chat_template.jinja").unlink(missing_ok=True)
    uri = build_snapshot(model, (root / "store").as_uri(), chunk_size=64 << 10).uri
    yield from runtime(uri, root)


def test_the_round_trip_on_a_template_without_tools(chatml: RuntimeProcess) -> None:
    """The call turn (no content) and the tool result reach a tool-less ChatML template as text: a 200."""
    api = client(chatml)
    first = api.chat.completions.create(
        model="tiny",
        messages=ASK,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=150,
        temperature=0,
    )
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]
    args = check_call(call)
    assistant = choice.message.model_dump(exclude_none=True)
    assert "content" not in assistant
    result = {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"sky": "clear", **args})}
    second = api.chat.completions.create(
        model="tiny", messages=[*ASK, assistant, result], tools=TOOLS, max_tokens=8, temperature=0
    )
    assert isinstance(second.choices[0].message.content, str) and second.choices[0].finish_reason != "tool_calls"
    # the call and its result are in the prompt: it is longer than the one that asked for the call
    assert second.usage.prompt_tokens > first.usage.prompt_tokens + len(call.function.arguments) // 4
