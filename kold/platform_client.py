"""The CLI's client of the local platform's gateway (admin API and invocation), over HTTP.

The CLI never touches Redis or the instances itself: like `kubectl` and the API server, it asks the
gateway, which owns the state. Errors come back as one-line `CLIError`s.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx

from kold.errors import CLIError


class PlatformError(CLIError):
    """The gateway answered with an error; `status` is its HTTP status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class PlatformClient:
    """`unreachable`: the error when nothing answers at `base_url`; the CLI says there where the URL came from."""

    def __init__(
        self, base_url: str, api_key: str | None = None, timeout_s: float = 600.0, *, unreachable: str | None = None
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.api_key = api_key  # for clients of the same gateway that are not this one (kold loadgen)
        self.base_url = base_url.rstrip("/")
        self.unreachable = unreachable or f"no kold platform answers at {self.base_url}: start it with `kold up`"
        self._client = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout_s)

    def request(self, method: str, path: str, body: Any = None) -> Any:
        try:
            resp = self._client.request(method, path, json=body)
        except httpx.ConnectError:
            raise CLIError(self.unreachable) from None
        except httpx.TimeoutException:
            raise CLIError(f"the platform at {self.base_url} did not answer in time") from None
        except httpx.TransportError as exc:
            raise CLIError(f"the platform at {self.base_url} failed to answer: {exc or type(exc).__name__}") from None
        if resp.status_code >= 400:
            raise PlatformError(_error_message(resp), resp.status_code)
        return resp.json() if resp.content else None

    def stream_chat(self, name: str, body: dict[str, Any]) -> Iterator[tuple[dict[str, str], dict[str, Any]]]:
        """Yield (response headers, SSE chunk) for a streamed chat or completion request."""
        path = f"/v1/functions/{name}/v1/{'chat/completions' if 'messages' in body else 'completions'}"
        try:
            with self._client.stream("POST", path, json={**body, "stream": True}) as resp:
                if resp.status_code >= 400:
                    resp.read()
                    raise PlatformError(_error_message(resp), resp.status_code)
                headers = {k.lower(): v for k, v in resp.headers.items()}
                for line in resp.iter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        yield headers, json.loads(line[6:])
        except httpx.ConnectError:
            raise CLIError(self.unreachable) from None
        except httpx.TimeoutException:
            raise CLIError(f"the platform at {self.base_url} did not answer in time") from None
        except httpx.TransportError as exc:
            raise CLIError(f"the answer from {self.base_url} broke off: {exc or type(exc).__name__}") from None

    def stream_logs(self, name: str, tail: int) -> Iterator[str]:
        """Yield a function's log text as the gateway streams it (`logs?follow=1`), like `tail -F`.

        The gateway first sends each instance's last `tail` lines, then new output as it is written,
        also of instances started later; the iterator ends only when the platform ends the stream
        (it shuts down). No read timeout: a quiet function sends nothing for as long as it is quiet.
        """
        params = {"tail": str(tail), "follow": "1"}
        try:
            timeout = httpx.Timeout(None, connect=5.0)
            with self._client.stream("GET", f"/admin/functions/{name}/logs", params=params, timeout=timeout) as resp:
                if resp.status_code >= 400:
                    resp.read()
                    raise PlatformError(_error_message(resp), resp.status_code)
                yield from resp.iter_text()
        except httpx.ConnectError:
            raise CLIError(self.unreachable) from None
        except httpx.TransportError as exc:
            raise CLIError(f"the log stream from {self.base_url} broke off: {exc or type(exc).__name__}") from None

    def close(self) -> None:
        self._client.close()


def _error_message(resp: httpx.Response) -> str:
    """The gateway's error as one line: its message, the status and the error's code, e.g.
    `the function registry (Redis) is unreachable; try again shortly (HTTP 503, registry_unavailable)`.
    Whatever else answers (a proxy's HTML page, a body that is not an error object) is cut to one
    line too: the CLI prints one line per error, never a page or a traceback."""
    message, code = "", None
    try:
        doc = resp.json()
    except ValueError:
        doc = None
    error = doc.get("error") if isinstance(doc, dict) else None
    if isinstance(error, dict):
        message = str(error.get("message") or "")
        code = error.get("code") if isinstance(error.get("code"), str) else None
    elif error is not None:
        message = str(error)
    elif doc is None:
        message = resp.text
    message = " ".join(message.split())[:300] or "request failed"
    # the gateway speaks to any HTTP client; a CLI user needs to know where the CLI takes its key from
    hint = ": the CLI sends the key in KOLD_API_KEY" if resp.status_code == 401 else ""
    return f"{message} (HTTP {resp.status_code}{f', {code}' if code else ''}){hint}"
