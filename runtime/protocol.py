"""The OpenAI HTTP protocol: request and response models, server-sent events, and errors.

Requests are validated strictly (a string where a number belongs is an error, not a coercion) and
unknown fields are ignored, as OpenAI-compatible servers do for forward compatibility. Every failure
a client can cause is an exception class below; `ERROR_TABLE` is the one place that maps them (and
the parsing errors of pydantic and json) to an HTTP status and OpenAI's error body
`{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_serializer

from kold.runtime.structured import Constraint, ConstraintError

if TYPE_CHECKING:
    from kold.runtime.tools import ToolRequest

# -- errors -----------------------------------------------------------------------------------------


class APIError(Exception):
    """An error reported to the client in OpenAI's shape. `code` and `param` as OpenAI uses them."""

    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code


class InvalidRequestError(APIError):
    """A request that is well-formed JSON but asks for something invalid or unsupported."""


class ContextLengthError(InvalidRequestError):
    """Prompt (plus max_tokens) longer than the model's context."""

    code = "context_length_exceeded"


class RequestTooLargeError(InvalidRequestError):
    """A request body over the server's limit (refused from its Content-Length before it is read, or
    as soon as a chunked body passes the limit)."""

    code = "request_too_large"


class RequestTimeoutError(InvalidRequestError):
    """A request body that did not arrive within the server's body timeout (a slow or stalled client)."""

    code = "request_timeout"


class InstanceTokenError(APIError):
    """A request to an instance that did not come through its platform's gateway."""

    code = "instance_token_required"


class ModelNotFoundError(APIError):
    code = "model_not_found"


class RouteNotFoundError(APIError):
    code = "not_found"


class MethodNotAllowedError(APIError):
    code = "method_not_allowed"


class UnavailableError(APIError):
    """The instance cannot take the request now; the client should retry (Retry-After says when)."""

    retry_after: int = 1


class QueueFullError(UnavailableError):
    code = "queue_full"


class QueueTimeoutError(UnavailableError):
    code = "queue_timeout"


class DrainingError(UnavailableError):
    code = "shutting_down"


class NotReadyError(UnavailableError):
    """The weights failed to load, or the instance is stopping before they did."""

    code = "not_ready"
    retry_after = 5


class ClientDisconnectedError(APIError):
    """The client went away before its response was ready (nobody reads the answer: for the logs)."""

    code = "client_closed_request"


class InternalError(APIError):
    code = "internal_error"


class ResponseTimeoutError(APIError):
    """The instance did not begin its answer within the function's request timeout (the gateway's
    504, like Knative's `timeoutSeconds`)."""

    code = "response_timeout"


# The one table: exception class -> (HTTP status, OpenAI error type). Looked up along the MRO, so a
# subclass inherits its parent's row unless it has its own.
ERROR_TABLE: dict[type[BaseException], tuple[int, str]] = {
    json.JSONDecodeError: (400, "invalid_request_error"),
    UnicodeDecodeError: (400, "invalid_request_error"),
    ValidationError: (400, "invalid_request_error"),
    InvalidRequestError: (400, "invalid_request_error"),
    ContextLengthError: (400, "invalid_request_error"),
    RequestTooLargeError: (413, "invalid_request_error"),
    RequestTimeoutError: (408, "invalid_request_error"),
    InstanceTokenError: (401, "authentication_error"),
    ModelNotFoundError: (404, "invalid_request_error"),
    RouteNotFoundError: (404, "invalid_request_error"),
    MethodNotAllowedError: (405, "invalid_request_error"),
    UnavailableError: (503, "service_unavailable_error"),
    ClientDisconnectedError: (499, "client_closed_request"),  # nginx's convention
    InternalError: (500, "server_error"),
    ResponseTimeoutError: (504, "timeout_error"),
    Exception: (500, "server_error"),
}


def status_for(exc: BaseException) -> tuple[int, str]:
    for cls in type(exc).__mro__:
        if cls in ERROR_TABLE:
            return ERROR_TABLE[cls]
    return ERROR_TABLE[Exception]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


def error_body(exc: BaseException) -> tuple[int, ErrorResponse]:
    """The status and body reporting `exc` (a 500 tells nothing about internals)."""
    status, kind = status_for(exc)
    if isinstance(exc, APIError):
        body = ErrorBody(message=exc.message, type=kind, param=exc.param, code=exc.code)
    elif isinstance(exc, ValidationError):
        body = _validation_body(exc, kind)
    elif isinstance(exc, json.JSONDecodeError | UnicodeDecodeError):
        body = ErrorBody(message=f"the request body is not valid JSON: {exc}", type=kind, code="invalid_json")
    else:
        body = ErrorBody(message="internal server error", type=kind, code="internal_error")
    return status, ErrorResponse(error=body)


def _validation_body(exc: ValidationError, kind: str) -> ErrorBody:
    errors = exc.errors(include_url=False, include_input=False)
    first = errors[0] if errors else {"loc": (), "msg": str(exc)}
    # union members add their type names to the location ('prompt', 'str'): keep the field path only
    loc = [str(p) for p in first["loc"] if not (isinstance(p, str) and ("[" in p or p in _TYPE_TAGS))]
    param = ".".join(loc) or None
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return ErrorBody(message=f"{param or 'body'}: {first['msg']}{more}", type=kind, param=param, code="invalid_value")


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "function-after", "function-before"}


# -- requests ---------------------------------------------------------------------------------------


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Request):
    include_usage: bool = False


Stop = str | list[str] | None


class _Sampling(_Request):
    """Fields shared by both endpoints."""

    model: str
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Field(ge=-1)] | None = None  # an extension (vLLM's): -1 or 0 = off
    n: Annotated[int, Field(ge=1, le=16)] = 1
    seed: int | None = None
    stop: Stop = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    ignore_eos: bool = False  # an extension (vLLM's): generate max_tokens whatever the model says
    # structured outputs: OpenAI's response_format, and vLLM's guided_* extensions (at most one of them)
    response_format: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None  # a JSON schema, or its text
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None  # Lark (llguidance's syntax) or GBNF (llama.cpp's)

    def constraint(self) -> Constraint | None:
        """What the output must follow, or None; a malformed one raises InvalidRequestError naming its
        param. Whether the library can compile it is the service's question (a 400 too)."""
        given = self._constraint_params()
        if len(given) > 1:
            raise InvalidRequestError(
                f"only one of {', '.join(given)} may be given (each asks for a different output format)",
                param=given[1],
            )
        if not given:
            return None
        param = given[0]
        try:
            if param == "response_format":
                return _response_format(self.response_format or {})
            if param == "guided_json":  # strict, as vLLM's: a keyword the library does not implement is a 400
                return Constraint.json_schema(_json_schema_value(self.guided_json), strict=True)
            if param == "guided_regex":
                return Constraint.regex(self.guided_regex or "")
            if param == "guided_choice":
                return Constraint.choice(self.guided_choice or [])
            return Constraint.grammar(self.guided_grammar or "")
        except ConstraintError as exc:
            raise InvalidRequestError(f"{param}: {exc}", param=param, code="invalid_value") from None

    def constraint_param(self) -> str:
        """The param a constraint came from (what a compile error names)."""
        return next(iter(self._constraint_params()), "response_format")

    def _constraint_params(self) -> list[str]:
        given = [name for name in CONSTRAINT_PARAMS if getattr(self, name) is not None]
        if "response_format" in given and _response_format_type(self.response_format) == "text":
            given.remove("response_format")  # plain text: OpenAI's default, no constraint
        return given

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        if len(stops) > 4:
            raise InvalidRequestError("at most 4 stop sequences are allowed", param="stop")
        if any(not s for s in stops):
            raise InvalidRequestError("stop sequences must not be empty", param="stop")
        return stops

    def check_supported(self) -> None:
        if self.logit_bias:
            raise InvalidRequestError("logit_bias is not supported by this server", param="logit_bias")
        if self.stream_options is not None and not self.stream:
            raise InvalidRequestError("stream_options is only allowed when stream is true", param="stream_options")
        self.constraint()  # a malformed one is refused before the request waits for the model


Prompt = str | list[str] | list[int] | list[list[int]]


MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limit for the completions endpoint's logprobs
MAX_TOP_LOGPROBS = 20  # and the chat endpoint's top_logprobs


class CompletionRequest(_Sampling):
    prompt: Prompt
    max_tokens: Annotated[int, Field(ge=1)] | None = 16  # OpenAI's default for completions
    echo: bool = False
    # the k most likely tokens at each position, besides the chosen one's (0: the chosen one's only)
    logprobs: Annotated[int, Field(ge=0, le=MAX_COMPLETION_LOGPROBS)] | None = None
    suffix: str | None = None
    best_of: int | None = None

    def prompts(self) -> list[str | list[int]]:
        """The prompt as a list of strings or token id lists (OpenAI accepts a batch)."""
        p = self.prompt
        if isinstance(p, str):
            out: list[str | list[int]] = [p]
        elif not p:
            raise InvalidRequestError("prompt must not be empty", param="prompt")
        elif isinstance(p[0], int):
            out = [[int(t) for t in p if isinstance(t, int)]]
        else:
            out = [x for x in p if isinstance(x, str | list)]
        for item in out:
            if not item:
                raise InvalidRequestError("prompt must not be empty", param="prompt")
        return out

    def check_supported(self) -> None:
        super().check_supported()
        if self.logprobs is not None and self.echo:
            raise InvalidRequestError(
                "logprobs together with echo (the prompt's log-probabilities) is not supported by this server",
                param="echo",
            )
        if self.suffix:
            raise InvalidRequestError("suffix is not supported by this server", param="suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise InvalidRequestError("best_of other than n is not supported by this server", param="best_of")


class TextPart(_Request):
    type: Literal["text"]
    text: str


class FunctionCallIn(_Request):
    name: str
    arguments: str  # JSON text, as OpenAI sends it back


class ToolCallIn(_Request):
    """A call an assistant turn made, as a client sends the conversation back."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCallIn


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None  # an assistant's calls
    tool_call_id: str | None = None  # the call a tool message answers
    function_call: FunctionCallIn | None = None  # the deprecated form of an assistant's one call

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def template_message(self) -> dict[str, Any]:
        """The message as OpenAI-shaped plain data (developer messages act as system ones); an
        assistant turn that only called tools has no content."""
        calls = self.tool_calls or self.function_call
        out: dict[str, Any] = {
            "role": "system" if self.role == "developer" else self.role,
            "content": None if self.content is None and calls else self.text(),
        }
        if self.name is not None:
            out["name"] = self.name
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.function_call is not None:
            out["function_call"] = self.function_call.model_dump()
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None  # needs logprobs: true
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    functions: list[dict[str, Any]] | None = None  # the deprecated form of tools
    function_call: str | dict[str, Any] | None = None  # ... and of tool_choice

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def chat_messages(self) -> list[dict[str, Any]]:
        """The messages as OpenAI-shaped plain data (`chat_template.template_messages` makes them what a
        template reads)."""
        return [m.template_message() for m in self.messages]

    def uses_tools(self) -> bool:
        """Whether tools or tool turns are in play (the prompt then goes through the tool path)."""
        return bool(self.tools or self.functions) or any(
            m.tool_calls or m.function_call or m.role in ("tool", "function") for m in self.messages
        )

    def tool_request(self) -> ToolRequest | None:
        """The validated tool fields (runtime/tools.py); None without tools."""
        from kold.runtime.tools import parse_tool_request

        return parse_tool_request(
            self.tools, self.tool_choice, self.parallel_tool_calls, self.functions, self.function_call
        )

    def top_logprobs_asked(self) -> int | None:
        """How many alternatives each token's log-probabilities carry; None: no log-probabilities."""
        return (self.top_logprobs or 0) if self.logprobs else None

    def check_supported(self) -> None:
        super().check_supported()
        if self.top_logprobs and not self.logprobs:
            raise InvalidRequestError("top_logprobs requires logprobs to be true", param="top_logprobs")
        for i, m in enumerate(self.messages):
            if m.role == "tool" and m.tool_call_id is None:
                raise InvalidRequestError(
                    "a tool message needs the tool_call_id of the call it answers", param=f"messages[{i}].tool_call_id"
                )
            if (m.tool_calls or m.function_call) and m.role != "assistant":
                raise InvalidRequestError("only assistant messages carry tool calls", param=f"messages[{i}].tool_calls")
        tools = self.tool_request()  # bad tool fields are refused before the request waits for the model
        if tools is not None and tools.forced and self.constraint() is not None:
            raise InvalidRequestError(
                f"{self.constraint_param()} cannot be combined with a tool_choice that forces a call "
                "(the call's arguments already follow the function's schema)",
                param=self.constraint_param(),
            )


# -- structured outputs -----------------------------------------------------------------------------

CONSTRAINT_PARAMS = ("response_format", "guided_json", "guided_regex", "guided_choice", "guided_grammar")
# OpenAI's rule for a json_schema's name
_SCHEMA_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


class ConstraintCompileError(InvalidRequestError):
    """A well-formed constraint the grammar library cannot compile (e.g. an unsupported JSON-schema
    keyword): the message names the feature."""

    code = "unsupported_constraint"


def _response_format_type(value: Any) -> str:
    kind = value.get("type") if isinstance(value, dict) else None
    if not isinstance(kind, str):
        raise InvalidRequestError(
            "response_format must be an object with a type: 'text', 'json_object' or 'json_schema'",
            param="response_format",
        )
    return kind


def _response_format(value: dict[str, Any]) -> Constraint:
    """OpenAI's `{"type": "json_object"}` or `{"type": "json_schema", "json_schema": {"name", "schema",
    "strict", "description"}}`. A json_schema without a schema asks for any JSON object; `strict`
    (default false, as OpenAI's): true refuses a schema keyword the library does not implement, false
    ignores it (the rest of the schema is followed)."""
    kind = _response_format_type(value)
    if kind == "json_object":
        return Constraint.json_object()
    if kind != "json_schema":
        raise InvalidRequestError(
            f"response_format type {kind!r} is not one of 'text', 'json_object', 'json_schema'",
            param="response_format.type",
        )
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise InvalidRequestError(
            "response_format.json_schema must be an object (with a name and a schema)",
            param="response_format.json_schema",
        )
    name = spec.get("name")
    if not isinstance(name, str) or not _SCHEMA_NAME.fullmatch(name):
        raise InvalidRequestError(
            "response_format.json_schema.name must be 1 to 64 letters, digits, '_' or '-'",
            param="response_format.json_schema.name",
        )
    strict = spec.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise InvalidRequestError(
            "response_format.json_schema.strict must be a boolean", param="response_format.json_schema.strict"
        )
    schema = spec.get("schema")
    if schema is None:
        return Constraint.json_object()
    if not isinstance(schema, dict):
        raise InvalidRequestError(
            "response_format.json_schema.schema must be a JSON schema object",
            param="response_format.json_schema.schema",
        )
    return Constraint.json_schema(schema, strict=bool(strict))


def _json_schema_value(value: Any) -> dict[str, Any]:
    """guided_json as vLLM takes it: a schema object, or a string holding one."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ConstraintError(f"not a JSON schema: {exc}") from None
    if not isinstance(value, dict):
        raise ConstraintError("a JSON schema must be a JSON object")
    return value


# -- responses --------------------------------------------------------------------------------------

FinishReason = Literal["stop", "length", "tool_calls", "function_call"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )


class CompletionLogprobs(BaseModel):
    """The completions endpoint's log-probabilities: one entry per token in each list. `top_logprobs`:
    the most likely tokens at each position and the chosen one, by their text; `text_offset`: where
    each token begins in the choice's text (characters, counting an echoed prompt)."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class FunctionCallOut(BaseModel):
    name: str
    arguments: str  # JSON text


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class ChatResponseMessage(BaseModel):
    """`content` is None beside calls that came with no text; `tool_calls` (or, for the deprecated
    `functions`, `function_call`) only when the model called."""

    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCallOut] | None = None
    function_call: FunctionCallOut | None = None

    @model_serializer(mode="wrap")
    def _calls_when_made(self, handler: Any) -> dict[str, Any]:
        out: dict[str, Any] = handler(self)
        for name in ("tool_calls", "function_call"):
            if out.get(name) is None:
                out.pop(name, None)
        return out


class TopLogprob(BaseModel):
    """`token`: the token's text (bytes that are not whole UTF-8 characters written as \\xNN escapes);
    `bytes`: exactly what the token stands for, to be joined with its neighbours' into text."""

    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None
    refusal: list[TokenLogprob] | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class ChatDelta(BaseModel):
    """`tool_calls`: `[{index, id, type, function: {name, arguments}}]` pieces (runtime/tools.py);
    `function_call`: `{name, arguments}` pieces, for the deprecated `functions`."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    function_call: dict[str, str] | None = None

    @model_serializer
    def _without_nulls(self) -> dict[str, Any]:  # OpenAI's deltas carry only what changed
        fields = (
            ("role", self.role),
            ("content", self.content),
            ("tool_calls", self.tool_calls),
            ("function_call", self.function_call),
        )
        return {k: v for k, v in fields if v is not None}


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "kold"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# -- helpers ----------------------------------------------------------------------------------------


# -- request bodies -----------------------------------------------------------------------------

# Deeper than any OpenAI request needs (a tool schema nests a few levels); far below the recursion
# limit that json and everything after it would hit.
MAX_JSON_DEPTH = 64


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """A request body as a JSON object; everything a client can get wrong raises an error the error
    table makes a 400 (bad UTF-8 or JSON included). Refused too: nesting deeper than MAX_JSON_DEPTH (json
    itself would raise RecursionError, an internal error), and strings with lone surrogates
    (`"\\ud800"` is valid JSON but no text: a tokenizer cannot encode it)."""
    text = raw.decode("utf-8")
    _check_depth(text)
    body = json.loads(text)
    if not isinstance(body, dict):
        raise InvalidRequestError("the request body must be a JSON object")
    _check_text(body)
    return body


_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')  # the unrolled form: no alternation per character
_BRACKET = re.compile(r"[\[\]{}]")


def _check_depth(text: str) -> None:
    """Refuse JSON nested deeper than MAX_JSON_DEPTH, counted on the brackets outside strings."""
    if text.count("[") + text.count("{") <= MAX_JSON_DEPTH:
        return  # cannot be that deep: the common case costs two counts
    depth = 0
    for bracket in _BRACKET.findall(_JSON_STRING.sub("", text)):  # strings out in C, then the structure only
        depth += 1 if bracket in "[{" else -1
        if depth > MAX_JSON_DEPTH:
            raise InvalidRequestError(f"the request body is nested deeper than {MAX_JSON_DEPTH} levels")


def _check_text(value: Any, path: str = "") -> None:
    """Refuse strings (keys too) that are not valid Unicode text: lone surrogates."""
    if isinstance(value, str):
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidRequestError(
                    f"{path or 'body'}: a string holds a lone surrogate (not valid Unicode text)", param=path or None
                ) from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_text(key, path)
            _check_text(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_text(item, f"{path}[{i}]")


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def sse(payload: BaseModel | dict[str, Any]) -> bytes:
    """One server-sent event: `data: {json}` and a blank line."""
    if isinstance(payload, BaseModel):
        text = payload.model_dump_json(exclude_none=False)
    else:
        text = json.dumps(payload, separators=(",", ":"))
    # JSON allows raw U+2028/U+2029/U+0085 in strings, but line-splitting clients break on them
    if "\u2028" in text or "\u2029" in text or "\x85" in text:
        text = text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029").replace("\x85", "\\u0085")
    return b"data: " + text.encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"
