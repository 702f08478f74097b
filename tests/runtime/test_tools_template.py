"""Tools and tool turns through the model's own chat template: the tiny models' family tool templates
(Llama 3.1, Qwen2.5, Mistral v0.3) rendered by kold byte for byte as transformers renders them."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from kold.modelgen import (
    ARCHS,
    LLAMA_CHAT_TEMPLATE,
    MISTRAL_CHAT_TEMPLATE,
    QWEN2_CHAT_TEMPLATE,
    QWEN3_CHAT_TEMPLATE,
    model_shape,
    write_tokenizer,
)
from kold.runtime.chat_template import ChatTemplateError, render_chat_template, template_messages
from kold.runtime.tokenizer import Tokenizer
from kold.runtime.tools import mistral_call_id, tool_family

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PLAIN_TEMPLATES = {
    "llama": LLAMA_CHAT_TEMPLATE,
    "mistral": MISTRAL_CHAT_TEMPLATE,
    "qwen2": QWEN2_CHAT_TEMPLATE,
    "qwen3": QWEN3_CHAT_TEMPLATE,
}
FAMILY = {"llama": "llama3", "mistral": "mistral", "qwen2": "hermes", "qwen3": "hermes"}

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city, now",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
                "required": ["city"],
            },
        },
    },
    {"type": "function", "function": {"name": "get_time", "description": "Local time (ünïcode)"}},
]


def call(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


ASK = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"}]
ONE_CALL = [
    *ASK,
    {"role": "assistant", "content": None, "tool_calls": [call("call_Xa1", "get_weather", '{"city": "Paris"}')]},
    {"role": "tool", "tool_call_id": "call_Xa1", "content": '{"temp_c": 21}'},
]
TWO_CALLS = [
    {"role": "user", "content": "Weather and time in Oslo?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            call("call_1", "get_weather", '{"city": "Oslo", "unit": "c"}'),
            call("call_2", "get_time", "{}"),
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "rain, 7"},
    {"role": "tool", "tool_call_id": "call_2", "content": "14:02"},
    {"role": "assistant", "content": "Rain, 7 °C, at 14:02."},
    {"role": "user", "content": "Thanks!"},
]

# (conversation, tools): what each tiny model renders as transformers does
CONVERSATIONS: list[tuple[list[dict[str, Any]], list[dict[str, Any]] | None]] = [
    (ASK, TOOLS),
    ([{"role": "user", "content": "hi"}], TOOLS[:1]),
    (ONE_CALL, TOOLS),
    (ONE_CALL, None),  # tool turns, the tools no longer sent: still the tool template
    (TWO_CALLS, TOOLS),
    (ASK, None),
]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Tokenizer, Any]]:
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("tool-templates")
    out = {}
    for arch in ARCHS:
        write_tokenizer(root / arch, arch, model_shape(arch, "tiny"))
        out[arch] = (Tokenizer.from_dir(root / arch), AutoTokenizer.from_pretrained(root / arch))
    return out


def prepared(arch: str, conversation: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return template_messages(conversation, call_id=mistral_call_id if arch == "mistral" else None)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("case", range(len(CONVERSATIONS)))
def test_tool_prompts_are_byte_identical_to_transformers(
    tokenizers: dict[str, tuple[Tokenizer, Any]], arch: str, case: int
) -> None:
    ours, theirs = tokenizers[arch]
    conversation, tools = CONVERSATIONS[case]
    messages = prepared(arch, conversation)
    try:
        expected = theirs.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # the template's own refusal (Llama 3.1: one call per turn)
        with pytest.raises(ChatTemplateError, match=str(exc).split("!")[0][:40]):
            ours.apply_chat_template(messages, tools=tools)
        assert arch == "llama" and conversation is TWO_CALLS
        return
    assert ours.apply_chat_template(messages, tools=tools) == expected
    ids = theirs.apply_chat_template(messages, tools=tools, tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert ours.encode_chat(messages, tools=tools) == list(ids)


@pytest.mark.parametrize("arch", ARCHS)
def test_what_each_family_shows_the_model(tokenizers: dict[str, tuple[Tokenizer, Any]], arch: str) -> None:
    ours, _ = tokenizers[arch]
    prompt = ours.apply_chat_template(prepared(arch, ONE_CALL), tools=TOOLS)
    declared = '"name": "get_weather", "description": "The weather in a city, now"'
    if arch == "llama":
        assert "Environment: ipython\n" in prompt and '"name": "get_weather",\n' in prompt
        assert '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>' in prompt
        assert '<|start_header_id|>ipython<|end_header_id|>\n\n"{\\"temp_c\\": 21}"<|eot_id|>' in prompt
    elif arch == "mistral":
        assert f'[AVAILABLE_TOOLS] [{{"type": "function", "function": {{{declared}' in prompt
        short = mistral_call_id("call_Xa1")
        assert (
            f'[TOOL_CALLS] [{{"name": "get_weather", "arguments": {{"city": "Paris"}}, "id": "{short}"}}]</s>' in prompt
        )
        assert f'[TOOL_RESULTS] {{"content": {{"temp_c": 21}}, "call_id": "{short}"}}[/TOOL_RESULTS]' in prompt
    else:
        assert f'<tools>\n{{"type": "function", "function": {{{declared}' in prompt
        assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>' in prompt
        assert '<|im_start|>user\n<tool_response>\n{"temp_c": 21}\n</tool_response><|im_end|>' in prompt
    assert tool_family(ours.chat_template) == FAMILY[arch]


@pytest.mark.parametrize("arch", ARCHS)
def test_without_tools_the_tiny_models_render_as_before(
    tokenizers: dict[str, tuple[Tokenizer, Any]], arch: str
) -> None:
    ours, theirs = tokenizers[arch]
    conversations = [
        [{"role": "user", "content": "Hello"}],
        [
            {"role": "system", "content": "S"},
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"},
        ],
    ]
    for conversation in conversations:
        for generation_prompt in (True, False):
            before = render_chat_template(
                PLAIN_TEMPLATES[arch],
                conversation,
                add_generation_prompt=generation_prompt,
                special_tokens=ours.special_tokens,
            )
            assert ours.apply_chat_template(conversation, generation_prompt) == before
            assert (
                theirs.apply_chat_template(conversation, tokenize=False, add_generation_prompt=generation_prompt)
                == before
            )


def test_openai_turns_become_what_templates_read() -> None:
    messages = template_messages(
        [
            {"role": "user", "content": "q"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [call("call_abc", "f", '{"a": [1, {"b": null}]}'), call("call_def", "g", "not json")],
            },
            {"role": "tool", "tool_call_id": "call_abc", "content": "r"},
        ],
        call_id=str.upper,
    )
    assert messages[1]["tool_calls"] == [
        {"id": "CALL_ABC", "type": "function", "function": {"name": "f", "arguments": {"a": [1, {"b": None}]}}},
        {"id": "CALL_DEF", "type": "function", "function": {"name": "g", "arguments": "not json"}},
    ]
    assert messages[2] == {"role": "tool", "tool_call_id": "CALL_ABC", "content": "r"}
    legacy = template_messages(
        [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": None, "function_call": {"name": "f", "arguments": '{"x": 1}'}},
            {"role": "function", "name": "f", "content": "42"},
        ]
    )
    assert legacy[1]["tool_calls"] == [
        {"id": "call_fn1", "type": "function", "function": {"name": "f", "arguments": {"x": 1}}}
    ]
    assert "function_call" not in legacy[1]
    assert legacy[2] == {"role": "tool", "content": "42", "name": "f", "tool_call_id": "call_fn1"}


def test_the_tiny_models_tokenizer_config_carries_the_tool_template(tmp_path: Path) -> None:
    write_tokenizer(tmp_path, "qwen2", model_shape("qwen2", "tiny"))
    template = json.loads((tmp_path / "tokenizer_config.json").read_text())["chat_template"]
    assert isinstance(template, str) and "<tool_call>" in template and "# Tools" in template


def test_a_template_without_tools_gets_them_written_into_the_conversation() -> None:
    """ChatML without tools (SmolLM2's): the tools in the system message, calls and results as text."""
    from kold.modelgen import QWEN25_TOOL_TEMPLATE
    from kold.runtime.chat_template import DEFAULT_CHAT_TEMPLATE, takes_tools, toolless_messages

    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
    turns = [
        {"role": "user", "content": "Weather?"},
        {"role": "system", "content": "Be brief."},
        {"role": "assistant", "content": "Looking.", "tool_calls": [call, {**call, "id": "c2"}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "c2", "content": "cold"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
    ]
    out = toolless_messages(turns, TOOLS)
    assert [m["role"] for m in out] == ["user", "system", "assistant", "user", "assistant"]
    system = out[1]["content"]
    assert system.startswith("Be brief.\n\n# Tools\n") and "<tool_call>" in system
    tools_block = system.split("<tools>\n")[1].split("\n</tools>")[0]
    assert [json.loads(line) for line in tools_block.splitlines()] == TOOLS
    block = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    assert out[2] == {"role": "assistant", "content": f"Looking.\n{block}\n{block}"}
    assert out[3] == {
        "role": "user",
        "content": "<tool_response>\nsunny\n</tool_response>\n<tool_response>\ncold\n</tool_response>",
    }
    assert out[4] == {"role": "assistant", "content": block}  # no content: just the call
    # no system message: one is added; no tools: none is
    assert toolless_messages(turns[:1], TOOLS)[0]["role"] == "system"
    assert toolless_messages(turns[3:4], None) == [out[3] | {"content": "<tool_response>\nsunny\n</tool_response>"}]

    # the template that rejected the call turn renders it; templates that take tools are left alone
    assert not takes_tools(DEFAULT_CHAT_TEMPLATE) and not takes_tools(QWEN2_CHAT_TEMPLATE)
    assert takes_tools(QWEN25_TOOL_TEMPLATE)
    prompt = render_chat_template(DEFAULT_CHAT_TEMPLATE, turns, tools=TOOLS)
    assert f"<|im_start|>assistant\n{block}<|im_end|>\n<|im_start|>assistant\n" in prompt
    assert "<|im_start|>tool" not in prompt and "# Tools" in prompt
    plain = [{"role": "user", "content": "Hi"}]
    assert (
        render_chat_template(DEFAULT_CHAT_TEMPLATE, plain) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tool_family(DEFAULT_CHAT_TEMPLATE, "llama") == "hermes"  # so `auto` reads the <tool_call> blocks back
