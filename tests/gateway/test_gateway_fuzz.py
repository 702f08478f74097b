"""Property: whatever JSON or text a client sends, the gateway and the instance behind it answer with a
status below 500 and, for errors, OpenAI's JSON error body; never a traceback. Real redis, a real
runtime instance, uvicorn on loopback; hypothesis makes the inputs (lone surrogates included)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from gateway_helpers import Served, deploy_and_wait
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kold.gateway.pool import InstanceState
from kold.gateway.registry import Registry

pytestmark = pytest.mark.redis

PATHS = ("/v1/chat/completions", "/v1/completions")
# any code point, surrogates included: `"\ud800"` is valid JSON that no tokenizer can encode
ANY_TEXT = st.text(alphabet=st.characters(exclude_categories=()), max_size=40)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | ANY_TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(ANY_TEXT, inner, max_size=4),
    max_leaves=12,
)
FIELDS = ("model", "prompt", "messages", "max_tokens", "temperature", "stream", "stop", "n", "logprobs", "tools")


def _request_bodies(model: str) -> st.SearchStrategy[Any]:
    """Mostly request-shaped objects (so the checks past parsing are reached), some arbitrary JSON."""
    message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "tool", "x"]), "content": ANY_TEXT})
    shaped = st.fixed_dictionaries(
        {"model": st.just(model), "max_tokens": st.integers(min_value=-2, max_value=2)},
        optional={
            "prompt": ANY_TEXT | JSON_VALUES,
            "messages": st.lists(message, max_size=3) | JSON_VALUES,
            **{f: JSON_VALUES for f in FIELDS[4:]},
        },
    )
    return shaped | st.dictionaries(st.sampled_from(FIELDS), JSON_VALUES, max_size=5) | JSON_VALUES


def _check(response: httpx.Response, sent: Any) -> None:
    assert response.status_code < 500, (response.status_code, response.text, sent)
    if response.status_code >= 400:
        error = response.json()["error"]
        assert isinstance(error["message"], str) and error["message"], response.text
        assert "Traceback" not in response.text


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_json_never_gets_a_5xx(
    registry: Registry, serve: Callable[..., Served], tiny_snapshot: str, data: st.DataObject
) -> None:
    s = _served(registry, serve, tiny_snapshot)
    direct = [i.url for i in s.app.state.gateway.pool.instances() if i.state is InstanceState.READY]
    body = data.draw(_request_bodies("fuzz"), label="body")
    raw = json.dumps(body).encode()  # ensure_ascii: a lone surrogate travels as a \ud800 escape
    for base in (s.url, *direct):
        for path in PATHS:
            _check(httpx.post(base + path, content=raw, headers=_token(s), timeout=60, trust_env=False), body)


HOSTILE = {
    "nested 5000 deep": b"[" * 5000 + b"]" * 5000,
    "a lone surrogate in the prompt": b'{"model": "fuzz", "prompt": "\\ud800"}',
    "a lone surrogate in a message": b'{"model": "fuzz", "messages": [{"role": "user", "content": "\\udfff x"}]}',
    "not UTF-8": b"\xff\xfe{}",
    "empty": b"",
}


def test_hostile_bodies_are_400s(registry: Registry, serve: Callable[..., Served], tiny_snapshot: str) -> None:
    s = _served(registry, serve, tiny_snapshot)
    direct = [i.url for i in s.app.state.gateway.pool.instances() if i.state is InstanceState.READY]
    for case, raw in HOSTILE.items():
        for base in (s.url, *direct):
            for path in PATHS:
                r = httpx.post(base + path, content=raw, headers=_token(s), timeout=60, trust_env=False)
                assert r.status_code == 400, (case, base, path, r.text)
                assert r.json()["error"]["type"] == "invalid_request_error", (case, r.text)


def _token(s: Served) -> dict[str, str]:
    """The instance token: requests straight to an instance need it (the gateway sends it anyway)."""
    return dict(s.app.state.gateway.pool.instance_headers)


_SERVED: dict[str, Served] = {}


def _served(registry: Registry, serve: Callable[..., Served], snapshot: str) -> Served:
    """One gateway with one warm instance of 'fuzz' per test (hypothesis calls the test many times)."""
    key = registry.prefix
    if key not in _SERVED:
        s = serve(registry)
        deploy_and_wait(s, "fuzz", snapshot)
        _SERVED.clear()
        _SERVED[key] = s
    return _SERVED[key]
