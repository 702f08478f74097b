"""The actuators: what reaches the gateway for a floor, and that none of their failures reaches the loop."""

from __future__ import annotations

import asyncio
import json
import logging

import httpx
import pytest

from kold.controller.actuators import HttpActuator, LocalActuator
from kold.controller.scaling import Floor

FLOOR = Floor(2, 1_700_000_100.0, "every 600 s: pre-warmed", idle_timeout_s=30.0)


def test_http_actuator_puts_and_deletes_the_admin_floor_with_the_key() -> None:
    seen: list[tuple[str, str, str | None, object]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else None
        seen.append((request.method, request.url.path, request.headers.get("authorization"), body))
        return httpx.Response(200, json={})

    async def scenario() -> None:
        actuator = HttpActuator("http://gw:8080/", "secret", transport=httpx.MockTransport(handler))
        assert await actuator.set_floor("fn", FLOOR) is True
        assert await actuator.set_floor("fn", None) is True
        await actuator.aclose()

    asyncio.run(scenario())
    body = {"instances": 2, "until": 1_700_000_100.0, "reason": "every 600 s: pre-warmed", "idle_timeout_s": 30.0}
    assert seen == [
        ("PUT", "/admin/functions/fn/floor", "Bearer secret", body),
        ("DELETE", "/admin/functions/fn/floor", "Bearer secret", None),
    ]


def test_http_actuator_logs_a_failing_gateway_once_per_function_and_its_recovery(
    caplog: pytest.LogCaptureFixture,
) -> None:
    answers: list[httpx.Response | Exception] = [
        httpx.ConnectError("refused"),
        httpx.Response(503, text="registry away"),
        httpx.Response(200, json={}),
    ]

    def handler(request: httpx.Request) -> httpx.Response:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def scenario() -> None:
        actuator = HttpActuator("http://gw:8080", transport=httpx.MockTransport(handler))
        delivered = [await actuator.set_floor("fn", FLOOR) for _ in range(3)]  # never raises
        assert delivered == [False, False, True], "the caller learns which floors did not arrive"
        await actuator.aclose()

    with caplog.at_level(logging.INFO, logger="kold.controller.actuators"):
        asyncio.run(scenario())
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert "could not set fn's floor" in messages[0] and "ConnectError: refused" in messages[0]
    assert "takes fn's floor again" in messages[1]


def test_http_actuator_takes_a_missing_function_on_clear_quietly(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        actuator = HttpActuator("http://gw", transport=httpx.MockTransport(lambda r: httpx.Response(404)))
        assert await actuator.set_floor("gone", None) is True, "nothing left to clear"
        await actuator.aclose()

    with caplog.at_level(logging.INFO, logger="kold.controller.actuators"):
        asyncio.run(scenario())
    assert caplog.records == []


def test_local_actuator_hands_the_floor_to_the_gateway_and_keeps_its_errors() -> None:
    class Gateway:
        def __init__(self) -> None:
            self.floors: dict[str, Floor | None] = {}

        def set_floor(self, function: str, floor: Floor | None) -> None:
            if function == "bad":
                raise ValueError("no such function")
            self.floors[function] = floor

    gateway = Gateway()
    actuator = LocalActuator(gateway)
    assert asyncio.run(actuator.set_floor("fn", FLOOR)) is True
    assert asyncio.run(actuator.set_floor("bad", FLOOR)) is False  # logged, not raised
    assert gateway.floors == {"fn": FLOOR}
