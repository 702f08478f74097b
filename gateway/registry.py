"""Functions, immutable revisions, traffic and API keys, kept in Redis.

Layout, everything under one prefix (default `kold:`) so tests and several installations can share a
Redis and a function's keys can be found (and removed) together:

    {p}functions                  SET of function names (a function exists from its first revision)
    {p}fn:{name}:counter          INCR counter: the last revision number handed out
    {p}fn:{name}:revisions        ZSET revision id -> revision number (ordered even under races)
    {p}fn:{name}:serving          the revision traffic goes to (unset until `set_traffic`)
    {p}fn:{name}:rev:{rev_id}     the revision as JSON, written once (SET NX) and never changed
    {p}fn:{name}:invocations, :coldstarts, :demand   the function's demand records (controller/demand.py)
    {p}apikeys                    SET of key ids
    {p}apikey:{key_id}            HASH sha256 / label / created_at (never the secret)
    {p}apikey-by-hash:{sha256}    the key id, so verification is one lookup by hash

Every name and id is validated (`names.py`) before it becomes part of a key.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import re
import secrets
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import redis

from kold.controller.policies.registry import DEFAULT_POLICY, parse_policy
from kold.gateway.names import REVISION_DIGITS, validate_function_name, validate_revision_id

log = logging.getLogger("kold.gateway.registry")

MAX_REVISION_NUMBER = 10**REVISION_DIGITS - 1
MAX_LABEL_LEN = 200
KEY_PREFIX = "kold_"
# What a key may do: "invoke" the OpenAI paths, or "admin" (deploy, delete, rollback, keys, logs; and invoke)
SCOPES = ("invoke", "admin")  # API key secrets start with this, so they are recognisable in configs and leaks

_SNAPSHOT_ID = re.compile(r"[0-9a-f]{32}")
_KEY_ID = re.compile(r"[0-9a-f]{12}")
_DEVICE = re.compile(r"cpu|cuda(:[0-9]{1,2})?")
_PREFIX = re.compile(r"[A-Za-z0-9_.:-]{1,100}")

# One atomic step: number the revision, write it (never overwriting), list it, register the function.
# A script rather than INCR + MULTI so that numbers and list order cannot interleave between clients,
# and a concurrent delete_function cannot leave a revision without its counter.
_CREATE_REVISION = """
local n = redis.call('INCR', KEYS[1])
if n > tonumber(ARGV[4]) then
  redis.call('DECR', KEYS[1])
  return redis.error_reply('too many revisions')
end
local rev = ARGV[1] .. '-' .. string.format('%05d', n)
local ok = redis.call('SET', ARGV[2] .. rev, ARGV[3], 'NX')
if not ok then
  return redis.error_reply('revision ' .. rev .. ' already exists')
end
redis.call('ZADD', KEYS[2], n, rev)
redis.call('SADD', KEYS[3], ARGV[1])
return rev
"""


# -- errors -----------------------------------------------------------------------------------------
# ValueError subclasses, each for one kind of bad request, so the gateway's error table can map them
# to a status (400, 404, 409) while a plain ValueError from a bug stays an internal error.


class InvalidSpecError(ValueError):
    """A spec, snapshot URI or label that breaks the rules (the message says which)."""


class FunctionNotFoundError(ValueError):
    """The function, or the revision of it that was named, does not exist."""


class ConflictError(ValueError):
    """The request is valid but the registry's state does not allow it (no revision to roll back to)."""


# -- specs ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScalingSpec:
    """How a revision scales: 0 `min_instances` allows scale to zero after `idle_timeout_s`."""

    min_instances: int = 0
    max_instances: int = 4
    target_concurrency: int = 4  # in-flight requests per instance before another one is wanted
    idle_timeout_s: float = 60.0
    # how long a request may wait for a ready instance (then 503), and then for that instance to begin
    # its answer (then 504; Knative's timeoutSeconds)
    request_timeout_s: float = 300.0
    # the pre-warm policy the controller plans this function with ("name" or "name:knob=value,...",
    # controller/policies/registry.py); revisions written before it existed load with the default
    prewarm: str = DEFAULT_POLICY

    def __post_init__(self) -> None:
        try:
            parse_policy(self.prewarm)
        except ValueError as exc:
            raise InvalidSpecError(str(exc)) from None
        for name in ("min_instances", "max_instances", "target_concurrency"):
            _require_int(name, getattr(self, name))
        for name in ("idle_timeout_s", "request_timeout_s"):
            _require_number(name, getattr(self, name))
        if self.min_instances < 0:
            raise InvalidSpecError(f"min_instances must be >= 0, not {self.min_instances}")
        if self.max_instances < 1:
            raise InvalidSpecError(f"max_instances must be >= 1, not {self.max_instances}")
        if self.min_instances > self.max_instances:
            raise InvalidSpecError(
                f"min_instances ({self.min_instances}) must not exceed max_instances ({self.max_instances})"
            )
        if self.target_concurrency < 1:
            raise InvalidSpecError(f"target_concurrency must be >= 1, not {self.target_concurrency}")
        if self.idle_timeout_s <= 0:
            raise InvalidSpecError(f"idle_timeout_s must be > 0, not {self.idle_timeout_s}")
        if self.request_timeout_s <= 0:
            raise InvalidSpecError(f"request_timeout_s must be > 0, not {self.request_timeout_s}")


@dataclass(frozen=True)
class RuntimeSpec:
    """Settings passed to every instance of a revision (`kold runtime serve`)."""

    device: str = "cpu"
    max_batch: int = 8
    max_seq_len: int | None = None  # None: the model's own limit
    # what one instance takes of the node, as a pod's resource requests: the pool starts no instance
    # that does not fit (gateway/capacity.py). memory_bytes 0: not counted; gpus None: 1 on CUDA, else 0
    cpus: float = 1.0
    memory_bytes: int = 0
    gpus: int | None = None

    @property
    def gpu_count(self) -> int:
        return self.gpus if self.gpus is not None else (0 if self.device == "cpu" else 1)

    def __post_init__(self) -> None:
        # The device ends up on an instance's command line: only known forms get there.
        if not isinstance(self.device, str) or not _DEVICE.fullmatch(self.device):
            raise InvalidSpecError(f"device must be 'cpu', 'cuda' or 'cuda:N', not {self.device!r}")
        _require_int("max_batch", self.max_batch)
        if self.max_batch < 1:
            raise InvalidSpecError(f"max_batch must be >= 1, not {self.max_batch}")
        if self.max_seq_len is not None:
            _require_int("max_seq_len", self.max_seq_len)
            if self.max_seq_len < 1:
                raise InvalidSpecError(f"max_seq_len must be >= 1 or None, not {self.max_seq_len}")
        _require_number("cpus", self.cpus)
        if not 0 <= self.cpus <= 1024:
            raise InvalidSpecError(f"cpus must be between 0 and 1024, not {self.cpus}")
        _require_int("memory_bytes", self.memory_bytes)
        if self.memory_bytes < 0:
            raise InvalidSpecError(f"memory_bytes must be >= 0, not {self.memory_bytes}")
        if self.gpus is not None:
            _require_int("gpus", self.gpus)
            if not 0 <= self.gpus <= 64:
                raise InvalidSpecError(f"gpus must be between 0 and 64, not {self.gpus}")


def _require_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidSpecError(f"{name} must be an integer, not {value!r}")


def _require_number(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidSpecError(f"{name} must be a finite number, not {value!r}")


@dataclass(frozen=True)
class Revision:
    """One immutable deploy of a function: what to serve and how. Never changed once written."""

    function: str
    revision_id: str
    snapshot_uri: str
    snapshot_id: str
    scaling: ScalingSpec
    runtime: RuntimeSpec
    created_at: float

    @property
    def number(self) -> int:
        return int(self.revision_id.rsplit("-", 1)[1])


@dataclass(frozen=True)
class Function:
    """A function's current view: its revisions (oldest first) and where traffic goes."""

    name: str
    revisions: tuple[str, ...]
    serving_revision: str | None
    latest_revision: str


@dataclass(frozen=True)
class NewKey:
    """A freshly created API key; `secret` exists only here (Redis holds its sha256)."""

    key_id: str
    secret: str = field(repr=False)


@dataclass(frozen=True)
class KeyInfo:
    """What may be shown about a key: never the secret nor its hash."""

    key_id: str
    label: str
    created_at: float
    scope: str = "admin"  # keys made before scopes existed could do everything


def snapshot_id_from_uri(uri: str) -> str:
    """The snapshot id at the end of `<store>/snapshots/<32 hex>` (the gateway does not import kold.snapshot)."""
    if not isinstance(uri, str) or not uri or any(ch in uri for ch in "\x00\r\n"):
        raise InvalidSpecError(f"snapshot URI must be a non-empty single-line string, not {uri!r}")
    head, sep, snapshot_id = uri.rstrip("/").rpartition("/snapshots/")
    if not sep or not head or not _SNAPSHOT_ID.fullmatch(snapshot_id):
        raise InvalidSpecError(f"{uri!r} is not a snapshot URI (expected <store>/snapshots/<32 hex chars>)")
    return snapshot_id


# -- the registry -----------------------------------------------------------------------------------


class Registry:
    """Functions, revisions, traffic and API keys in one Redis, under one prefix.

    Works with clients created with or without `decode_responses`.
    """

    def __init__(self, redis_client: redis.Redis, prefix: str = "kold:") -> None:
        if not _PREFIX.fullmatch(prefix):
            raise ValueError(f"prefix {prefix!r} must be 1-100 characters of [A-Za-z0-9_.:-]")
        self.redis = redis_client
        self.prefix = prefix
        self._create_script = redis_client.register_script(_CREATE_REVISION)

    # -- keys (names validated by the callers) --

    def _fn(self, name: str, what: str) -> str:
        return f"{self.prefix}fn:{name}:{what}"

    def _rev_key(self, rev_id: str) -> str:
        return self._fn(_function_of(rev_id), f"rev:{rev_id}")

    @property
    def _functions_key(self) -> str:
        return f"{self.prefix}functions"

    # -- functions and revisions --

    def create_revision(
        self,
        name: str,
        snapshot_uri: str,
        *,
        scaling: ScalingSpec | None = None,
        runtime: RuntimeSpec | None = None,
    ) -> Revision:
        """Write a new immutable revision `<name>-<n>` (n from an atomic counter); traffic is not moved."""
        validate_function_name(name)
        snapshot_id = snapshot_id_from_uri(snapshot_uri)
        scaling = scaling if scaling is not None else ScalingSpec()
        runtime = runtime if runtime is not None else RuntimeSpec()
        if not isinstance(scaling, ScalingSpec) or not isinstance(runtime, RuntimeSpec):
            raise TypeError("scaling must be a ScalingSpec and runtime a RuntimeSpec")
        created_at = time.time()
        body = json.dumps(
            {
                "snapshot_uri": snapshot_uri,
                "snapshot_id": snapshot_id,
                "scaling": asdict(scaling),
                "runtime": asdict(runtime),
                "created_at": created_at,
            },
            sort_keys=True,
        )
        try:
            rev_id = _text(
                self._create_script(
                    keys=[self._fn(name, "counter"), self._fn(name, "revisions"), self._functions_key],
                    args=[name, self._fn(name, "rev:"), body, MAX_REVISION_NUMBER],
                )
            )
        except redis.ResponseError as exc:
            raise ConflictError(f"cannot create a revision of {name!r}: {exc}") from None
        return Revision(name, rev_id, snapshot_uri, snapshot_id, scaling, runtime, created_at)

    def get_revision(self, rev_id: str) -> Revision | None:
        """The revision, or None if it does not exist (an invalid id raises InvalidNameError)."""
        validate_revision_id(rev_id)
        raw = self.redis.get(self._rev_key(rev_id))
        return None if raw is None else _revision_from_json(rev_id, _text(raw))

    def get_function(self, name: str) -> Function | None:
        """The function, or None if it has no revisions."""
        validate_function_name(name)
        return self._get_functions([name])[0]

    def list_functions(self) -> list[Function]:
        """All functions, sorted by name."""
        names = sorted(_text(n) for n in self.redis.smembers(self._functions_key))
        return [f for f in self._get_functions(names) if f is not None]

    def _get_functions(self, names: list[str]) -> list[Function | None]:
        pipe = self.redis.pipeline(transaction=True)  # one consistent snapshot, one round trip
        for name in names:
            pipe.zrange(self._fn(name, "revisions"), 0, -1)
            pipe.get(self._fn(name, "serving"))
        replies = pipe.execute()
        out: list[Function | None] = []
        for name, revs, serving in zip(names, replies[::2], replies[1::2], strict=True):
            rev_ids = tuple(_text(r) for r in revs)
            if not rev_ids:
                out.append(None)
                continue
            out.append(Function(name, rev_ids, None if serving is None else _text(serving), rev_ids[-1]))
        return out

    def set_traffic(self, name: str, rev_id: str) -> None:
        """Send all of `name`'s traffic to `rev_id`, which must be one of its revisions (else ValueError)."""
        validate_function_name(name)
        validate_revision_id(rev_id)
        if _function_of(rev_id) != name:
            raise InvalidSpecError(f"revision {rev_id!r} does not belong to function {name!r}")
        revisions = self._fn(name, "revisions")

        def move(pipe: Any) -> None:  # under WATCH: a concurrent delete makes this retry
            if pipe.zscore(revisions, rev_id) is None:
                raise FunctionNotFoundError(f"function {name!r} has no revision {rev_id!r}")
            pipe.multi()
            pipe.set(self._fn(name, "serving"), rev_id)

        self.redis.transaction(move, revisions)

    def rollback(self, name: str, rev_id: str | None = None) -> str:
        """Move traffic to `rev_id`, or to the revision before the serving one; returns where it went."""
        validate_function_name(name)
        if rev_id is not None:
            self.set_traffic(name, rev_id)
            return rev_id
        fn = self.get_function(name)
        if fn is None:
            raise FunctionNotFoundError(f"function {name!r} does not exist")
        if fn.serving_revision is None:
            raise ConflictError(f"function {name!r} serves no revision yet: nothing to roll back from")
        index = fn.revisions.index(fn.serving_revision) if fn.serving_revision in fn.revisions else -1
        if index <= 0:
            raise ConflictError(f"function {name!r}: no revision before {fn.serving_revision!r} to roll back to")
        target = fn.revisions[index - 1]
        self.set_traffic(name, target)
        return target

    def delete_function(self, name: str) -> bool:
        """Remove the function, all its revisions, its counter and traffic; False if absent (its demand
        records are the demand store's: `DemandStore.forget`)."""
        validate_function_name(name)
        revisions = self._fn(name, "revisions")
        existed = False

        def remove(pipe: Any) -> None:
            nonlocal existed
            rev_ids = [_text(r) for r in pipe.zrange(revisions, 0, -1)]
            existed = bool(rev_ids)
            pipe.multi()
            keys = [self._fn(name, w) for w in ("counter", "revisions", "serving")]
            keys += [self._fn(name, f"rev:{r}") for r in rev_ids]
            pipe.delete(*keys)
            pipe.srem(self._functions_key, name)

        self.redis.transaction(remove, revisions)
        return existed

    # -- API keys --

    def create_key(self, label: str, scope: str = "admin") -> NewKey:
        """A new API key; only its sha256 is stored, so the secret is shown to the caller once.

        An "invoke" key needs an admin key to exist first: with keys but no admin key, nobody could
        manage them any more."""
        if not isinstance(label, str) or len(label) > MAX_LABEL_LEN or not label.isprintable():
            raise InvalidSpecError(f"key label must be printable text of at most {MAX_LABEL_LEN} characters")
        if scope not in SCOPES:
            raise InvalidSpecError(f"key scope must be one of {', '.join(SCOPES)}, not {scope!r}")
        secret = KEY_PREFIX + secrets.token_urlsafe(32)
        digest = _sha256(secret)
        created_at = repr(time.time())
        while True:  # a 48-bit id collision is all but impossible; never overwrite one anyway
            key_id = secrets.token_hex(6)
            if self._write_key(key_id, digest, label, created_at, scope):
                return NewKey(key_id, secret)

    def _write_key(self, key_id: str, digest: str, label: str, created_at: str, scope: str) -> bool:
        key = self._key_key(key_id)
        written = False

        def write(pipe: Any) -> None:
            nonlocal written
            if pipe.exists(key):
                return
            if scope != "admin" and not self._admin_ids(pipe):
                raise ConflictError("create an admin key first (scope admin): without one nobody could manage keys")
            pipe.multi()
            pipe.hset(key, mapping={"sha256": digest, "label": label, "created_at": created_at, "scope": scope})
            pipe.set(self._by_hash_key(digest), key_id)
            pipe.sadd(self._keys_key, key_id)
            written = True

        self.redis.transaction(write, key, self._keys_key)
        return written

    def _admin_ids(self, pipe: Any, ids: Iterable[str] | None = None) -> set[str]:
        """The ids of admin keys (read under the caller's WATCH)."""
        ids = sorted(_text(k) for k in pipe.smembers(self._keys_key)) if ids is None else list(ids)
        return {i for i in ids if _text(pipe.hget(self._key_key(i), "scope") or b"admin") == "admin"}

    def list_keys(self) -> list[KeyInfo]:
        """Key ids, labels and creation times, oldest first (never secrets nor hashes)."""
        ids = sorted(_text(k) for k in self.redis.smembers(self._keys_key))
        pipe = self.redis.pipeline(transaction=False)
        for key_id in ids:
            pipe.hmget(self._key_key(key_id), ["label", "created_at", "scope"])
        infos = [
            KeyInfo(key_id, _text(label), float(_text(created)), _text(scope) if scope is not None else "admin")
            for key_id, (label, created, scope) in zip(ids, pipe.execute(), strict=True)
            if label is not None and created is not None
        ]
        return sorted(infos, key=lambda k: (k.created_at, k.key_id))

    def revoke_key(self, key_id: str, *, disable_auth: bool = False) -> bool:
        """Remove a key; True if it existed. A revoked secret stops verifying at once.

        Authentication never turns itself off: revoking the last key, which would leave the gateway
        open, needs `disable_auth`; and the last admin key cannot go while other keys remain."""
        if not isinstance(key_id, str) or not _KEY_ID.fullmatch(key_id):
            return False
        key = self._key_key(key_id)

        def remove(pipe: Any) -> None:
            ids = {_text(k) for k in pipe.smembers(self._keys_key)}
            if key_id in ids:
                others = ids - {key_id}
                if not others and not disable_auth:
                    raise ConflictError(
                        "this is the last key: revoking it turns authentication off; say so explicitly "
                        "(kold keys revoke ID --disable-auth), or create another key first"
                    )
                if others and key_id in self._admin_ids(pipe, ids) and not self._admin_ids(pipe, others):
                    raise ConflictError(
                        "this is the last admin key while invoke keys remain: nobody could manage them; "
                        "create another admin key first"
                    )
            digest = pipe.hget(key, "sha256")
            pipe.multi()
            if digest is not None:
                pipe.delete(self._by_hash_key(_text(digest)))
            pipe.delete(key)
            pipe.srem(self._keys_key, key_id)

        replies = self.redis.transaction(remove, key, self._keys_key)
        return isinstance(replies, list) and bool(replies[-1])  # SREM's count

    def key_scope(self, secret: str) -> str | None:
        """The scope of the live key `secret` ("invoke" or "admin"), None if it is no key: a lookup by
        its sha256, then a constant-time comparison."""
        if not isinstance(secret, str) or not secret.startswith(KEY_PREFIX) or len(secret) > 200:
            return None
        digest = _sha256(secret)
        key_id = self.redis.get(self._by_hash_key(digest))
        if key_id is None:
            return None
        stored, scope = self.redis.hmget(self._key_key(_text(key_id)), ["sha256", "scope"])
        if stored is None or not hmac.compare_digest(_text(stored), digest):
            return None
        return _text(scope) if scope is not None else "admin"

    def verify_key(self, secret: str) -> bool:
        """True if `secret` is a live key of any scope."""
        return self.key_scope(secret) is not None

    def ping(self) -> None:
        """Raises RedisError while Redis cannot be reached."""
        self.redis.ping()

    def has_keys(self) -> bool:
        """Whether any key exists (no keys: the gateway decides whether that means open or closed)."""
        return bool(self.redis.scard(self._keys_key))

    @property
    def _keys_key(self) -> str:
        return f"{self.prefix}apikeys"

    def _key_key(self, key_id: str) -> str:
        return f"{self.prefix}apikey:{key_id}"

    def _by_hash_key(self, digest: str) -> str:
        return f"{self.prefix}apikey-by-hash:{digest}"


# -- helpers ----------------------------------------------------------------------------------------


def _text(value: Any) -> str:
    """Redis replies are bytes unless the client decodes them."""
    return value.decode() if isinstance(value, bytes) else str(value)


def _sha256(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _function_of(rev_id: str) -> str:
    return rev_id.rsplit("-", 1)[0]


def _revision_from_json(rev_id: str, raw: str) -> Revision:
    data: Mapping[str, Any] = json.loads(raw)
    return Revision(
        function=_function_of(rev_id),
        revision_id=rev_id,
        snapshot_uri=data["snapshot_uri"],
        snapshot_id=data["snapshot_id"],
        scaling=_scaling_from_json(rev_id, data["scaling"]),
        runtime=RuntimeSpec(**data["runtime"]),
        created_at=float(data["created_at"]),
    )


def _scaling_from_json(rev_id: str, data: Mapping[str, Any]) -> ScalingSpec:
    """A stored scaling spec. One whose pre-warm policy is no longer known (a policy renamed since it
    was deployed) still loads, with the default policy: the revision must keep serving."""
    try:
        return ScalingSpec(**data)
    except InvalidSpecError:
        if "prewarm" not in data:
            raise
        rest = {k: v for k, v in data.items() if k != "prewarm"}
        spec = ScalingSpec(**rest)
        log.warning("revision %s: unknown prewarm policy %r, planned with %r", rev_id, data["prewarm"], DEFAULT_POLICY)
        return spec
