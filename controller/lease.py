"""A Redis lease, so that only one pre-warm controller acts at a time.

Two controllers may run at once (`kold up`'s own and a standalone `kold controller`, or one per
node); each tries to take the lease and only its holder decides and sets floors. The lease is a
key: `SET key holder NX PX ttl` takes it when nobody holds it, and the holder extends it while it
lives. Extending and releasing are compare-and-set scripts, so a holder whose lease expired (it
stalled, Redis restarted) and was taken by another can neither extend nor delete the new holder's.

Redis expires the key on its own clock; the holder also keeps its own view (`held(now)`): it counts
the lease as its own until `now + ttl` from its last successful acquire or renew, measured from
before the call was sent, so it stops acting no later than Redis would hand the lease to another,
even while Redis cannot be reached to tell it so.
"""

from __future__ import annotations

import os
import socket
import uuid
from typing import Any, Final

DEFAULT_KEY: Final = "controller:lease"  # under the platform's prefix ("kold:controller:lease")

# extend the lease only while it is still ours
_RENEW: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
# delete it only while it is still ours
_RELEASE: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def default_holder_id() -> str:
    """Unique per process and readable in Redis: host, pid and a random tail (a pid may be reused)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Lease:
    """One controller's claim on the lease key. Redis errors propagate (the caller's loop logs them
    and tries again); a failed call leaves the local view as it was, so it runs out on time."""

    def __init__(self, redis_client: Any, key: str, holder_id: str, ttl_s: float) -> None:
        if not ttl_s > 0:
            raise ValueError(f"lease ttl_s must be > 0, not {ttl_s}")
        if not key or not holder_id:
            raise ValueError("a lease needs a key and a holder id")
        self.redis = redis_client
        self.key = key
        self.holder_id = holder_id
        self.ttl_s = float(ttl_s)
        self._until: float | None = None  # our own view: held until then (the caller's clock)
        self._renew = redis_client.register_script(_RENEW)
        self._release = redis_client.register_script(_RELEASE)

    @property
    def _ttl_ms(self) -> int:
        return max(1, round(self.ttl_s * 1000))

    def held(self, now: float) -> bool:
        """Whether this holder may act at `now`, by its own view (no Redis call)."""
        return self._until is not None and now < self._until

    def try_acquire(self, now: float) -> bool:
        """Take the lease if it is free, or extend it if it is ours already; False: another holds it."""
        if self._until is not None and self.renew(now):
            return True
        if self.redis.set(self.key, self.holder_id, nx=True, px=self._ttl_ms):
            self._until = now + self.ttl_s
            return True
        # ours in Redis though we did not know it (a restarted controller with the same holder id)
        return self.renew(now)

    def renew(self, now: float) -> bool:
        """Extend the lease if it is still ours; False (and no longer held): it expired or another took it."""
        ok = bool(self._renew(keys=[self.key], args=[self.holder_id, self._ttl_ms]))
        self._until = now + self.ttl_s if ok else None
        return ok

    def release(self) -> None:
        """Give the lease up (at shutdown), so that another controller takes over at once, not after the ttl."""
        self._until = None
        self._release(keys=[self.key], args=[self.holder_id])

    def holder(self) -> str | None:
        """Who holds the lease now, by Redis (None: nobody)."""
        raw = self.redis.get(self.key)
        return None if raw is None else raw.decode() if isinstance(raw, bytes) else str(raw)
