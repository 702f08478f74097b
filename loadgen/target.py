"""What the load goes to: an OpenAI-compatible base URL, and how to talk to it.

The same client serves a kold gateway and any other OpenAI-compatible server (vLLM, a Knative URL, a
hosted API), so that users can compare kold with what they run today; `kold_gateway` only adds what a
kold gateway offers beside the OpenAI routes (its admin API, for sampling instances).
"""

from __future__ import annotations

from dataclasses import dataclass

APIS = ("chat", "completions")


@dataclass(frozen=True)
class Target:
    """An OpenAI base URL (…/v1; for a kold gateway: GATEWAY/v1) and the API spoken to it."""

    base_url: str
    api: str = "chat"  # "chat" (/chat/completions) | "completions" (/completions)
    stream: bool = True
    api_key: str | None = None  # sent as a Bearer token
    kold_gateway: str | None = None  # the gateway's root URL when the target is a kold gateway
    extra_headers: tuple[tuple[str, str], ...] = ()  # sent with every request (e.g. a kold pool's instance token)

    def __post_init__(self) -> None:
        if self.api not in APIS:
            raise ValueError(f"api must be one of {', '.join(APIS)}, not {self.api!r}")
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"the base URL must start with http:// or https://: {self.base_url!r}")

    @property
    def url(self) -> str:
        """The endpoint the requests go to."""
        path = "/chat/completions" if self.api == "chat" else "/completions"
        return self.base_url.rstrip("/") + path

    def headers(self) -> dict[str, str]:
        """Headers sent with every request: `extra_headers`, and the Bearer key when given."""
        out = dict(self.extra_headers)
        if self.api_key:
            out["Authorization"] = f"Bearer {self.api_key}"
        return out
