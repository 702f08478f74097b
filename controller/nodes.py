"""The node agents' record in Redis: which snapshots the controller wants warm, and what each node holds.

On Knative the controller cannot place a pod's weights itself: a new pod restores them from whatever
its node has. So the controller writes down what it expects to start soon (`want`: a function's
snapshot, until when, and why), every node agent (`kold node serve`) reads that list on its tick and
prefetches those snapshots into its node's shm tier, and each agent reports back what it holds
(`report`), which expires if the agent goes away. Nothing here talks to a node directly: Redis is the
only channel, so either side may restart without the other noticing more than a stale tick.

Keys (under the platform's prefix `{p}`, default `kold:`; the layout is in controller/README.md,
"Redis schema"): `{p}node:wants` (HASH: function -> JSON want), `{p}node:report:{node}` (STRING: the
node's JSON report, expiring) and `{p}node:reports` (ZSET: node -> when its report expires, so the
reports are listed without a scan of the key space).

Works with clients created with or without `decode_responses`. Redis errors (RedisError) propagate:
the caller decides how to wait for Redis to come back; nothing here retries.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from dataclasses import dataclass
from typing import Any, Final

from kold.gateway.names import validate_function_name

log = logging.getLogger(__name__)

_PREFIX = re.compile(r"[A-Za-z0-9_.:-]{1,100}")  # the registry's rule: all share one key space
# a Kubernetes node name (a DNS-1123 subdomain) or a host name; no ':' so no key can be mistaken for another
_NODE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]{0,251}[A-Za-z0-9])?")
MAX_REASON = 200  # a want's reason is a line for people (`kold describe`, logs), not a document

# remove a field only while it still holds the value that was read: a want rewritten meanwhile stays
_PRUNE: Final = """
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  return redis.call('HDEL', KEYS[1], ARGV[1])
end
return 0
"""


@dataclass(frozen=True)
class Want:
    """One function's snapshot that node agents should hold until `until` (Unix seconds)."""

    function: str
    uri: str
    until: float
    reason: str = ""
    nbytes: int = 0  # the snapshot's data size as the controller knows it; 0: unknown (the agent reads it)


def validate_node_name(name: object) -> str:
    """`name` if it can name a node in a key (a Kubernetes node name or a host name), else ValueError."""
    if not isinstance(name, str) or not _NODE.fullmatch(name):
        raise ValueError(
            f"node name {name!r} must be 1-253 letters, digits, '.', '_' or '-', starting and ending alphanumeric"
        )
    return name


class NodeWants:
    """The wanted snapshots (written by the controller, read by node agents) and the agents' reports."""

    def __init__(self, redis_client: Any, prefix: str = "kold:") -> None:
        if not isinstance(prefix, str) or not _PREFIX.fullmatch(prefix):
            raise ValueError(f"prefix {prefix!r} must be 1-100 characters of [A-Za-z0-9_.:-]")
        self.redis = redis_client
        self.prefix = prefix
        self._prune = redis_client.register_script(_PRUNE)

    @property
    def wants_key(self) -> str:
        return f"{self.prefix}node:wants"

    @property
    def reports_key(self) -> str:
        return f"{self.prefix}node:reports"

    def report_key(self, node: str) -> str:
        return f"{self.prefix}node:report:{validate_node_name(node)}"

    # -- the controller's side --

    def want(self, function: str, uri: str, until: float, reason: str = "", nbytes: int = 0) -> None:
        """Ask the node agents to hold `function`'s snapshot `uri` until `until`; replaces its earlier want."""
        validate_function_name(function)
        if not isinstance(uri, str) or not uri.strip():
            raise ValueError(f"want {function}: the snapshot URI must be a non-empty string, not {uri!r}")
        if isinstance(until, bool) or not isinstance(until, int | float) or not math.isfinite(until):
            raise ValueError(f"want {function}: until must be a finite number of Unix seconds, not {until!r}")
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
            raise ValueError(f"want {function}: nbytes must be a whole number >= 0, not {nbytes!r}")
        value = {"uri": uri, "until": float(until), "reason": str(reason)[:MAX_REASON], "bytes": nbytes}
        self.redis.hset(self.wants_key, function, json.dumps(value, sort_keys=True))

    def unwant(self, function: str) -> None:
        """The controller no longer expects `function` to start: its snapshot may leave the nodes' tiers."""
        self.redis.hdel(self.wants_key, validate_function_name(function))

    # -- the node agents' side --

    def wanted(self, now: float | None = None) -> list[Want]:
        """The wants still in force at `now`, by function. Expired and unreadable ones are left out and
        removed (each only if nobody rewrote it since it was read)."""
        now = time.time() if now is None else now
        found: list[Want] = []
        for raw_field, raw_value in self.redis.hgetall(self.wants_key).items():
            field, value = _text(raw_field), _text(raw_value)
            want = _parse_want(field, value)
            if want is None:
                log.warning("node wants: %s holds an unreadable want (%.200s); removing it", field, value)
            elif want.until > now:
                found.append(want)
                continue
            self._prune(keys=[self.wants_key], args=[field, value])
        return sorted(found, key=lambda w: w.function)

    def report(self, node: str, doc: dict[str, Any], ttl_s: float) -> None:
        """Publish what `node` holds (a JSON object); it disappears `ttl_s` after the last report."""
        if not math.isfinite(ttl_s) or ttl_s <= 0:
            raise ValueError(f"ttl_s must be a number of seconds above 0, not {ttl_s!r}")
        key = self.report_key(node)
        now = time.time()
        body = json.dumps({**doc, "node": node, "reported_at": now}, sort_keys=True)
        ttl_ms = max(1, int(ttl_s * 1000))
        pipe = self.redis.pipeline(transaction=True)
        pipe.set(key, body, px=ttl_ms)
        pipe.zadd(self.reports_key, {node: (now + ttl_s) * 1000})
        pipe.zremrangebyscore(self.reports_key, "-inf", now * 1000)
        pipe.execute()

    def nodes(self, now: float | None = None) -> list[dict[str, Any]]:
        """Every live node's last report, by node name."""
        now = time.time() if now is None else now
        names = sorted(_text(n) for n in self.redis.zrangebyscore(self.reports_key, now * 1000, "+inf"))
        self.redis.zremrangebyscore(self.reports_key, "-inf", now * 1000)
        if not names:
            return []
        out = []
        for name, raw in zip(names, self.redis.mget([self.report_key(n) for n in names]), strict=True):
            if raw is None:  # expired between the two reads
                continue
            try:
                doc = json.loads(_text(raw))
            except ValueError:
                log.warning("node %s: its report is not JSON; ignored", name)
                continue
            if isinstance(doc, dict):
                out.append(doc)
        return out


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _parse_want(function: str, value: str) -> Want | None:
    try:
        doc = json.loads(value)
        validate_function_name(function)
    except ValueError:
        return None
    if not isinstance(doc, dict):
        return None
    uri, until, reason, nbytes = doc.get("uri"), doc.get("until"), doc.get("reason", ""), doc.get("bytes", 0)
    if not isinstance(uri, str) or not uri or isinstance(until, bool) or not isinstance(until, int | float):
        return None
    if not math.isfinite(until) or not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes < 0:
        return None
    return Want(function, uri, float(until), reason if isinstance(reason, str) else "", nbytes)
