"""How the controller's floors reach what runs the instances.

The controller decides a floor per function (`scaling.Floor`: keep N instances until a time); an
actuator hands it to whatever scales: the local gateway in the same process (`LocalActuator`), a
gateway in another process over its admin API (`HttpActuator`). On Knative it is
`kold.knative.actuator.KnativeActuator` (the serving Revision's min-scale, through the Kubernetes API),
which lives with the rest of the Knative target so that controller/ never imports kubernetes.
Actuators never raise into the controller's loop: a floor that did not arrive is logged and
`set_floor` says False, and the controller sends it again next tick.
"""

from __future__ import annotations

import logging
from typing import Protocol
from urllib.parse import quote

import httpx

from kold.controller.scaling import Floor
from kold.gateway.floors import floor_to_json  # pure: the admin API's one JSON form of a floor

log = logging.getLogger("kold.controller.actuators")


class Actuator(Protocol):
    async def set_floor(self, function: str, floor: Floor | None) -> bool:
        """Hold `floor` for `function` (its `until` is Unix time); None clears the function's floor.
        True when it was delivered; False (logged here) when not, so the caller tries again."""
        ...


class FloorHolder(Protocol):
    """What LocalActuator needs of the gateway (kold.gateway.activator.Gateway fits it; the controller
    does not import the gateway)."""

    def set_floor(self, function: str, floor: Floor | None) -> None: ...


class LocalActuator:
    """The gateway in this process (`kold up`): its floor is a method call."""

    def __init__(self, gateway: FloorHolder) -> None:
        self.gateway = gateway

    async def set_floor(self, function: str, floor: Floor | None) -> bool:
        try:
            self.gateway.set_floor(function, floor)
        except ValueError as exc:  # a floor it refuses (a bad field): the controller goes on with the others
            log.warning("the gateway refused %s's floor: %s", function, exc)
            return False
        except Exception:  # the gateway's own failure must not stop the controller deciding for others
            log.exception("the gateway failed to take %s's floor", function)
            return False
        return True


class HttpActuator:
    """A gateway in another process (`kold controller`): PUT/DELETE /admin/functions/NAME/floor.

    Failures are logged once per function until that function's floor goes through again, so an
    unreachable gateway costs one line per function, not one per tick."""

    def __init__(
        self,
        gateway_url: str,
        api_key: str | None = None,
        *,
        timeout_s: float = 5.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.base_url = gateway_url.rstrip("/")
        self._client = httpx.AsyncClient(
            base_url=self.base_url, headers=headers, timeout=timeout_s, transport=transport
        )
        self._failing: set[str] = set()

    async def set_floor(self, function: str, floor: Floor | None) -> bool:
        path = f"/admin/functions/{quote(function, safe='')}/floor"
        try:
            if floor is None:
                resp = await self._client.delete(path)
            else:
                resp = await self._client.put(path, json=floor_to_json(floor))
        except httpx.HTTPError as exc:
            self._failed(function, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
            return False
        if resp.status_code == 404 and floor is None:
            self._failing.discard(function)  # nothing to clear: the function is gone
            return True
        if resp.status_code >= 400:
            self._failed(function, f"HTTP {resp.status_code}: {' '.join(resp.text.split())[:200]}")
            return False
        if function in self._failing:
            self._failing.discard(function)
            log.info("the gateway at %s takes %s's floor again", self.base_url, function)
        return True

    def _failed(self, function: str, why: str) -> None:
        if function not in self._failing:
            self._failing.add(function)
            log.warning("could not set %s's floor at the gateway %s: %s (retrying)", function, self.base_url, why)

    async def aclose(self) -> None:
        await self._client.aclose()
