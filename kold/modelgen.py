"""Random Llama-family checkpoints in Hugging Face layout, made on the spot.

kold never downloads weights: tests, benchmarks and the demo use models generated here, seeded so
every run (and every machine) gets the same bytes. The shapes are real ones (TinyLlama-1.1B for `1b`)
so restore benchmarks move realistic tensor sizes; the values are random.

Four architectures share the shapes: `llama` (TinyLlama-style, Zephyr chat format), `mistral`
(`[INST]` chat format, no sliding window), `qwen2` (q/k/v biases, tied embeddings as the small
Qwen2 models have, ChatML) and `qwen3` (per-head q/k RMSNorm, heads twice hidden/heads wide as in
Qwen3-0.6B's 1024 hidden / 16 heads / head_dim 128, tied embeddings, ChatML without a default
system message); with tools in play each renders its family's real tool template instead (Llama 3.1's,
Mistral v0.3's, Qwen2.5's: `TOOL_TEMPLATES`). `write_random_model` also writes a real tokenizer: a byte-level BPE
trained here with `tokenizers` on the English corpus shipped in `kold/data/corpus.txt`, padded to
the config's `vocab_size` with extra merges when the corpus runs out of pairs (see `train_tokenizer`).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any

import torch

# Hugging Face's default shard size is 5 GB; we cut at 1 GiB so the 1b model has several shards and the
# multi-shard path (index json) is exercised by every benchmark run.
SHARD_BYTES = 1 << 30


@dataclass(frozen=True)
class LlamaShape:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False


SIZES: dict[str, LlamaShape] = {
    # a few MB: unit tests and the demo
    "tiny": LlamaShape(512, 64, 172, 2, 4, 2, 512),
    # ~60 MB in bf16: integration tests that need many chunks but must stay quick
    "small": LlamaShape(8192, 512, 1376, 4, 8, 4, 1024),
    # TinyLlama-1.1B's shapes (~2.2 GB in bf16): benchmarks
    "1b": LlamaShape(32000, 2048, 5632, 22, 32, 4, 2048),
}


ARCHS = ("llama", "mistral", "qwen2", "qwen3")
# the Qwen tokenizers: Qwen2's pre-tokenizer split, no BOS, ChatML, <|im_end|> as eos
QWEN_ARCHS = ("qwen2", "qwen3")

# Special tokens, at ids 0.. in this order in every generated tokenizer: Llama's <unk>/<s>/</s> at
# 0/1/2 (the ids config.json names), a pad token, and the role markers of the chat formats.
SPECIAL_TOKENS = (
    "<unk>",
    "<s>",
    "</s>",
    "<pad>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|im_start|>",
    "<|im_end|>",
    "[INST]",
    "[/INST]",
)
BOS_ID, EOS_ID, PAD_ID, IM_END_ID = 1, 2, 3, 8

# TinyLlama-1.1B-Chat's template (Zephyr), with the BOS written by the template.
LLAMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}\n"
    "{% if message['role'] == 'user' %}\n"
    "{{ '<|user|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'system' %}\n"
    "{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n"
    "{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n"
    "{{ '<|assistant|>' }}\n"
    "{% endif %}\n"
    "{% endfor %}"
)

# Mistral-7B-Instruct-v0.2's template: system prompt folded into the first user turn, strict alternation.
MISTRAL_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content'] %}\n"
    "    {%- set loop_messages = messages[1:] %}\n"
    "{%- else %}\n"
    "    {%- set loop_messages = messages %}\n"
    "{%- endif %}\n"
    "\n"
    "{{- bos_token }}\n"
    "{%- for message in loop_messages %}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\n"
    "        {{- raise_exception('After the optional system message, conversation roles must alternate "
    "user/assistant/user/assistant/...') }}\n"
    "    {%- endif %}\n"
    "    {%- if message['role'] == 'user' %}\n"
    "        {%- if loop.first and system_message is defined %}\n"
    "            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}\n"
    "        {%- else %}\n"
    "            {{- ' [INST] ' + message['content'] + ' [/INST]' }}\n"
    "        {%- endif %}\n"
    "    {%- elif message['role'] == 'assistant' %}\n"
    "        {{- ' ' + message['content'] + eos_token}}\n"
    "    {%- else %}\n"
    "        {{- raise_exception('Only user and assistant roles are supported, with the exception of an "
    "initial optional system message!') }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
)

# Qwen2-Instruct's template (without tools): ChatML with a default system message.
QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# Qwen3's template without tools: ChatML, no default system message, past turns' reasoning dropped,
# and the empty think block that `enable_thinking=false` asks for.
QWEN3_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' or (message['role'] == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{%- elif message['role'] == 'assistant' %}"
    "{%- set content = message['content'].split('</think>')[-1].lstrip('\n') %}"
    "{{- '<|im_start|>assistant\n' + content + '<|im_end|>\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\n\n</think>\n\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)


# -- tool use: each family's own tool template ------------------------------------------------------
#
# With tools (or a conversation that holds tool calls or results) the tiny models render their
# family's real tool-calling template, so prompts carry tools as those models are trained to read
# them; without, the templates above, byte for byte. The tool templates are written as the families
# define them (Hugging Face's tokenizer_config.json of each): Llama 3.1-Instruct's JSON tool calling,
# Qwen2.5-Instruct's Hermes-style <tool_call> blocks (for both Qwens: Qwen3 writes its calls alike),
# and Mistral-7B-Instruct-v0.3's [AVAILABLE_TOOLS]/[TOOL_CALLS]/[TOOL_RESULTS].

LLAMA31_TOOL_TEMPLATE = (
    "{{- bos_token }}\n"
    "{%- if custom_tools is defined %}\n"
    "    {%- set tools = custom_tools %}\n"
    "{%- endif %}\n"
    "{%- if not tools_in_user_message is defined %}\n"
    "    {%- set tools_in_user_message = true %}\n"
    "{%- endif %}\n"
    "{%- if not date_string is defined %}\n"
    '    {%- set date_string = "26 Jul 2024" %}\n'
    "{%- endif %}\n"
    "{%- if not tools is defined %}\n"
    "    {%- set tools = none %}\n"
    "{%- endif %}\n"
    "\n"
    "{#- This block extracts the system message, so we can slot it into the right place. #}\n"
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content']|trim %}\n"
    "    {%- set messages = messages[1:] %}\n"
    "{%- else %}\n"
    '    {%- set system_message = "" %}\n'
    "{%- endif %}\n"
    "\n"
    "{#- System message + builtin tools #}\n"
    '{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}\n'
    "{%- if builtin_tools is defined or tools is not none %}\n"
    '    {{- "Environment: ipython\\n" }}\n'
    "{%- endif %}\n"
    "{%- if builtin_tools is defined %}\n"
    '    {{- "Tools: " + builtin_tools | reject(\'equalto\', \'code_interpreter\') | join(", ") + "\\n\\n"}}\n'
    "{%- endif %}\n"
    '{{- "Cutting Knowledge Date: December 2023\\n" }}\n'
    '{{- "Today Date: " + date_string + "\\n\\n" }}\n'
    "{%- if tools is not none and not tools_in_user_message %}\n"
    '    {{- "You have access to the following functions. To call a function, please respond with JSON for a '
    'function call." }}\n'
    '    {{- \'Respond in the format {"name": function name, "parameters": dictionary of argument name and its '
    "value}.' }}\n"
    '    {{- "Do not use variables.\\n\\n" }}\n'
    "    {%- for t in tools %}\n"
    "        {{- t | tojson(indent=4) }}\n"
    '        {{- "\\n\\n" }}\n'
    "    {%- endfor %}\n"
    "{%- endif %}\n"
    "{{- system_message }}\n"
    '{{- "<|eot_id|>" }}\n'
    "\n"
    "{#- Custom tools are passed in a user message with some extra guidance #}\n"
    "{%- if tools_in_user_message and not tools is none %}\n"
    "    {#- Extract the first user message so we can plug it in here #}\n"
    "    {%- if messages | length != 0 %}\n"
    "        {%- set first_user_message = messages[0]['content']|trim %}\n"
    "        {%- set messages = messages[1:] %}\n"
    "    {%- else %}\n"
    '        {{- raise_exception("Cannot put tools in the first user message when there\'s no first user message!") }}\n'
    "{%- endif %}\n"
    "    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}\n"
    '    {{- "Given the following functions, please respond with a JSON for a function call " }}\n'
    '    {{- "with its proper arguments that best answers the given prompt.\\n\\n" }}\n'
    '    {{- \'Respond in the format {"name": function name, "parameters": dictionary of argument name and its '
    "value}.' }}\n"
    '    {{- "Do not use variables.\\n\\n" }}\n'
    "    {%- for t in tools %}\n"
    "        {{- t | tojson(indent=4) }}\n"
    '        {{- "\\n\\n" }}\n'
    "    {%- endfor %}\n"
    '    {{- first_user_message + "<|eot_id|>"}}\n'
    "{%- endif %}\n"
    "\n"
    "{%- for message in messages %}\n"
    "    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}\n"
    "        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + "
    "'<|eot_id|>' }}\n"
    "    {%- elif 'tool_calls' in message %}\n"
    "        {%- if not message.tool_calls|length == 1 %}\n"
    '            {{- raise_exception("This model only supports single tool-calls at once!") }}\n'
    "        {%- endif %}\n"
    "        {%- set tool_call = message.tool_calls[0].function %}\n"
    "        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}\n"
    "            {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}\n"
    '            {{- "<|python_tag|>" + tool_call.name + ".call(" }}\n'
    "            {%- for arg_name, arg_val in tool_call.arguments | items %}\n"
    "                {{- arg_name + '=\"' + arg_val + '\"' }}\n"
    "                {%- if not loop.last %}\n"
    '                    {{- ", " }}\n'
    "                {%- endif %}\n"
    "                {%- endfor %}\n"
    '            {{- ")" }}\n'
    "        {%- else  %}\n"
    "            {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}\n"
    "            {{- '{\"name\": \"' + tool_call.name + '\", ' }}\n"
    "            {{- '\"parameters\": ' }}\n"
    "            {{- tool_call.arguments | tojson }}\n"
    '            {{- "}" }}\n'
    "        {%- endif %}\n"
    "        {%- if builtin_tools is defined %}\n"
    "            {#- This means we're in ipython mode #}\n"
    '            {{- "<|eom_id|>" }}\n'
    "        {%- else %}\n"
    '            {{- "<|eot_id|>" }}\n'
    "        {%- endif %}\n"
    '    {%- elif message.role == "tool" or message.role == "ipython" %}\n'
    '        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}\n'
    "        {%- if message.content is mapping or message.content is iterable %}\n"
    "            {{- message.content | tojson }}\n"
    "        {%- else %}\n"
    "            {{- message.content }}\n"
    "        {%- endif %}\n"
    '        {{- "<|eot_id|>" }}\n'
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
    "{%- endif %}\n"
)

QWEN25_TOOL_TEMPLATE = (
    "{%- if tools %}\n"
    "    {{- '<|im_start|>system\\n' }}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n"
    "    {%- else %}\n"
    "        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n"
    "    {%- endif %}\n"
    '    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are '
    'provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}\n'
    "    {%- for tool in tools %}\n"
    '        {{- "\\n" }}\n'
    "        {{- tool | tojson }}\n"
    "    {%- endfor %}\n"
    '    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within '
    '<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": '
    '<args-json-object>}\\n</tool_call><|im_end|>\\n" }}\n'
    "{%- else %}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "    {%- else %}\n"
    "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
    "assistant.<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    '    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == '
    '"assistant" and not message.tool_calls) %}\n'
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    '    {%- elif message.role == "assistant" %}\n'
    "        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n"
    "            {{- '\\n' + message.content }}\n"
    "        {%- endif %}\n"
    "        {%- for tool_call in message.tool_calls %}\n"
    "            {%- if tool_call.function is defined %}\n"
    "                {%- set tool_call = tool_call.function %}\n"
    "            {%- endif %}\n"
    '            {{- \'\\n<tool_call>\\n{"name": "\' }}\n'
    "            {{- tool_call.name }}\n"
    '            {{- \'", "arguments": \' }}\n'
    "            {{- tool_call.arguments | tojson }}\n"
    "            {{- '}\\n</tool_call>' }}\n"
    "        {%- endfor %}\n"
    "        {{- '<|im_end|>\\n' }}\n"
    '    {%- elif message.role == "tool" %}\n'
    '        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}\n'
    "            {{- '<|im_start|>user' }}\n"
    "        {%- endif %}\n"
    "        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- message.content }}\n"
    "        {{- '\\n</tool_response>' }}\n"
    '        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}\n'
    "            {{- '<|im_end|>\\n' }}\n"
    "        {%- endif %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)

MISTRAL_V3_TOOL_TEMPLATE = (
    '{%- if messages[0]["role"] == "system" %}\n'
    '    {%- set system_message = messages[0]["content"] %}\n'
    "    {%- set loop_messages = messages[1:] %}\n"
    "{%- else %}\n"
    "    {%- set loop_messages = messages %}\n"
    "{%- endif %}\n"
    "{%- if not tools is defined %}\n"
    "    {%- set tools = none %}\n"
    "{%- endif %}\n"
    '{%- set user_messages = loop_messages | selectattr("role", "equalto", "user") | list %}\n'
    "\n"
    "{#- This block checks for alternating user/assistant messages, skipping tool calling messages #}\n"
    "{%- set ns = namespace() %}\n"
    "{%- set ns.index = 0 %}\n"
    "{%- for message in loop_messages %}\n"
    '    {%- if not (message.role == "tool" or message.role == "tool_results" or (message.tool_calls is defined and '
    "message.tool_calls is not none)) %}\n"
    '        {%- if (message["role"] == "user") != (ns.index % 2 == 0) %}\n'
    '            {{- raise_exception("After the optional system message, conversation roles must alternate '
    'user/assistant/user/assistant/...") }}\n'
    "        {%- endif %}\n"
    "        {%- set ns.index = ns.index + 1 %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "\n"
    "{{- bos_token }}\n"
    "{%- for message in loop_messages %}\n"
    '    {%- if message["role"] == "user" %}\n'
    "        {%- if tools is not none and (message == user_messages[-1]) %}\n"
    '            {{- "[AVAILABLE_TOOLS] [" }}\n'
    "            {%- for tool in tools %}\n"
    "                {%- set tool = tool.function %}\n"
    '                {{- \'{"type": "function", "function": {\' }}\n'
    '                {%- for key, val in tool.items() if key != "return" %}\n'
    "                    {%- if val is string %}\n"
    "                        {{- '\"' + key + '\": \"' + val + '\"' }}\n"
    "                    {%- else %}\n"
    "                        {{- '\"' + key + '\": ' + val|tojson }}\n"
    "                    {%- endif %}\n"
    "                    {%- if not loop.last %}\n"
    '                        {{- ", " }}\n'
    "                    {%- endif %}\n"
    "                {%- endfor %}\n"
    '                {{- "}}" }}\n'
    "                {%- if not loop.last %}\n"
    '                    {{- ", " }}\n'
    "                {%- else %}\n"
    '                    {{- "]" }}\n'
    "                {%- endif %}\n"
    "            {%- endfor %}\n"
    '            {{- "[/AVAILABLE_TOOLS]" }}\n'
    "            {%- endif %}\n"
    "        {%- if loop.last and system_message is defined %}\n"
    '            {{- "[INST] " + system_message + "\\n\\n" + message["content"] + "[/INST]" }}\n'
    "        {%- else %}\n"
    '            {{- "[INST] " + message["content"] + "[/INST]" }}\n'
    "        {%- endif %}\n"
    "    {%- elif message.tool_calls is defined and message.tool_calls is not none %}\n"
    '        {{- "[TOOL_CALLS] [" }}\n'
    "        {%- for tool_call in message.tool_calls %}\n"
    "            {%- set out = tool_call.function|tojson %}\n"
    "            {{- out[:-1] }}\n"
    "            {%- if not tool_call.id is defined or tool_call.id|length != 9 %}\n"
    '                {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}\n'
    "            {%- endif %}\n"
    "            {{- ', \"id\": \"' + tool_call.id + '\"}' }}\n"
    "            {%- if not loop.last %}\n"
    '                {{- ", " }}\n'
    "            {%- else %}\n"
    '                {{- "]" + eos_token }}\n'
    "            {%- endif %}\n"
    "        {%- endfor %}\n"
    '    {%- elif message["role"] == "assistant" %}\n'
    '        {{- " " + message["content"]|trim + eos_token}}\n'
    '    {%- elif message["role"] == "tool_results" or message["role"] == "tool" %}\n'
    "        {%- if message.content is defined and message.content.content is defined %}\n"
    "            {%- set content = message.content.content %}\n"
    "        {%- else %}\n"
    "            {%- set content = message.content %}\n"
    "        {%- endif %}\n"
    '        {{- \'[TOOL_RESULTS] {"content": \' + content|string + ", " }}\n'
    "        {%- if not message.tool_call_id is defined or message.tool_call_id|length != 9 %}\n"
    '            {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}\n'
    "        {%- endif %}\n"
    "        {{- '\"call_id\": \"' + message.tool_call_id + '\"}[/TOOL_RESULTS]' }}\n"
    "    {%- else %}\n"
    '        {{- raise_exception("Only user and assistant roles are supported, with the exception of an initial '
    'optional system message!") }}\n'
    "    {%- endif %}\n"
    "{%- endfor %}\n"
)

# The test that picks the tool template: tools given, or a conversation that already holds calls or
# their results (a client that stopped sending tools mid-conversation still renders them).
_USES_TOOLS = (
    "{%- if tools is not none or messages | selectattr('role', 'equalto', 'tool') | list "
    "or messages | selectattr('tool_calls', 'defined') | list %}\n"
)


def with_tool_template(tool_template: str, plain_template: str) -> str:
    """One template: `tool_template` when the conversation uses tools, `plain_template` otherwise."""
    return _USES_TOOLS + tool_template + "{%- else %}" + plain_template + "{%- endif %}"


TOOL_TEMPLATES = {
    "llama": with_tool_template(LLAMA31_TOOL_TEMPLATE, LLAMA_CHAT_TEMPLATE),
    "mistral": with_tool_template(MISTRAL_V3_TOOL_TEMPLATE, MISTRAL_CHAT_TEMPLATE),
    "qwen2": with_tool_template(QWEN25_TOOL_TEMPLATE, QWEN2_CHAT_TEMPLATE),
    "qwen3": with_tool_template(QWEN25_TOOL_TEMPLATE, QWEN3_CHAT_TEMPLATE),
}


def _check_arch(arch: str) -> None:
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r} (choose from {', '.join(ARCHS)})")


def _check_size(size: str) -> None:
    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r} (choose from {', '.join(SIZES)})")


def model_shape(arch: str, size: str) -> LlamaShape:
    """The shape of `size` for `arch` (the Qwens tie their embeddings, as Qwen2-0.5B and Qwen3-0.6B do)."""
    _check_arch(arch)
    _check_size(size)
    shape = SIZES[size]
    return replace(shape, tie_word_embeddings=True) if arch in QWEN_ARCHS else shape


def head_dim(arch: str, shape: LlamaShape) -> int:
    """Width of one attention head: hidden/heads, except Qwen3's twice that (Qwen3-0.6B: 1024/16, 128)."""
    _check_arch(arch)
    width = shape.hidden_size // shape.num_attention_heads
    return 2 * width if arch == "qwen3" else width


def tensor_specs(arch: str, shape: LlamaShape) -> Iterator[tuple[str, tuple[int, ...]]]:
    """Names and shapes of `arch`'s *ForCausalLM state dict, in Hugging Face's order.

    Llama and Mistral share names; Qwen2 adds `q_proj.bias`, `k_proj.bias` and `v_proj.bias`;
    Qwen3 adds `q_norm.weight` and `k_norm.weight` (head_dim each). `lm_head.weight` is absent when
    the embeddings are tied.
    """
    h, i = shape.hidden_size, shape.intermediate_size
    width = head_dim(arch, shape)
    q, kv = shape.num_attention_heads * width, shape.num_key_value_heads * width
    bias = arch == "qwen2"
    yield "model.embed_tokens.weight", (shape.vocab_size, h)
    for layer in range(shape.num_hidden_layers):
        p = f"model.layers.{layer}"
        yield f"{p}.self_attn.q_proj.weight", (q, h)
        if bias:
            yield f"{p}.self_attn.q_proj.bias", (q,)
        yield f"{p}.self_attn.k_proj.weight", (kv, h)
        if bias:
            yield f"{p}.self_attn.k_proj.bias", (kv,)
        yield f"{p}.self_attn.v_proj.weight", (kv, h)
        if bias:
            yield f"{p}.self_attn.v_proj.bias", (kv,)
        yield f"{p}.self_attn.o_proj.weight", (h, q)
        if arch == "qwen3":
            yield f"{p}.self_attn.q_norm.weight", (width,)
            yield f"{p}.self_attn.k_norm.weight", (width,)
        yield f"{p}.mlp.gate_proj.weight", (i, h)
        yield f"{p}.mlp.up_proj.weight", (i, h)
        yield f"{p}.mlp.down_proj.weight", (h, i)
        yield f"{p}.input_layernorm.weight", (h,)
        yield f"{p}.post_attention_layernorm.weight", (h,)
    yield "model.norm.weight", (h,)
    if not shape.tie_word_embeddings:
        yield "lm_head.weight", (shape.vocab_size, h)


def model_nbytes(arch: str, size: str, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of the weights `write_random_model(out, arch, size)` writes."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    total = 0
    for _, tshape in tensor_specs(arch, model_shape(arch, size)):
        n = 1
        for d in tshape:
            n *= d
        total += n * itemsize
    return total


def llama_config(shape: LlamaShape, dtype: torch.dtype) -> dict[str, object]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": str(dtype).removeprefix("torch."),
        **asdict(shape),
    }


def model_config(arch: str, shape: LlamaShape, dtype: torch.dtype) -> dict[str, object]:
    """config.json for `arch`, in the form the real checkpoints of that family have."""
    _check_arch(arch)
    if arch == "llama":
        return llama_config(shape, dtype)
    if arch == "mistral":
        return {
            "architectures": ["MistralForCausalLM"],
            "model_type": "mistral",
            "hidden_act": "silu",
            "rms_norm_eps": 1e-5,
            "rope_theta": 1000000.0,
            "sliding_window": None,
            "bos_token_id": BOS_ID,
            "eos_token_id": EOS_ID,
            "torch_dtype": str(dtype).removeprefix("torch."),
            **asdict(shape),
        }
    if arch == "qwen3":  # as Qwen3-0.6B's config.json has it
        return {
            "architectures": ["Qwen3ForCausalLM"],
            "model_type": "qwen3",
            "attention_bias": False,
            "head_dim": head_dim(arch, shape),
            "hidden_act": "silu",
            "rms_norm_eps": 1e-6,
            "rope_scaling": None,
            "rope_theta": 1000000.0,
            "use_sliding_window": False,
            "sliding_window": None,
            "max_window_layers": shape.num_hidden_layers,
            "bos_token_id": BOS_ID,
            "eos_token_id": IM_END_ID,
            "torch_dtype": str(dtype).removeprefix("torch."),
            **asdict(shape),
        }
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "use_sliding_window": False,
        "sliding_window": shape.max_position_embeddings,
        "max_window_layers": shape.num_hidden_layers,
        "bos_token_id": BOS_ID,
        "eos_token_id": IM_END_ID,
        "torch_dtype": str(dtype).removeprefix("torch."),
        **asdict(shape),
    }


def generation_config(arch: str) -> dict[str, object]:
    """generation_config.json: the Qwens stop on <|im_end|> or </s> (a list), the others on </s> (an int)."""
    _check_arch(arch)
    if arch in QWEN_ARCHS:
        return {
            "bos_token_id": BOS_ID,
            "eos_token_id": [IM_END_ID, EOS_ID],
            "pad_token_id": PAD_ID,
            "max_new_tokens": 64,
        }
    return {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "max_new_tokens": 64}


# -- tokenizer ---------------------------------------------------------------------------------------


def corpus_text() -> str:
    """The English prose the tokenizers are trained on (shipped as package data)."""
    return resources.files("kold").joinpath("data/corpus.txt").read_text(encoding="utf-8")


# Qwen2's pre-tokenizer split (digits one by one, letters in runs); transformers' Qwen2Tokenizer
# rebuilds exactly this pipeline (NFC, this split, byte-level) whatever tokenizer.json says, so the
# qwen2 tokenizer is trained and saved with it to encode the same either way.
QWEN2_SPLIT_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""


@functools.lru_cache(maxsize=8)
def _trained_bpe(vocab_size: int, qwen2_split: bool) -> str:
    """The trained (and padded) byte-level BPE as tokenizer.json text, before any post-processor."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    if qwen2_split:
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:  # GPT-2's split, as Llama 3 style byte-level tokenizers have
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=0,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # paragraphs with their blank line, so newline tokens are learned too
    paragraphs = [p + "\n\n" for p in corpus_text().split("\n\n") if p.strip()]
    tok.train_from_iterator(paragraphs, trainer)
    doc = json.loads(tok.to_str())
    _pad_merges(doc["model"], vocab_size)
    return json.dumps(doc)


def _pad_merges(model: dict[str, Any], vocab_size: int) -> None:
    """Grow a trained BPE to `vocab_size` with extra merges when the corpus has no pairs left.

    Each extra token joins a learned word-start piece ("Ġwater") and a learned lowercase piece
    ("ing"): valid BPE (both halves are tokens, the merge ranks after every trained one), plain
    text when decoded, and chosen in a fixed order, so the result stays deterministic.
    """
    vocab: dict[str, int] = model["vocab"]
    merges: list[Any] = model["merges"]
    if len(vocab) >= vocab_size:
        return
    by_id = sorted(vocab, key=vocab.__getitem__)
    starts = [t for t in by_id if t.startswith("Ġ") and len(t) >= 3 and t[1:].isascii() and t[1:].isalpha()]
    tails = [t for t in by_id if len(t) >= 2 and t.isascii() and t.isalpha() and t.islower()]
    if not starts or not tails:
        raise ValueError("the tokenizer corpus is too small to pad the vocabulary")
    next_id = max(vocab.values()) + 1
    for shift in range(len(tails)):
        for index, left in enumerate(starts):
            right = tails[(index + shift) % len(tails)]
            token = left + right
            if token in vocab:
                continue
            vocab[token] = next_id
            merges.append([left, right])
            next_id += 1
            if len(vocab) >= vocab_size:
                return
    raise ValueError(f"cannot pad the tokenizer to {vocab_size} tokens")


def tokenizer_json(arch: str, vocab_size: int) -> str:
    """tokenizer.json for `arch`: the shared trained BPE plus `arch`'s post-processor (BOS or not)."""
    from tokenizers import Tokenizer, processors

    _check_arch(arch)
    tok = Tokenizer.from_str(_trained_bpe(vocab_size, arch in QWEN_ARCHS))
    if arch in QWEN_ARCHS:  # the Qwens add no BOS
        tok.post_processor = processors.ByteLevel(trim_offsets=False, use_regex=False)
    else:  # Llama and Mistral prepend <s>, as Llama 3's byte-level tokenizer.json does
        bos = SPECIAL_TOKENS[BOS_ID]
        template = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1", special_tokens=[(bos, BOS_ID)]
        )
        tok.post_processor = processors.Sequence([processors.ByteLevel(trim_offsets=False), template])
    if tok.get_vocab_size(with_added_tokens=True) != vocab_size:
        raise RuntimeError(f"tokenizer has {tok.get_vocab_size(with_added_tokens=True)} tokens, not {vocab_size}")
    return str(tok.to_str(pretty=True))


def tokenizer_config(arch: str, shape: LlamaShape) -> dict[str, object]:
    """tokenizer_config.json: named special tokens and the chat template of `arch`'s family (tool-aware)."""
    _check_arch(arch)
    special: dict[str, object]
    if arch in QWEN_ARCHS:
        special = {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<pad>", "unk_token": None}
    else:
        special = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    template = TOOL_TEMPLATES[arch]
    return {
        # loads tokenizer.json as it is (a model-specific class could rebuild the pipeline)
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "model_max_length": shape.max_position_embeddings,
        "clean_up_tokenization_spaces": False,
        "chat_template": template,
    }


def write_tokenizer(out: Path, arch: str, shape: LlamaShape) -> None:
    """Write tokenizer.json and tokenizer_config.json for a model of `arch` and `shape`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(tokenizer_json(arch, shape.vocab_size), encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(arch, shape), indent=2), encoding="utf-8")


# -- weights -----------------------------------------------------------------------------------------


def random_tensor(name: str, shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=dtype)
    return torch.empty(shape, dtype=dtype).normal_(0.0, 0.02, generator=gen)


def write_random_model(
    out: Path,
    arch: str = "llama",
    size: str = "tiny",
    *,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    shard_bytes: int = SHARD_BYTES,
    progress: Callable[[int], None] | None = None,
    tokenizer: bool = True,
) -> Path:
    """Write a complete random model of `arch` and `size` to `out`, byte-identical for the same arguments.

    Files: config.json, generation_config.json, safetensors shards (with an index when >1) and, with
    `tokenizer`, tokenizer.json and tokenizer_config.json (with the chat template).
    Memory stays around one shard: each shard is generated, written and dropped before the next.
    `progress` is called with the bytes of each tensor as it is generated.
    """
    from safetensors.torch import save_file

    shape = model_shape(arch, size)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer:
        write_tokenizer(out, arch, shape)
    gen = torch.Generator().manual_seed(seed)

    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_sizes = [0]
    weight_map: dict[str, int] = {}
    pending_files: list[Path] = []

    def flush(index: int) -> None:
        path = out / f"shard-{index:05d}.safetensors"
        save_file(shards[index], str(path), metadata={"format": "pt"})
        pending_files.append(path)
        shards[index] = {}

    for name, tshape in tensor_specs(arch, shape):
        tensor = random_tensor(name, tshape, dtype, gen)
        nbytes = tensor.numel() * tensor.element_size()
        if shard_sizes[-1] and shard_sizes[-1] + nbytes > shard_bytes:
            flush(len(shards) - 1)
            shards.append({})
            shard_sizes.append(0)
        shards[-1][name] = tensor
        shard_sizes[-1] += nbytes
        weight_map[name] = len(shards) - 1
        if progress:
            progress(nbytes)
    flush(len(shards) - 1)

    total = len(pending_files)
    if total == 1:
        pending_files[0].rename(out / "model.safetensors")
    else:
        names = []
        for index, path in enumerate(pending_files):
            final = out / f"model-{index + 1:05d}-of-{total:05d}.safetensors"
            path.rename(final)
            names.append(final.name)
        index_doc = {
            "metadata": {"total_size": sum(shard_sizes)},
            "weight_map": {name: names[shard] for name, shard in weight_map.items()},
        }
        (out / "model.safetensors.index.json").write_text(json.dumps(index_doc, indent=2))

    (out / "config.json").write_text(json.dumps(model_config(arch, shape, dtype), indent=2))
    (out / "generation_config.json").write_text(json.dumps(generation_config(arch), indent=2))
    return out
