"""Chat templates, rendered the way Hugging Face transformers renders them (without importing it).

A model's chat template is a Jinja2 program shipped in `tokenizer_config.json` (`chat_template`) or in
`chat_template.jinja`. transformers compiles it in an `ImmutableSandboxedEnvironment` with
`trim_blocks` and `lstrip_blocks`, the `loopcontrols` extension, a JSON `tojson` filter that does not
HTML-escape, and the globals `raise_exception` and `strftime_now`; it renders it with `messages`,
`tools`, `documents`, `add_generation_prompt` and the tokenizer's named special tokens (`bos_token`,
`eos_token`, ... , only those that are set). This module does the same, so a prompt rendered here is
byte-identical to `AutoTokenizer.apply_chat_template(messages, tokenize=False)`.

Tools go to the template as transformers passes them (`tools=[{"type": "function", "function": {...}}]`),
and `template_messages` turns OpenAI's tool-call turns into the shape templates read: an assistant's
`tool_calls` with their `arguments` as objects, not JSON text (what Llama's and Qwen's templates
`tojson`), and `tool` messages with their `tool_call_id`.

A template that takes no tools (plain ChatML, SmolLM2's) would drop the tools and fail on a tool-call turn
(no `content`); for it `toolless_messages` writes the tool parts into the conversation as text, in the
Hermes/Qwen convention (`tools.tool_family` then reads the model's output as Hermes calls).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

# ChatML: the template transformers used for years when a model shipped none.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# The Hermes/Qwen tool prompt, around one JSON line per tool, for templates that do not render tools.
_TOOLS_HEAD = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
_TOOLS_TAIL = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}'
    "\n</tool_call>"
)

# Names a message's reasoning is passed under; transformers fills them all from whichever is set.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class ChatTemplateError(ValueError):
    """A template that does not compile, or that rejects the conversation (`raise_exception`)."""


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (assistant-mask markers in some templates): render the body."""

    tags = {"generation"}  # noqa: RUF012 (jinja's Extension API declares it as a class attribute)

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return str(caller())


class _Namespace(jinja2.utils.Namespace):
    """`namespace()` that refuses underscore-prefixed attributes, as transformers' does."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: object) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set {name!r} on a namespace")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=32)
def compile_chat_template(source: str) -> jinja2.Template:
    """Compile a template once (cached by its text); `ChatTemplateError` on a syntax error."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _Namespace
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as exc:
        raise ChatTemplateError(f"chat template does not compile: {exc}") from None


def _plain(value: Any) -> Any:
    """JSON-like copies of what the template sees (so it can neither mutate nor reach caller objects)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    dump = getattr(value, "model_dump", None)
    if callable(dump):  # pydantic models
        return _plain(dump())
    return f"<{type(value).__name__}>"


def normalize_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """What transformers hands the template: keys whose value is None dropped, reasoning fields aliased."""
    out: list[dict[str, Any]] = []
    for message in messages:
        if not isinstance(message, Mapping):
            raise TypeError(f"chat messages must be dicts, got {message!r}")
        msg = {k: _plain(v) for k, v in message.items() if v is not None}
        reasoning = next((msg[k] for k in _REASONING_FIELDS if msg.get(k) is not None), None)
        if reasoning is not None:
            msg = {"thinking": reasoning, **msg, "reasoning_content": reasoning}
        out.append(msg)
    return out


def render_chat_template(
    source: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = True,
    special_tokens: Mapping[str, str] | None = None,
    tools: list[dict[str, Any]] | None = None,
    documents: list[dict[str, Any]] | None = None,
    **kwargs: Any,
) -> str:
    """Render `source` over `messages` exactly as `apply_chat_template(..., tokenize=False)` does.

    `special_tokens` are the tokenizer's named special tokens (`{"bos_token": "<s>", ...}`, unset ones
    left out); `kwargs` are extra template variables and override special tokens of the same name.
    """
    if not messages:
        raise ChatTemplateError("cannot apply a chat template to an empty conversation")
    template = compile_chat_template(source)
    if not takes_tools(source) and _has_tool_parts(messages, tools):
        messages, tools = toolless_messages(messages, tools), None
    variables = {**(special_tokens or {}), **kwargs}
    try:
        return template.render(
            messages=normalize_messages(messages),
            tools=_plain(tools),
            documents=_plain(documents),
            add_generation_prompt=add_generation_prompt,
            **_plain(variables),
        )
    except (jinja2.exceptions.TemplateError, TypeError) as exc:  # raise_exception(...), or content it cannot join
        raise ChatTemplateError(f"chat template rejected the conversation: {exc}") from None


def takes_tools(source: str) -> bool:
    """Whether a template renders tools and tool calls itself (its source names `tools` or `tool_calls`)."""
    return "tools" in source or "tool_calls" in source


def _has_tool_parts(messages: Sequence[Mapping[str, Any]], tools: list[dict[str, Any]] | None) -> bool:
    return bool(tools) or any(
        isinstance(m, Mapping)
        and (m.get("tool_calls") or m.get("function_call") or m.get("role") in ("tool", "function"))
        for m in messages
    )


def toolless_messages(
    messages: Sequence[Mapping[str, Any]], tools: list[dict[str, Any]] | None
) -> list[dict[str, Any]]:
    """The conversation with its tool parts as text, for a template that takes no tools.

    The tools are described in the (first) system message, an assistant's calls follow its text as
    `<tool_call>` blocks, and each run of `tool` results is one `user` turn of `<tool_response>` blocks
    (many such templates know no `tool` role). No content is left None: such templates join it as text.
    """
    out: list[dict[str, Any]] = []
    results = False  # whether out[-1] is the user turn of the latest run of tool results
    for message in template_messages(messages):
        msg = {k: v for k, v in message.items() if k not in ("tool_calls", "tool_call_id")}
        text = "" if msg.get("content") is None else msg["content"]
        if msg.get("role") == "tool":
            block = f"<tool_response>\n{text}\n</tool_response>"
            if results:
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block})
            results = True
            continue
        results = False
        if calls := message.get("tool_calls"):
            blocks = "\n".join(f"<tool_call>\n{_call_json(c)}\n</tool_call>" for c in calls)
            text = f"{text}\n{blocks}" if text else blocks
        out.append({**msg, "content": text})
    if tools:
        described = _TOOLS_HEAD + "".join("\n" + json.dumps(t, ensure_ascii=False) for t in tools) + _TOOLS_TAIL
        at = next((i for i, m in enumerate(out) if m.get("role") == "system" and isinstance(m["content"], str)), None)
        if at is None:
            out.insert(0, {"role": "system", "content": described})
        else:
            first = out[at]["content"]
            out[at] = {**out[at], "content": f"{first}\n\n{described}" if first else described}
    return out


def _call_json(call: Mapping[str, Any]) -> str:
    function = call.get("function") or {}
    return json.dumps({"name": function.get("name"), "arguments": function.get("arguments", {})}, ensure_ascii=False)


def template_messages(
    messages: Sequence[Mapping[str, Any]], *, call_id: Callable[[str], str] | None = None
) -> list[dict[str, Any]]:
    """OpenAI chat messages as chat templates take them.

    An assistant's `tool_calls[].function.arguments` (JSON text in OpenAI's API) become the object they
    encode (left as text when they are not a JSON object); `call_id` rewrites call ids, in the calls and
    in the `tool_call_id` of the results alike, for templates that insist on a form (Mistral's 9
    characters). The deprecated forms map onto the current ones: an assistant's `function_call` is a
    one-call `tool_calls`, a `function` message the `tool` result of the last such call.
    """
    rename = call_id or (lambda i: i)
    out: list[dict[str, Any]] = []
    legacy_id = ""  # the id given to the last deprecated function_call
    for message in messages:
        msg = dict(message)
        if msg.get("role") == "assistant" and msg.get("function_call") and not msg.get("tool_calls"):
            legacy_id = f"call_fn{len(out)}"
            msg["tool_calls"] = [{"id": legacy_id, "type": "function", "function": msg.pop("function_call")}]
        msg.pop("function_call", None)
        if msg.get("role") == "function":
            msg = {"role": "tool", "content": msg.get("content"), "name": msg.get("name"), "tool_call_id": legacy_id}
        if msg.get("tool_calls"):
            msg["tool_calls"] = [_template_call(c, rename) for c in msg["tool_calls"]]
        if msg.get("role") == "tool" and isinstance(msg.get("tool_call_id"), str):
            msg["tool_call_id"] = rename(msg["tool_call_id"])
        out.append(msg)
    return out


def _template_call(call: Mapping[str, Any], rename: Callable[[str], str]) -> dict[str, Any]:
    out = dict(call)
    function = dict(out.get("function") or {})
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            parsed = json.loads(arguments)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            function["arguments"] = parsed
    out["function"] = function
    if isinstance(out.get("id"), str):
        out["id"] = rename(out["id"])
    return out
