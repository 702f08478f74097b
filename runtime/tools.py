"""Tool calls: what a request asks for, and the model's calls read back out of its text.

The request side validates OpenAI's `tools`, `tool_choice` and `parallel_tool_calls` (and maps the
deprecated `functions`/`function_call` onto them) into one `ToolRequest`; errors are 400s naming the
field. `ToolRequest.forced_schema` is the JSON schema the grammar path constrains the output to when
the request forces a call (`required`, or a named function).

The response side turns generated text into OpenAI `tool_calls`. Each model family writes its calls
its own way, as its chat template teaches it:

- `llama3` (Llama 3.1/3.2/3.3 JSON tool calling): the whole answer is `{"name": ..., "parameters": {...}}`,
  maybe after `<|python_tag|>`, several separated by `;`;
- `hermes` (Qwen2.5, Qwen3, Hermes 2/3): `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`
  blocks anywhere in the answer, one per call;
- `mistral` (Mistral v3 tokenizer: 7B v0.3, Nemo, Small): `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`.

`<|python_tag|>` and `[TOOL_CALLS]` are special tokens, which decoding drops, so the parsers also take
the bare form: the answer beginning with the JSON object (llama3) or array (mistral).

One state machine, `ToolCallParser`, reads all three (and the forced shapes): fed text in pieces of
any size, it hands back content deltas until a call starts, then `delta.tool_calls` pieces (index,
id, type and name first, then argument fragments). Text that is not a well-formed call to a declared
tool stays content, unchanged. Two modes, both independent of how the text is split:
- `parse(text)` (non-streamed responses) counts a call only once it is complete and valid;
- a stream (`eager=True`) commits to a call once its name (a declared tool) is read and its
  arguments have begun, and then sends the arguments as they are generated. A call that breaks
  after that point cannot be taken back: its arguments stop where it broke, the rest is content.
  For a call the grammar forces that never happens; for a well-formed answer both modes agree.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import string
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from kold.runtime.chat_template import takes_tools
from kold.runtime.protocol import InvalidRequestError

ToolFamily = Literal["llama3", "hermes", "mistral"]
FAMILIES: tuple[ToolFamily, ...] = ("llama3", "hermes", "mistral")

# OpenAI's rule for function names
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_ID_ALPHABET = string.ascii_letters + string.digits


def new_call_id() -> str:
    """`call_` and 24 random letters and digits, as OpenAI's ids look."""
    return "call_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


# -- which family ------------------------------------------------------------------------------------

# What each family's chat template writes when it renders a call or the tools: the template is what
# taught the model its format, so it decides (a Llama fine-tune trained on Hermes' format has a Hermes
# template and model_type "llama").
_TEMPLATE_MARKS: tuple[tuple[ToolFamily, tuple[str, ...]], ...] = (
    ("hermes", ("<tool_call>",)),
    ("mistral", ("[TOOL_CALLS]", "[AVAILABLE_TOOLS]")),
    ("llama3", ("<|python_tag|>", "Environment: ipython")),
)
# config.json's model_type, when the template says nothing
_MODEL_TYPES: dict[str, ToolFamily] = {
    "llama": "llama3",
    "qwen2": "hermes",
    "qwen2_moe": "hermes",
    "qwen3": "hermes",
    "qwen3_moe": "hermes",
    "mistral": "mistral",
    "mixtral": "mistral",
}


def tool_family(chat_template: str | None, model_type: str | None = None) -> ToolFamily | None:
    """The tool-call family of a model: from its chat template's markers first (the first family whose
    markers it contains, in the order above); "hermes" when the template takes no tools (no template
    means ChatML: `chat_template.toolless_messages` then shows the tools and calls the Hermes way); else
    from its `model_type`; None when none of these says."""
    if chat_template:
        for family, marks in _TEMPLATE_MARKS:
            if any(mark in chat_template for mark in marks):
                return family
    if chat_template is None or not takes_tools(chat_template):
        return "hermes"
    if model_type:
        return _MODEL_TYPES.get(model_type)
    return None


# -- the request -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tool:
    """One declared function. `parameters`: its JSON schema (None: declared without one, no arguments)."""

    name: str
    description: str | None = None
    parameters: Mapping[str, Any] | None = None
    strict: bool = False

    def template_entry(self) -> dict[str, Any]:
        """The tool as chat templates take it (transformers' `tools=[{"type": "function", "function": ...}]`)."""
        function: dict[str, Any] = {"name": self.name}
        if self.description is not None:
            function["description"] = self.description
        if self.parameters is not None:
            function["parameters"] = self.parameters
        return {"type": "function", "function": function}

    def arguments_schema(self) -> dict[str, Any]:
        """The schema a forced call's arguments follow: the parameters, their objects closed (below)."""
        if self.parameters is None:
            return {"type": "object", "properties": {}, "additionalProperties": False}
        closed = _closed({"type": "object", **self.parameters})
        assert isinstance(closed, dict)
        return closed


Choice = Literal["auto", "none", "required", "named"]


@dataclass(frozen=True)
class ToolRequest:
    """What a chat request asks of tools. `named`: the function `choice == "named"` forces. `legacy`:
    the request used the deprecated `functions`/`function_call`, so the answer is `message.function_call`."""

    tools: tuple[Tool, ...]
    choice: Choice = "auto"
    named: str | None = None
    parallel: bool = True
    legacy: bool = False

    @property
    def names(self) -> frozenset[str]:
        return frozenset(t.name for t in self.tools)

    @property
    def strict(self) -> bool:
        """Whether a forced call refuses schema keywords the grammar library does not implement (any
        tool declared `strict`), rather than ignoring them."""
        return any(t.strict for t in self.tools)

    @property
    def forced(self) -> bool:
        """Whether the grammar makes the model call (`required` or a named function)."""
        return self.choice in ("required", "named")

    @property
    def parses(self) -> bool:
        """Whether the output is read for calls (`none` renders the tools but never calls)."""
        return self.choice != "none"

    def tool(self, name: str) -> Tool:
        return next(t for t in self.tools if t.name == name)

    def template_tools(self) -> list[dict[str, Any]]:
        return [t.template_entry() for t in self.tools]

    def forced_schema(self, family: ToolFamily | None) -> dict[str, Any]:
        """The JSON schema the output is constrained to when a call is forced.

        A named function: its arguments object alone. `required`: a JSON array of calls
        `{"name": ..., "arguments": {...}}` (`"parameters"` for llama3, the key its template teaches),
        one of the declared tools each, at least one (exactly one without `parallel_tool_calls`); each
        tool's `$defs`/`definitions` moved to the array's root, under names of its own (`_hoisted`).
        """
        if self.choice == "named" and self.named is not None:
            return self.tool(self.named).arguments_schema()
        key = arguments_key(family)
        calls = []
        defs: dict[str, dict[str, Any]] = {}
        for i, t in enumerate(self.tools):
            at = f"/items/properties/{key}" if len(self.tools) == 1 else f"/items/anyOf/{i}/properties/{key}"
            arguments, hoisted = _hoisted(t.arguments_schema(), f"tool{i}__", at)
            for where, named in hoisted.items():
                defs.setdefault(where, {}).update(named)
            calls.append(
                {
                    "type": "object",
                    "properties": {"name": {"const": t.name}, key: arguments},
                    "required": ["name", key],
                    "additionalProperties": False,
                }
            )
        items: dict[str, Any] = calls[0] if len(calls) == 1 else {"anyOf": calls}
        schema: dict[str, Any] = {"type": "array", "items": items, "minItems": 1}
        if not self.parallel:
            schema["maxItems"] = 1
        return {**schema, **defs}


_DEFS = ("$defs", "definitions")
# keywords whose value maps names to schemas, and keywords whose value is data, not a schema
_NAMED_SCHEMAS = frozenset({"properties", "patternProperties", "dependentSchemas", *_DEFS})
_DATA = frozenset({"const", "enum", "default", "examples"})


def _hoisted(schema: dict[str, Any], prefix: str, at: str) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """A tool's arguments schema moved from the root of its own document to the JSON pointer `at` of
    the forced schema: its `$defs`/`definitions` go to that schema's root under `prefix` + their names
    (the ones a local `$ref` can reach), and every local `$ref` is rewritten to match. Pydantic's schemas
    of nested models refer to `#/$defs/...`, which would otherwise point nowhere."""
    defs = {key: schema[key] for key in _DEFS if isinstance(schema.get(key), Mapping)}

    def rewrite(ref: str) -> str:
        if not ref.startswith("#"):  # another document's: not ours to move
            return ref
        path = ref[1:]
        for key in defs:
            if path.startswith(f"/{key}/"):
                return f"#/{key}/{prefix}{path[len(key) + 2 :]}"
        return f"#{at}{path}"

    body = {k: v for k, v in schema.items() if k not in defs}
    moved = {key: {prefix + name: _refs(d, rewrite) for name, d in named.items()} for key, named in defs.items()}
    return _refs(body, rewrite), moved


def _refs(schema: Any, rewrite: Callable[[str], str]) -> Any:
    """`schema` with every `$ref` string passed through `rewrite` (data values left as they are)."""
    if isinstance(schema, list):
        return [_refs(s, rewrite) for s in schema]
    if not isinstance(schema, Mapping):
        return schema
    out: dict[str, Any] = {}
    for k, v in schema.items():
        if k == "$ref" and isinstance(v, str):
            out[k] = rewrite(v)
        elif k in _NAMED_SCHEMAS and isinstance(v, Mapping):
            out[k] = {name: _refs(s, rewrite) for name, s in v.items()}
        else:
            out[k] = v if k in _DATA else _refs(v, rewrite)
    return out


def _closed(schema: Any) -> Any:
    """`schema` with every object that declares its properties closed to others (`additionalProperties:
    false` unless it says otherwise), as OpenAI's strict function calling has them and xgrammar's strict
    mode generates them: JSON Schema's default lets a grammar append keys the function never declared
    (a weak model fills them until it runs out of tokens). Not inside `allOf`, whose branches each see
    only part of the properties."""
    if not isinstance(schema, Mapping):
        return schema
    out = dict(schema)
    if "properties" in out and "additionalProperties" not in out and "patternProperties" not in out:
        out["additionalProperties"] = False
    if isinstance(out.get("properties"), Mapping):
        out["properties"] = {k: _closed(v) for k, v in out["properties"].items()}
    for key in ("$defs", "definitions"):
        if isinstance(out.get(key), Mapping):
            out[key] = {k: _closed(v) for k, v in out[key].items()}
    for key in ("anyOf", "oneOf", "prefixItems"):
        if isinstance(out.get(key), list):
            out[key] = [_closed(v) for v in out[key]]
    if isinstance(out.get("items"), Mapping):
        out["items"] = _closed(out["items"])
    return out


def arguments_key(family: ToolFamily | None) -> str:
    """The key a family's calls hold their arguments under."""
    return "parameters" if family == "llama3" else "arguments"


def parse_tool_request(
    tools: Sequence[Any] | None,
    tool_choice: Any,
    parallel_tool_calls: Any = None,
    functions: Sequence[Any] | None = None,
    function_call: Any = None,
) -> ToolRequest | None:
    """Validate a chat request's tool fields (`InvalidRequestError` naming the field); None: no tools
    (a `tool_choice` of "none" or "auto" without tools asks for nothing)."""
    if parallel_tool_calls is not None and not isinstance(parallel_tool_calls, bool):
        raise InvalidRequestError("parallel_tool_calls must be a boolean", param="parallel_tool_calls")
    if functions:
        if tools:
            raise InvalidRequestError("use tools or the deprecated functions, not both", param="functions")
        if tool_choice not in (None, "auto", "none"):
            raise InvalidRequestError("tool_choice goes with tools; functions take function_call", param="tool_choice")
        declared = tuple(_tool(f, f"functions[{i}]") for i, f in enumerate(_list(functions, "functions")))
        choice, named = _choice(function_call, "function_call", declared, legacy=True)
        _unique(declared, "functions")
        return ToolRequest(declared, choice, named, parallel=False, legacy=True)
    _choice(function_call, "function_call", (), legacy=True)  # "auto" or "none" ask for nothing
    if not tools:
        choice, _ = _choice(tool_choice, "tool_choice", (), legacy=False)
        return None
    declared = tuple(_tool_entry(t, f"tools[{i}]") for i, t in enumerate(_list(tools, "tools")))
    _unique(declared, "tools")
    choice, named = _choice(tool_choice, "tool_choice", declared, legacy=False)
    return ToolRequest(declared, choice, named, parallel=parallel_tool_calls is not False)


def _list(value: Any, param: str) -> list[Any]:
    if not isinstance(value, list):
        raise InvalidRequestError(f"{param} must be a list", param=param)
    return value


def _tool_entry(entry: Any, param: str) -> Tool:
    if not isinstance(entry, Mapping):
        raise InvalidRequestError(f"{param} must be an object", param=param)
    if entry.get("type") != "function":
        raise InvalidRequestError(
            f"{param}.type must be 'function' (got {entry.get('type')!r}): only function tools are supported",
            param=f"{param}.type",
        )
    return _tool(entry.get("function"), f"{param}.function")


def _tool(function: Any, param: str) -> Tool:
    if not isinstance(function, Mapping):
        raise InvalidRequestError(f"{param} must be an object with a name", param=param)
    name = function.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidRequestError(
            f"{param}.name must be 1 to 64 letters, digits, underscores or dashes (got {name!r})", param=f"{param}.name"
        )
    description = function.get("description")
    if description is not None and not isinstance(description, str):
        raise InvalidRequestError(f"{param}.description must be a string", param=f"{param}.description")
    strict = function.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise InvalidRequestError(f"{param}.strict must be a boolean", param=f"{param}.strict")
    parameters = function.get("parameters")
    if parameters is not None:
        _check_parameters(parameters, f"{param}.parameters")
    return Tool(name, description, parameters, bool(strict))


def _check_parameters(schema: Any, param: str) -> None:
    """A function's parameters are a JSON schema of an object (what the arguments JSON is)."""
    if not isinstance(schema, Mapping):
        raise InvalidRequestError(f"{param} must be a JSON schema object", param=param)
    kind = schema.get("type", "object")
    if kind != "object":
        raise InvalidRequestError(f"{param}.type must be 'object' (the arguments are a JSON object)", param=param)
    properties = schema.get("properties", {})
    if not isinstance(properties, Mapping) or not all(isinstance(v, Mapping | bool) for v in properties.values()):
        raise InvalidRequestError(f"{param}.properties must map names to schemas", param=f"{param}.properties")
    required = schema.get("required", [])
    if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        raise InvalidRequestError(f"{param}.required must be a list of property names", param=f"{param}.required")


def _unique(declared: Iterable[Tool], param: str) -> None:
    seen: set[str] = set()
    for t in declared:
        if t.name in seen:
            raise InvalidRequestError(f"{param}: the function name {t.name!r} is declared twice", param=param)
        seen.add(t.name)


def _choice(value: Any, param: str, declared: Sequence[Tool], *, legacy: bool) -> tuple[Choice, str | None]:
    """`auto` unless said otherwise (OpenAI's default with tools); `required` has no legacy form."""
    if value is None or value == "auto":
        return "auto", None
    if value == "none":
        return "none", None
    if value == "required" and not legacy:
        if not declared:
            raise InvalidRequestError(f"{param} 'required' needs tools to call", param=param)
        return "required", None
    if isinstance(value, Mapping):
        if legacy:
            name = value.get("name")
        else:
            function = value.get("function")
            if value.get("type") != "function" or not isinstance(function, Mapping):
                raise InvalidRequestError(
                    f'{param} must be "auto", "none", "required" or {{"type": "function", "function": {{"name": ...}}}}',
                    param=param,
                )
            name = function.get("name")
        if not isinstance(name, str):
            raise InvalidRequestError(f"{param} names no function", param=param)
        if name not in {t.name for t in declared}:
            raise InvalidRequestError(f"{param} names the function {name!r}, which is not declared", param=param)
        return "named", name
    options = '"auto", "none" or {"name": ...}' if legacy else '"auto", "none", "required" or a named function'
    raise InvalidRequestError(f"{param} must be {options} (got {value!r})", param=param)


# -- calls read out of the text -------------------------------------------------------------------


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # the JSON text of the arguments object, as the model wrote it

    def openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class CallDelta:
    """One `delta.tool_calls[]` item: `id` and `name` only in a call's first piece."""

    index: int
    arguments: str = ""
    id: str | None = None
    name: str | None = None

    def openai(self) -> dict[str, Any]:
        out: dict[str, Any] = {"index": self.index}
        function: dict[str, Any] = {}
        if self.id is not None:
            out.update(id=self.id, type="function")
        if self.name is not None:
            function["name"] = self.name
        function["arguments"] = self.arguments
        out["function"] = function
        return out


@dataclass
class Delta:
    """What one piece of text turned into: content, or pieces of calls (never both: order matters)."""

    content: str = ""
    calls: list[CallDelta] = field(default_factory=list)


@dataclass(frozen=True)
class Parsed:
    content: str | None  # None when there is none (OpenAI's `content: null` beside tool_calls)
    calls: tuple[ToolCall, ...]


# How a family's calls are laid out in the text.
@dataclass(frozen=True)
class _Syntax:
    markers: tuple[str, ...] = ()  # open a call region anywhere in the content
    start_markers: tuple[str, ...] = ()  # ... only at the start of the answer
    start_opener: str = ""  # a character that opens a region at the start of the answer ("{" or "[")
    region: Literal["object", "sequence", "array"] = "object"
    close: str = ""  # what ends an "object" region (optional at the end of the text)


_SYNTAX: dict[str, _Syntax] = {
    "hermes": _Syntax(markers=("<tool_call>",), region="object", close="</tool_call>"),
    "llama3": _Syntax(start_markers=("<|python_tag|>",), start_opener="{", region="sequence"),
    "mistral": _Syntax(markers=("[TOOL_CALLS]",), start_opener="[", region="array"),
    "array": _Syntax(start_opener="[", region="array"),  # the forced `required` shape
}

_WS = " \t\r\n"
_KEYS = frozenset({"name", "arguments", "parameters", "id", "type"})


class _Value:
    """Where one JSON value ends, read character by character (strings and nesting understood; whether
    the value is valid JSON is json.loads' job at the end)."""

    def __init__(self) -> None:
        self.chars: list[str] = []
        self.kind = ""  # "container", "string" or "scalar"
        self.depth = 0
        self.in_string = False
        self.escaped = False

    @property
    def text(self) -> str:
        return "".join(self.chars)

    def since(self, start: int) -> str:
        """The value's text from character `start` on (a stream copies only what is new)."""
        return "".join(self.chars[start:])

    def feed(self, c: str) -> Literal["more", "done", "before", "error"]:
        """`done`: `c` ended the value; `before`: the value (a number or literal) ended before `c`."""
        if not self.kind:
            if c in "{[":
                self.kind, self.depth = "container", 1
            elif c == '"':
                self.kind, self.in_string = "string", True
            elif c in "-0123456789tfn":
                self.kind = "scalar"
            else:
                return "error"
            self.chars.append(c)
            return "more"
        if self.kind == "scalar":
            if c in _WS or c in ",}]":
                return "before"
            self.chars.append(c)
            return "more"
        self.chars.append(c)
        if self.in_string:
            if self.escaped:
                self.escaped = False
            elif c == "\\":
                self.escaped = True
            elif c == '"':
                self.in_string = False
                if self.kind == "string":
                    return "done"
            return "more"
        if c == '"':
            self.in_string = True
        elif c in "{[":
            self.depth += 1
        elif c in "}]":
            self.depth -= 1
            if self.depth == 0:
                return "done"
        return "more"


class _CallObject:
    """One call object, `{"name": "...", "arguments": {...}}`, read character by character."""

    def __init__(self) -> None:
        self.state = "open"  # open, key_or_end, key, colon, value, after_value, done
        self.value: _Value | None = None
        self.key = ""
        self.seen: set[str] = set()
        self.name: str | None = None
        self.args: _Value | None = None  # the arguments value, while and after it is read
        self.args_done = False

    @property
    def arguments(self) -> str:
        return self.args.text if self.args is not None else ""

    def feed(self, c: str) -> bool:
        """Take `c`; False when the text stops being a call object (unknown key, bad JSON, ...)."""
        state = self.state
        if state == "open":
            if c in _WS:
                return True
            if c != "{":
                return False
            self.state = "key_or_end"
            return True
        if state in ("key_or_end", "key_next"):
            if c in _WS:
                return True
            if c == "}" and state == "key_or_end":
                self.state = "done"
                return True
            if c != '"':
                return False
            self.state, self.value = "key", _Value()
            self.value.feed(c)
            return True
        if state == "key":
            assert self.value is not None
            if self.value.feed(c) == "done":
                key = _loads(self.value.text)
                if not isinstance(key, str) or key not in _KEYS or key in self.seen:
                    return False
                if key in ("arguments", "parameters") and ({"arguments", "parameters"} & self.seen):
                    return False
                self.seen.add(key)
                self.key, self.state = key, "colon"
            return True
        if state == "colon":
            if c in _WS:
                return True
            if c != ":":
                return False
            self.state, self.value = "value", None
            return True
        if state == "value":
            if self.value is None:
                if c in _WS:
                    return True
                self.value = _Value()
                if self.key in ("arguments", "parameters"):
                    if c != "{":
                        return False
                    self.args = self.value
            result = self.value.feed(c)
            if result == "error":
                return False
            if result == "more":
                return True
            if not self._value_done():
                return False
            self.state = "after_value"
            return True if result == "done" else self.feed(c)
        if state == "after_value":
            if c in _WS:
                return True
            if c == ",":
                self.state = "key_next"
                return True
            if c == "}":
                self.state = "done"
                return True
            return False
        return False  # a character after the object's end is not the object's

    def _value_done(self) -> bool:
        assert self.value is not None
        if self.key in ("arguments", "parameters"):
            self.args_done = True
            return isinstance(_loads(self.value.text), dict)
        if self.key == "name":
            name = _loads(self.value.text)
            if not isinstance(name, str):
                return False
            self.name = name
            return True
        return _loads(self.value.text) is not _INVALID

    @property
    def done(self) -> bool:
        return self.state == "done"


_INVALID = object()


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return _INVALID


class ToolCallParser:
    """Reads a generation's text as it comes: content, and calls in the family's syntax (module docstring).

    `feed(text)` and `finish()` return the `Delta`s to send, in order; `calls` and `content` hold
    the whole result so far (a streamed call's arguments once it ends, or at `finish`). `names`: the declared tools (a call to anything else is content).
    `parallel=False`: the first call only (what follows it is dropped).
    """

    def __init__(
        self,
        syntax: str,
        names: Iterable[str],
        *,
        eager: bool,
        parallel: bool = True,
        new_id: Callable[[], str] = new_call_id,
    ) -> None:
        self.syntax = _SYNTAX[syntax]
        self.forced = syntax == "array"  # the grammar's array of calls (`tool_choice: required`)
        self.names = frozenset(names)
        self.eager = eager
        self.parallel = parallel
        self.new_id = new_id
        self.calls: list[ToolCall] = []
        self.content_parts: list[str] = []
        self._out: list[Delta] = []
        self._todo: list[str] = []  # characters to read before the next one fed (reversed: a stack)
        self._mode = "start"  # start, content, region, done
        self._hold = ""  # text that may be the beginning of a marker (or of the closing tag)
        self._ws = ""  # whitespace not yet sent: dropped if a call follows it
        # the region's marker, then its characters since its last call: content if they make no call
        self._fallback: list[str] = [""]
        self._region = "before"  # before, next (an object), object, after (an object), closing
        self._obj: _CallObject | None = None
        self._committed: int | None = None  # the index of the call being read (a stream sends it as it goes)
        self._sent_args = 0
        self._args: list[str] = []  # the committed call's arguments sent, in pieces (`calls` has them once it ends)
        self._after_call = False  # nothing but whitespace since the last call

    # -- the public side --------------------------------------------------------------------------

    @property
    def content(self) -> str:
        return "".join(self.content_parts)

    def feed(self, text: str) -> list[Delta]:
        for c in text:
            self._char(c)
            while self._todo:
                self._char(self._todo.pop())
        return self._take()

    def finish(self) -> list[Delta]:
        if self._mode in ("start", "content"):
            self._content(self._hold)
            self._hold = ""
        elif self._mode == "region" and self._committed is None and self._region not in ("after", "closing"):
            # no call in it (a cut-short call is kept as it is; complete ones missing their closing
            # tag or bracket are taken as they are); in a forced array it is a call max_tokens cut
            # before it was read (the grammar's JSON, not the model's words): dropped
            if self.forced:
                self._ws = ""
            else:
                self._content("".join(self._fallback))
        while self._todo:  # (none: feed empties it)
            self._char(self._todo.pop())
        self._settle()  # a call cut short keeps the arguments sent
        if self._ws and not self.calls:
            self._emit_content(self._ws)
        self._ws, self._mode = "", "done"
        return self._take()

    # -- characters -------------------------------------------------------------------------------

    def _char(self, c: str) -> None:
        if self._mode == "region":
            self._region_char(c)
        elif self._mode in ("start", "content"):
            self._content_char(c)
        # "done" (parallel calls off, the first call made): the rest is dropped

    def _markers(self) -> tuple[str, ...]:
        syntax = self.syntax
        return syntax.markers + (syntax.start_markers if self._mode == "start" else ())

    def _content_char(self, c: str) -> None:
        syntax = self.syntax
        if self._mode == "start" and not self._hold:
            if c in _WS:
                self._ws += c
                return
            if c == syntax.start_opener:
                self._open_region("")
                self._region_char(c)
                return
        self._hold += c
        while self._hold:
            markers = self._markers()
            if self._hold in markers:
                marker, self._hold = self._hold, ""
                self._open_region(marker)
                return
            if any(m.startswith(self._hold) for m in markers):
                return
            # the held text is no marker: its first character is content, the rest may begin one
            self._content(self._hold[0])
            self._hold = self._hold[1:]
            self._mode = "content"

    def _open_region(self, marker: str) -> None:
        self._mode, self._region, self._obj, self._fallback = "region", "before", None, [marker]

    def _region_char(self, c: str) -> None:
        syntax = self.syntax
        self._fallback.append(c)
        region = self._region
        if region == "after":
            return self._after_object(c)
        if region == "closing":
            return self._closing(c)
        if region in ("before", "next"):
            if c in _WS:
                return
            if region == "before" and syntax.region == "array":
                if c == "[":
                    self._region = "next"
                    return
                if not (
                    self._fallback[0] and c == "{"
                ):  # a bare array must open with "["; after the marker "{" will do
                    return self._fail()
            self._region, self._obj = "object", _CallObject()
        assert self._obj is not None
        if not self._obj.feed(c):
            return self._fail()
        self._progress()

    def _progress(self) -> None:
        """After a character of a call object: commit to it, send its arguments, complete it."""
        obj = self._obj
        assert obj is not None
        if (obj.name is not None and obj.name not in self.names) or (obj.done and obj.name is None):
            return self._fail()
        if self._committed is None and obj.name is not None and (obj.done or (self.eager and obj.args is not None)):
            self._commit(obj.name)
        if self._committed is not None and self.eager and obj.args is not None:
            self._send_args(obj.args.since(self._sent_args))
        if obj.done:
            self._complete(obj)

    def _commit(self, name: str) -> None:
        index = len(self.calls)
        call_id = self.new_id()
        self.calls.append(ToolCall(call_id, name, ""))
        self._committed, self._sent_args, self._args, self._ws = index, 0, [], ""
        self._emit_call(CallDelta(index, "", call_id, name))

    def _send_args(self, new: str) -> None:
        """Send the committed call's arguments that follow those sent (kept as pieces: joining them all
        again for each character of a stream would cost the square of their length)."""
        index = self._committed
        assert index is not None
        if not new:
            return
        self._sent_args += len(new)
        self._args.append(new)
        self._emit_call(CallDelta(index, new))

    def _settle(self) -> None:
        """The committed call in `calls` with its arguments as sent so far."""
        index = self._committed
        if index is not None:
            call = self.calls[index]
            self.calls[index] = ToolCall(call.id, call.name, "".join(self._args))

    def _complete(self, obj: _CallObject) -> None:
        self._send_args(obj.args.since(self._sent_args) if obj.args is not None else "{}")
        self._settle()
        self._committed, self._obj, self._fallback, self._after_call = None, None, [""], True
        if not self.parallel:
            self._mode, self._hold = "done", ""
            return
        self._region = "after"

    def _after_object(self, c: str) -> None:
        syntax = self.syntax
        if c in _WS:
            return
        if syntax.region == "array" and c == ",":
            self._region = "next"
        elif syntax.region == "array" and c == "]":
            self._leave_region()
        elif syntax.region == "sequence" and c == ";":
            self._region = "next"
        elif syntax.region == "sequence" and c == "{":
            self._region, self._obj = "object", _CallObject()
            self._obj.feed(c)
        elif syntax.region == "object" and syntax.close and c == syntax.close[0]:
            self._region, self._hold = "closing", c
        else:  # no more calls here: the rest is content
            self._leave_region()
            self._content_char(c)

    def _closing(self, c: str) -> None:
        close = self.syntax.close
        self._hold += c
        if self._hold == close:
            self._hold = ""
            self._leave_region()
        elif not close.startswith(self._hold):  # not the closing tag after all: content
            held, self._hold = self._hold, ""
            self._leave_region()
            self._todo.extend(reversed(held))

    def _leave_region(self) -> None:
        self._mode, self._region, self._obj, self._fallback = "content", "before", None, [""]

    def _fail(self) -> None:
        """The region stops being a call at its last character: what is not a call already is content
        (its marker at once, the characters after it read again as content)."""
        if self._committed is not None:  # sent already (a stream): the call stays, cut where it broke
            self._settle()
            self._committed = None
            marker, again = "", self._fallback[-1:]
        else:
            marker, again = self._fallback[0], self._fallback[1:]
        self._leave_region()
        self._content(marker)
        self._todo.extend(reversed(again))

    # -- output -----------------------------------------------------------------------------------

    def _content(self, text: str) -> None:
        """Content text: whitespace waits for what follows it (dropped next to a call)."""
        if not text:
            return
        stripped = text.rstrip(_WS)
        if stripped:
            self._emit_content(("" if self._after_call else self._ws) + stripped)
            self._ws, self._after_call = "", False
        self._ws += text[len(stripped) :]

    def _emit_content(self, text: str) -> None:
        self.content_parts.append(text)
        if self._out and not self._out[-1].calls:
            self._out[-1].content += text
        else:
            self._out.append(Delta(content=text))

    def _emit_call(self, delta: CallDelta) -> None:
        last = self._out[-1] if self._out else None
        if last is None or not last.calls:
            self._out.append(Delta(calls=[delta]))
        elif last.calls[-1].index == delta.index:
            prev = last.calls[-1]
            last.calls[-1] = CallDelta(prev.index, prev.arguments + delta.arguments, prev.id, prev.name)
        else:
            last.calls.append(delta)

    def _take(self) -> list[Delta]:
        out, self._out = self._out, []
        return out


class NamedCallParser:
    """The output of a call to one named function that the grammar forced: the text is its arguments
    (kept in pieces, joined when read: a stream adds one token's text at a time)."""

    def __init__(self, name: str, *, new_id: Callable[[], str] = new_call_id) -> None:
        self.id, self.name = new_id(), name
        self._args: list[str] = []

    @property
    def call(self) -> ToolCall:
        return ToolCall(self.id, self.name, "".join(self._args))

    @property
    def calls(self) -> list[ToolCall]:
        return [self.call]

    @property
    def content(self) -> str:
        return ""

    def feed(self, text: str) -> list[Delta]:
        started = bool(self._args)
        if not started:
            text = text.lstrip(_WS)
            if not text:
                return []
        self._args.append(text)
        if started:
            return [Delta(calls=[CallDelta(0, text)])]
        return [Delta(calls=[CallDelta(0, text, self.id, self.name)])]

    def finish(self) -> list[Delta]:
        if self._args:
            return []
        self._args.append("")
        return [Delta(calls=[CallDelta(0, "", self.id, self.name)])]


OutputParser = ToolCallParser | NamedCallParser


def output_parser(
    request: ToolRequest, family: ToolFamily | None, *, eager: bool, new_id: Callable[[], str] = new_call_id
) -> OutputParser | None:
    """The parser for a request's output; None when it is never read for calls (`tool_choice: none`).

    A forced call is read in the shape its grammar forced (the arguments alone, or an array of calls);
    `auto` in the family's own syntax, Hermes' for a model whose family is unknown (the most common
    convention among open models)."""
    if not request.parses:
        return None
    if request.choice == "named" and request.named is not None:
        return NamedCallParser(request.named, new_id=new_id)
    syntax = "array" if request.choice == "required" else (family or "hermes")
    return ToolCallParser(syntax, request.names, eager=eager, parallel=request.parallel, new_id=new_id)


def parse(
    text: str,
    request: ToolRequest,
    family: ToolFamily | None,
    *,
    new_id: Callable[[], str] = new_call_id,
) -> Parsed:
    """The content and calls of a whole generation (only complete, valid calls count)."""
    parser = output_parser(request, family, eager=False, new_id=new_id)
    if parser is None:
        return Parsed(text, ())
    parser.feed(text)
    parser.finish()
    return Parsed(parser.content or None, tuple(parser.calls))


# -- ids a template insists on ----------------------------------------------------------------------

_MISTRAL_ID = re.compile(r"[A-Za-z0-9]{9}")


def mistral_call_id(call_id: str) -> str:
    """Mistral's template refuses any call id but 9 letters or digits: a longer id maps to 9 hex digits
    of its hash, the same for the assistant's call and the tool result that answers it."""
    if _MISTRAL_ID.fullmatch(call_id):
        return call_id
    return hashlib.sha256(call_id.encode()).hexdigest()[:9]
