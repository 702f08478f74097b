"""`/v1/embeddings` through the gateway: routed by the body's `model` and by a function's own base
URL to a real runtime instance, with the official client; the runtime's 400s pass through; each
request is recorded with its input tokens."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx
import numpy as np
import openai
import pytest
from gateway_helpers import Served, deploy

from kold.controller.demand import DemandStore
from kold.gateway.registry import Registry

pytestmark = pytest.mark.redis

TEXTS = ["the quick brown fox", "jumps over the lazy dog"]


def test_embeddings_are_routed_to_the_function(
    registry: Registry, serve: Callable[..., Served], tiny_snapshot: str
) -> None:
    deploy(registry, "embed", tiny_snapshot, request_timeout_s=60)
    s = serve(registry)
    http = httpx.Client(trust_env=False)
    sdk = openai.OpenAI(base_url=f"{s.url}/v1", api_key="unused", http_client=http, max_retries=0)
    cold = sdk.embeddings.with_raw_response.create(model="embed", input=TEXTS)
    assert cold.headers["x-kold-cold"] == "1"
    by_model = cold.parse()
    vectors = np.array([d.embedding for d in by_model.data])
    assert vectors.shape == (2, 64)  # the tiny model's hidden size
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    # the function's own base URL (what kold deploy prints), the model name there being anything
    own = openai.OpenAI(base_url=f"{s.url}/v1/functions/embed/v1", api_key="unused", http_client=http, max_retries=0)
    by_path = own.embeddings.create(model="whatever", input=TEXTS, encoding_format="float")
    np.testing.assert_allclose(np.array([d.embedding for d in by_path.data]), vectors, atol=1e-6)
    assert by_path.usage.prompt_tokens == by_model.usage.prompt_tokens > 2
    # the runtime's refusals come back as they are; an unknown function is the gateway's 404
    with pytest.raises(openai.BadRequestError) as empty:
        sdk.embeddings.create(model="embed", input="")
    assert empty.value.body["param"] == "input"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError):
        sdk.embeddings.create(model="nope", input="hi")
    assert s.http.post("/v1/functions/embed/v1/embeddings", content=b"{").status_code == 400
    # recorded as invocations, with the input tokens the answer's usage gave (no completion tokens)
    demand = DemandStore(registry.redis, registry.prefix)
    deadline = time.monotonic() + 5
    while len(demand.invocations("embed")) < 3:
        assert time.monotonic() < deadline, demand.invocations("embed")
        time.sleep(0.1)
    first, *later = demand.invocations("embed")
    # the first waited for the restore; a request right after its answer may still find the instance
    # STARTING in the gateway's view (the readiness it learns follows the answer), the later ones do not
    assert first.cold and first.outcome == "ok" and not later[-1].cold
    assert (first.tokens_in, first.tokens_out) == (by_model.usage.prompt_tokens, None)
