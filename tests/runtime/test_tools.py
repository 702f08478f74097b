"""runtime/tools.py: tool requests validated, each family's calls read out of generated text (whole and
streamed, split anywhere), and the schema a forced call is constrained to."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from typing import Any

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kold.runtime import tools
from kold.runtime.protocol import InvalidRequestError
from kold.runtime.tools import (
    Delta,
    NamedCallParser,
    ToolCallParser,
    ToolRequest,
    mistral_call_id,
    new_call_id,
    output_parser,
    parse,
    parse_tool_request,
    tool_family,
)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
            "required": ["city"],
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time"}}  # no parameters: called with {}
NAMES = ("get_weather", "get_time")


def counter() -> Callable[[], str]:
    n = itertools.count()
    return lambda: f"call_{next(n)}"


def request(**fields: Any) -> ToolRequest:
    req = parse_tool_request(
        fields.get("tools", [WEATHER, TIME]),
        fields.get("tool_choice"),
        fields.get("parallel_tool_calls"),
        fields.get("functions"),
        fields.get("function_call"),
    )
    assert req is not None
    return req


# -- requests ---------------------------------------------------------------------------------------


def test_a_valid_request_keeps_what_templates_and_the_grammar_need() -> None:
    req = request(tool_choice={"type": "function", "function": {"name": "get_time"}}, parallel_tool_calls=False)
    assert (req.choice, req.named, req.parallel, req.legacy) == ("named", "get_time", False, False)
    assert req.template_tools() == [WEATHER, TIME]
    assert request().choice == "auto" and request().parallel
    assert request(tool_choice="required").forced and not request(tool_choice="none").parses


@pytest.mark.parametrize(
    ("fields", "param", "words"),
    [
        ({"tools": [{"type": "retrieval"}]}, "tools[0].type", "only function tools"),
        ({"tools": [{"type": "function"}]}, "tools[0].function", "object with a name"),
        ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools[0].function.name", "1 to 64"),
        ({"tools": [{"type": "function", "function": {"name": "x" * 65}}]}, "tools[0].function.name", "1 to 64"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]},
            "tools[0].function.parameters",
            "JSON schema object",
        ),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]},
            "tools[0].function.parameters",
            "'object'",
        ),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"required": "a"}}}]},
            "tools[0].function.parameters.required",
            "list of property names",
        ),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "description": 3}}]},
            "tools[0].function.description",
            "string",
        ),
        ({"tools": [TIME, TIME]}, "tools", "declared twice"),
        ({"tools": "get_time"}, "tools", "must be a list"),
        (
            {"tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
            "'nope', which is not declared",
        ),
        ({"tool_choice": {"type": "function"}}, "tool_choice", "must be"),
        ({"tool_choice": "always"}, "tool_choice", "must be"),
        ({"tools": None, "tool_choice": "required"}, "tool_choice", "needs tools"),
        (
            {"tools": None, "tool_choice": {"type": "function", "function": {"name": "f"}}},
            "tool_choice",
            "not declared",
        ),
        ({"parallel_tool_calls": "yes"}, "parallel_tool_calls", "boolean"),
        ({"functions": [TIME["function"]]}, "functions", "not both"),
        ({"tools": None, "functions": [TIME["function"]], "function_call": "required"}, "function_call", "must be"),
        ({"function_call": {"name": "get_time"}}, "function_call", "not declared"),
        ({"tools": None, "functions": [{"name": "f"}], "tool_choice": "required"}, "tool_choice", "function_call"),
    ],
)
def test_bad_tool_fields_are_refused_naming_the_field(fields: dict[str, Any], param: str, words: str) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        parse_tool_request(
            fields.get("tools", [WEATHER, TIME]),
            fields.get("tool_choice"),
            fields.get("parallel_tool_calls"),
            fields.get("functions"),
            fields.get("function_call"),
        )
    assert caught.value.param == param and words in caught.value.message


def test_no_tools_asks_for_nothing_and_the_deprecated_functions_map_onto_tools() -> None:
    assert parse_tool_request(None, None) is None
    assert parse_tool_request([], "none") is None and parse_tool_request(None, "auto") is None
    assert parse_tool_request(None, "none", None, None, "auto") is None
    assert request(function_call="none").choice == "auto"  # function_call says nothing about tools
    legacy = parse_tool_request(None, None, None, [WEATHER["function"]], {"name": "get_weather"})
    assert legacy is not None
    assert (legacy.choice, legacy.named, legacy.legacy, legacy.parallel) == ("named", "get_weather", True, False)
    assert legacy.template_tools() == [WEATHER]
    none = parse_tool_request(None, None, None, [WEATHER["function"]], "none")
    assert none is not None and not none.parses


def test_the_forced_schema_admits_exactly_calls_to_declared_tools() -> None:
    required = request(tool_choice="required").forced_schema("hermes")
    jsonschema.validate(
        [{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_time", "arguments": {}}], required
    )
    for bad in (
        [],
        [{"name": "get_weather", "arguments": {}}],
        [{"name": "other", "arguments": {}}],
        [{"name": "get_time", "arguments": {"x": 1}}],
    ):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, required)
    llama = request(tool_choice="required", parallel_tool_calls=False).forced_schema("llama3")
    jsonschema.validate([{"name": "get_time", "parameters": {}}], llama)
    with pytest.raises(jsonschema.ValidationError):  # one call only without parallel calls
        jsonschema.validate([{"name": "get_time", "parameters": {}}] * 2, llama)
    named = request(tool_choice={"type": "function", "function": {"name": "get_weather"}}).forced_schema("mistral")
    jsonschema.validate({"city": "Oslo", "unit": "c"}, named)
    for bad in ({"unit": "c"}, {"city": "Oslo", "country": "NO"}):  # required missing; a key never declared
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, named)


def test_forced_arguments_have_no_keys_the_schema_does_not_declare() -> None:
    """Objects that declare properties are closed (OpenAI's strict calling), nested ones too, unless the
    schema opens them; `allOf` branches are left as they are."""
    inner = {"type": "object", "properties": {"x": {"type": "integer"}}}
    params = {
        "type": "object",
        "properties": {
            "point": inner,
            "points": {"type": "array", "items": inner},
            "either": {"anyOf": [inner, {"type": "null"}]},
            "tags": {"type": "object", "properties": {}, "additionalProperties": {"type": "string"}},
            "both": {"allOf": [inner, {"properties": {"y": {"type": "integer"}}}]},
        },
    }
    tool = {"type": "function", "function": {"name": "draw", "parameters": params}}
    schema = request(tools=[tool], tool_choice={"type": "function", "function": {"name": "draw"}}).forced_schema(None)
    jsonschema.validate(
        {"point": {"x": 1}, "points": [{"x": 2}], "either": None, "tags": {"a": "b"}, "both": {"x": 1, "y": 2}}, schema
    )
    for bad in (
        {"other": 1},
        {"point": {"x": 1, "z": 0}},
        {"points": [{"z": 0}]},
        {"either": {"z": 0}},
        {"tags": {"a": 1}},
    ):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    assert (
        params["properties"]["point"] == inner == {"type": "object", "properties": {"x": {"type": "integer"}}}
    )  # not changed in place


def test_the_required_schema_moves_each_tools_definitions_to_its_root() -> None:
    """A tool's `$defs`/`definitions` (pydantic's nested models) go to the forced array's root under
    names of the tool's own, every local `$ref` rewritten, remote ones and data left alone."""
    point = {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}
    shape = {
        "type": "object",
        "$defs": {"P": point, "Pair": {"type": "array", "items": {"$ref": "#/$defs/P"}}},
        "definitions": {"P": {"type": "string"}},  # the same name, another keyword: no clash
        "properties": {
            "at": {"$ref": "#/$defs/P"},
            "pairs": {"type": "array", "items": {"$ref": "#/$defs/Pair"}},
            "label": {"anyOf": [{"$ref": "#/definitions/P"}, {"type": "null"}]},
            "x": {"$ref": "#/$defs/P/properties/x"},
            "again": {"anyOf": [{"type": "null"}, {"$ref": "#"}]},  # the arguments object itself
            "remote": {"$ref": "https://example.com/s.json#/$defs/P"},
            "$ref": {"const": {"$ref": "#/$defs/P"}},  # a property named $ref; a const is data
        },
    }
    other = {"type": "object", "$defs": {"P": {"type": "boolean"}}, "properties": {"p": {"$ref": "#/$defs/P"}}}
    tools = [
        {"type": "function", "function": {"name": "draw", "parameters": shape}},
        {"type": "function", "function": {"name": "flag", "parameters": other}},
    ]
    schema = request(tools=tools, tool_choice="required").forced_schema("hermes")
    assert sorted(schema["$defs"]) == ["tool0__P", "tool0__Pair", "tool1__P"]
    assert sorted(schema["definitions"]) == ["tool0__P"]
    draw = schema["items"]["anyOf"][0]["properties"]["arguments"]
    assert "$defs" not in draw and "definitions" not in draw
    assert draw["properties"]["remote"] == {"$ref": "https://example.com/s.json#/$defs/P"}
    assert draw["properties"]["$ref"] == {"const": {"$ref": "#/$defs/P"}}
    assert draw["properties"]["again"]["anyOf"][1] == {"$ref": "#/items/anyOf/0/properties/arguments"}
    draw_call = {
        "name": "draw",
        "arguments": {
            "at": {"x": 1},
            "pairs": [[{"x": 2}]],
            "label": "a",
            "x": 3,
            "again": {"at": {"x": 4}},
            "$ref": {"$ref": "#/$defs/P"},
        },
    }
    resolver = jsonschema.validators.validator_for(schema)(schema)  # remote refs are never fetched here
    assert not list(resolver.iter_errors([draw_call, {"name": "flag", "arguments": {"p": True}}]))
    for bad in (
        {"at": {"x": "1"}},
        {"pairs": [[{"y": 2}]]},
        {"label": 1},
        {"x": "3"},
        {"again": {"at": {}}},
        {"$ref": {"$ref": "#/$defs/Q"}},
    ):
        assert list(resolver.iter_errors([{"name": "draw", "arguments": bad}])), bad
    assert list(resolver.iter_errors([{"name": "flag", "arguments": {"p": 1}}]))
    # one tool: its arguments sit at items/properties; llama3's key is "parameters"
    one = request(tools=tools[:1], tool_choice="required").forced_schema("llama3")
    assert one["items"]["properties"]["parameters"]["properties"]["again"]["anyOf"][1] == {
        "$ref": "#/items/properties/parameters"
    }
    assert not list(
        jsonschema.validators.validator_for(one)(one).iter_errors(
            [{"name": "draw", "parameters": {"pairs": [[{"x": 1}]], "again": {"label": "b"}}}]
        )
    )
    assert shape["properties"]["at"] == {"$ref": "#/$defs/P"} and "$defs" in shape  # not changed in place


def test_the_family_comes_from_the_template_then_the_model_type() -> None:
    assert tool_family("... <tool_call> ...", "llama") == "hermes"  # a Hermes fine-tune of Llama
    assert tool_family("{{ '[AVAILABLE_TOOLS]' }}") == "mistral"
    assert tool_family("Environment: ipython", "qwen2") == "llama3"
    assert tool_family("{{ tools }}", "qwen3") == "hermes" and tool_family("{{ tools }}", "llama") == "llama3"
    assert tool_family("{{ tools }}", "gpt2") is None
    # a template without tools (or none: ChatML) is shown them the Hermes way, so reads Hermes calls
    assert tool_family("{{ messages }}", "llama") == "hermes" and tool_family(None, "mistral") == "hermes"


def test_ids() -> None:
    ids = {new_call_id() for _ in range(100)}
    assert len(ids) == 100 and all(i.startswith("call_") and i[5:].isalnum() and len(i) == 29 for i in ids)
    assert mistral_call_id("abcDEF123") == "abcDEF123"
    short = mistral_call_id("call_0123456789")
    assert len(short) == 9 and short.isalnum() and short == mistral_call_id("call_0123456789")


# -- reading calls ----------------------------------------------------------------------------------

W = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
T = '{"name": "get_time", "arguments": {}}'
ODD = '{"name": "get_weather", "arguments": {"city": "Zürich \\"}{\\" ]", "unit": "c", "x": [1, {"y": null}]}}'
ODD_ARGS = json.dumps(json.loads(ODD)["arguments"], ensure_ascii=False)

# (syntax, text, content, [(name, arguments)]): the whole text's reading
CASES: list[tuple[str, str, str | None, list[tuple[str, str]]]] = [
    # Hermes / Qwen
    ("hermes", f"<tool_call>\n{W}\n</tool_call>", None, [("get_weather", '{"city": "Paris"}')]),
    (
        "hermes",
        f"Let me look.\n<tool_call>\n{W}\n</tool_call>\n<tool_call>\n{T}\n</tool_call>",
        "Let me look.",
        [("get_weather", '{"city": "Paris"}'), ("get_time", "{}")],
    ),
    ("hermes", f"<tool_call>{ODD}</tool_call>", None, [("get_weather", ODD[ODD.index('{"city"') : -1])]),
    ("hermes", f"<tool_call>\n{W}", None, [("get_weather", '{"city": "Paris"}')]),  # stopped before its closing tag
    ("hermes", f"<tool_call>\n{W}\n</tool_call>\nDone.", "Done.", [("get_weather", '{"city": "Paris"}')]),
    (
        "hermes",
        '<tool_call>{"arguments": {"city": "Oslo"}, "name": "get_weather"}</tool_call>',
        None,
        [("get_weather", '{"city": "Oslo"}')],
    ),
    ("hermes", '<tool_call>{"name": "get_time"}</tool_call>', None, [("get_time", "{}")]),
    ("hermes", "Plain answer, no tools.  \n", "Plain answer, no tools.  \n", []),
    ("hermes", "a <tool b </tool_call> <tool_cal", "a <tool b </tool_call> <tool_cal", []),
    (
        "hermes",
        '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>',
        '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>',
        [],
    ),
    (
        "hermes",
        '<tool_call>{"name": "get_time", "arguments": [1]}</tool_call>',
        '<tool_call>{"name": "get_time", "arguments": [1]}</tool_call>',
        [],
    ),
    (
        "hermes",
        '<tool_call>{"name": "get_time", "arguments": {"a": tru}}</tool_call>',
        '<tool_call>{"name": "get_time", "arguments": {"a": tru}}</tool_call>',
        [],
    ),
    (
        "hermes",
        '<tool_call>{"name": "get_time", "arguments": {"a": 1}',
        '<tool_call>{"name": "get_time", "arguments": {"a": 1}',
        [],
    ),
    ("hermes", '<tool_call>{"name": 7}</tool_call>', '<tool_call>{"name": 7}</tool_call>', []),
    ("hermes", '<tool_call>{"arguments": {}}</tool_call>', '<tool_call>{"arguments": {}}</tool_call>', []),
    (
        "hermes",
        '<tool_call>{"name": "get_time", "extra": 1}</tool_call>',
        '<tool_call>{"name": "get_time", "extra": 1}</tool_call>',
        [],
    ),
    ("hermes", f"<tool_call><tool_call>{T}</tool_call>", "<tool_call>", [("get_time", "{}")]),
    ("hermes", f"<tool_call>{T}</tool_call>{{oops", "{oops", [("get_time", "{}")]),
    ("hermes", "<tool_call>", "<tool_call>", []),
    ("hermes", "", None, []),
    # Llama 3.x
    (
        "llama3",
        '{"name": "get_weather", "parameters": {"city": "Paris"}}',
        None,
        [("get_weather", '{"city": "Paris"}')],
    ),
    (
        "llama3",
        '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}',
        None,
        [("get_weather", '{"city": "Paris"}')],
    ),
    (
        "llama3",
        ' \n{"name": "get_time", "parameters": {}}; {"name": "get_weather", "parameters": {"city": "Rome"}}',
        None,
        [("get_time", "{}"), ("get_weather", '{"city": "Rome"}')],
    ),
    ("llama3", ODD, None, [("get_weather", ODD[ODD.index('{"city"') : -1])]),
    ("llama3", '{"answer": 42}', '{"answer": 42}', []),
    ("llama3", '{"name": "get_time", "parameters": {}', '{"name": "get_time", "parameters": {}', []),
    ("llama3", 'Sure: {"name": "get_time", "parameters": {}}', 'Sure: {"name": "get_time", "parameters": {}}', []),
    ("llama3", "<|python_tag|>print(1)", "<|python_tag|>print(1)", []),
    ("llama3", "<b>bold</b>", "<b>bold</b>", []),
    ("llama3", '{"name": "get_time", "parameters": {}} and then', "and then", [("get_time", "{}")]),
    # Mistral
    ("mistral", f"[TOOL_CALLS] [{W}, {T}]", None, [("get_weather", '{"city": "Paris"}'), ("get_time", "{}")]),
    ("mistral", f"[{T}]", None, [("get_time", "{}")]),
    ("mistral", f"I will call it. [TOOL_CALLS][{W}]", "I will call it.", [("get_weather", '{"city": "Paris"}')]),
    ("mistral", f"[TOOL_CALLS]{T}", None, [("get_time", "{}")]),
    ("mistral", "[1, 2, 3]", "[1, 2, 3]", []),
    ("mistral", "[Note] plain", "[Note] plain", []),
    ("mistral", f"[{T}, oops]", ", oops]", [("get_time", "{}")]),
    (
        "mistral",
        f'[TOOL_CALLS] [{T}, {{"name": "nope", "arguments": {{}}}}]',
        ', {"name": "nope", "arguments": {}}]',
        [("get_time", "{}")],
    ),
    ("mistral", f"[{T}", None, [("get_time", "{}")]),  # no closing bracket: the complete call stands
    ("mistral", "[TOOL_CALLS] [", "[TOOL_CALLS] [", []),
]


def run(parser: ToolCallParser | NamedCallParser, pieces: list[str]) -> list[Delta]:
    out: list[Delta] = []
    for piece in pieces:
        out += parser.feed(piece)
    return out + parser.finish()


def assembled(deltas: list[Delta]) -> tuple[str | None, list[tuple[str, str]]]:
    """What a client builds from the deltas (as the openai SDK's stream helpers do), checking their order."""
    content = "".join(d.content for d in deltas)
    calls: dict[int, list[str]] = {}
    for d in deltas:
        assert not (d.content and d.calls)
        for c in d.calls:
            if c.index not in calls:
                assert c.id is not None and c.name is not None and c.index == len(calls)  # the first piece names it
                calls[c.index] = [c.name, ""]
            else:
                assert c.id is None and c.name is None
            calls[c.index][1] += c.arguments
    return content or None, [(name, args) for name, args in calls.values()]


def splits(text: str) -> list[list[str]]:
    """The text whole, cut in two at every character, and one character at a time."""
    return [[text], *([text[:i], text[i:]] for i in range(len(text) + 1)), list(text)]


@pytest.mark.parametrize(("syntax", "text", "content", "calls"), CASES)
def test_whole_texts_are_read_as_the_family_writes_them(
    syntax: str, text: str, content: str | None, calls: list[tuple[str, str]]
) -> None:
    family = "hermes" if syntax == "hermes" else syntax
    got = parse(text, request(), family, new_id=counter())  # type: ignore[arg-type]
    assert got.content == content
    assert [(c.name, c.arguments) for c in got.calls] == calls
    assert [c.id for c in got.calls] == [f"call_{i}" for i in range(len(calls))]
    for call in got.calls:
        assert isinstance(json.loads(call.arguments), dict)


# The texts of CASES that break after a call's name and the start of its arguments: a stream has sent
# the call by then and keeps it, cut where it broke; the rest is content.
BROKEN: dict[str, tuple[str | None, list[tuple[str, str]]]] = {
    '<tool_call>{"name": "get_time", "arguments": {"a": tru}}</tool_call>': (
        "}}</tool_call>",
        [("get_time", '{"a": tru')],
    ),
    '<tool_call>{"name": "get_time", "arguments": {"a": 1}': (None, [("get_time", '{"a": 1}')]),
    '{"name": "get_time", "parameters": {}': (None, [("get_time", "{}")]),
}


@pytest.mark.parametrize(("syntax", "text", "content", "calls"), CASES)
def test_streams_split_anywhere_read_the_same(
    syntax: str, text: str, content: str | None, calls: list[tuple[str, str]]
) -> None:
    """Eager (streamed) and whole readings are each the same however the text is cut, and agree with
    each other unless a call breaks after its name (BROKEN)."""
    for eager in (False, True):
        expected = BROKEN.get(text, (content, calls)) if eager else (content, calls)
        for pieces in splits(text):
            parser = ToolCallParser(syntax, NAMES, eager=eager, new_id=counter())
            deltas = run(parser, pieces)
            assert assembled(deltas) == expected, pieces
            assert (parser.content or None, [(c.name, c.arguments) for c in parser.calls]) == expected


def test_a_stream_sends_arguments_as_they_come_and_content_before_the_call() -> None:
    parser = ToolCallParser("hermes", NAMES, eager=True, new_id=counter())
    text = f"Checking.\n<tool_call>\n{W}\n</tool_call>"
    sent = [parser.feed(c) for c in text]
    first_call = next(i for i, d in enumerate(sent) if any(x.calls for x in d))
    assert "".join(x.content for d in sent[:first_call] for x in d) == "Checking."
    # named as soon as its arguments begin, then one fragment per character
    assert text[: first_call + 1].endswith('"arguments": {')
    assert [x.calls[0].openai() for x in sent[first_call]] == [
        {"index": 0, "id": "call_0", "type": "function", "function": {"name": "get_weather", "arguments": "{"}}
    ]
    fragments = [x.calls[0].arguments for d in sent[first_call + 1 :] for x in d]
    assert "".join(fragments) == '"city": "Paris"}' and all(len(f) == 1 for f in fragments)
    assert parser.finish() == []


def test_a_long_streamed_call_copies_its_arguments_in_linear_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stream of a call's arguments a character at a time (what the event loop runs): the text the
    parser copies out of its values grows with their length, not with its square."""

    class Counting(tools._Value):
        copied = 0

        @property
        def text(self) -> str:
            out = super().text
            Counting.copied += len(out)
            return out

        def since(self, start: int) -> str:
            out = super().since(start)
            Counting.copied += len(out)
            return out

    monkeypatch.setattr(tools, "_Value", Counting)
    copied = {}
    for n in (10_000, 40_000):
        arguments = json.dumps({"text": "x" * (n - 12)})
        assert len(arguments) == n
        parser = ToolCallParser("hermes", NAMES, eager=True, new_id=counter())
        Counting.copied = 0
        sent = [parser.feed(c) for c in f'<tool_call>{{"name": "get_weather", "arguments": {arguments}}}</tool_call>']
        copied[n] = Counting.copied
        assert "".join(x.calls[0].arguments for d in sent for x in d if x.calls) == arguments
        assert parser.finish() == [] and [(c.name, c.arguments) for c in parser.calls] == [("get_weather", arguments)]
    assert copied[10_000] <= 3 * 10_000 and copied[40_000] <= 3 * 40_000, copied
    assert copied[40_000] < 5 * copied[10_000], copied


def test_a_streamed_call_that_breaks_after_its_name_is_kept_as_sent() -> None:
    """Streaming cannot take back what it sent: the call keeps its arguments up to the break, the rest
    is content; the whole reading keeps the whole text as content."""
    text = '<tool_call>{"name": "get_time", "arguments": {"a": [1}} bye'
    for pieces in splits(text):
        deltas = run(ToolCallParser("hermes", NAMES, eager=True, new_id=counter()), pieces)
        assert assembled(deltas) == ("} bye", [("get_time", '{"a": [1}')])
    assert parse(text, request(), "hermes").calls == ()
    # cut short by max_tokens: the call stays, its arguments as far as they went
    deltas = run(
        ToolCallParser("mistral", NAMES, eager=True, new_id=counter()), ['[{"name": "get_weather", "arguments": {"ci']
    )
    assert assembled(deltas) == (None, [("get_weather", '{"ci')])


def test_without_parallel_calls_only_the_first_call_counts() -> None:
    req = request(parallel_tool_calls=False)
    got = parse(f"<tool_call>{T}</tool_call><tool_call>{W}</tool_call>", req, "hermes")
    assert [c.name for c in got.calls] == ["get_time"]
    stream = output_parser(req, "mistral", eager=True)
    assert stream is not None
    assert assembled(run(stream, list(f"[TOOL_CALLS][{W}, {T}]"))) == (None, [("get_weather", '{"city": "Paris"}')])


def test_forced_outputs_are_read_in_the_shape_the_grammar_forced() -> None:
    named = request(tool_choice={"type": "function", "function": {"name": "get_weather"}})
    got = parse(' {"city": "Paris"}', named, "llama3", new_id=counter())
    assert got.content is None and [(c.name, c.arguments) for c in got.calls] == [("get_weather", '{"city": "Paris"}')]
    for pieces in splits('{"city": "Paris"}'):
        parser = output_parser(named, "llama3", eager=True, new_id=counter())
        assert parser is not None
        assert assembled(run(parser, pieces)) == (None, [("get_weather", '{"city": "Paris"}')])
    required = request(tool_choice="required")
    got = parse(f"[{T}, {W}]", required, "llama3")
    assert [c.name for c in got.calls] == ["get_time", "get_weather"]
    assert parse("no", request(tool_choice="none"), "hermes") == parse("no", request(tool_choice="none"), None)
    assert parse(f"<tool_call>{T}</tool_call>", request(tool_choice="none"), "hermes").calls == ()
    # a model of no known family is read as Hermes writes calls
    assert [c.name for c in parse(f"<tool_call>{T}</tool_call>", request(), None).calls] == ["get_time"]


def test_a_forced_array_cut_by_max_tokens_keeps_its_calls_and_no_content() -> None:
    """`required` cut short: the calls read stay, what was left of the unfinished one is no content."""
    required = request(tool_choice="required")
    for text, whole, streamed in (
        (f'[{T}, {{"name": "get_wea', ["get_time"], ["get_time"]),
        (f'[{T}, {{"name": "get_weather", "arguments": {{"ci', ["get_time"], ["get_time", "get_weather"]),
        ('[{"name": "get_time", "argu', [], []),
        ("[", [], []),
    ):
        got = parse(text, required, "hermes")
        assert got.content is None and [c.name for c in got.calls] == whole, text
        for pieces in splits(text):
            parser = output_parser(required, "hermes", eager=True, new_id=counter())
            assert parser is not None
            content, calls = assembled(run(parser, pieces))
            assert content is None and [name for name, _ in calls] == streamed, (text, pieces)
    # an answer in the family's own syntax, cut the same way, keeps its text: it may be the model's words
    assert parse(f'[TOOL_CALLS][{T}, {{"name": "get_wea', request(), "mistral").content == ', {"name": "get_wea'


@settings(max_examples=300, deadline=None)
@given(
    case=st.sampled_from(CASES),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=8),
    eager=st.booleans(),
)
def test_random_cuts_read_the_same(
    case: tuple[str, str, str | None, list[tuple[str, str]]], cuts: list[int], eager: bool
) -> None:
    syntax, text, content, calls = case
    if eager:
        content, calls = BROKEN.get(text, (content, calls))
    points = sorted({min(c, len(text)) for c in cuts})
    pieces = [text[a:b] for a, b in zip([0, *points], [*points, len(text)], strict=True)]
    assert assembled(run(ToolCallParser(syntax, NAMES, eager=eager, new_id=counter()), pieces)) == (content, calls)


@settings(max_examples=300, deadline=None)
@given(
    text=st.text(alphabet=st.sampled_from(list('<tool_call>[]{}":, namegt_imrsTOLCAP|pyhg\n')), max_size=80),
    eager=st.booleans(),
)
def test_any_text_is_read_without_error_and_loses_nothing_but_calls(text: str, eager: bool) -> None:
    """Garbage never raises; with no call read, the content is the text itself."""
    for syntax in ("hermes", "llama3", "mistral"):
        whole = run(ToolCallParser(syntax, NAMES, eager=eager, new_id=counter()), [text])
        content, calls = assembled(whole)
        if not calls:
            assert (content or "") == text
        assert assembled(run(ToolCallParser(syntax, NAMES, eager=eager, new_id=counter()), list(text))) == (
            content,
            calls,
        )
