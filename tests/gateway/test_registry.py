"""The registry against a real redis-server: the session's (`redis_url`, tests/conftest.py)."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from dataclasses import FrozenInstanceError

import pytest
import redis

from kold.controller.policies.registry import DEFAULT_POLICY
from kold.gateway.names import InvalidNameError, validate_function_name, validate_revision_id
from kold.gateway.registry import (
    ConflictError,
    InvalidSpecError,
    KeyInfo,
    Registry,
    RuntimeSpec,
    ScalingSpec,
)

pytestmark = pytest.mark.redis

SNAP_A = "file:///tmp/store/snapshots/" + "a" * 32
SNAP_B = "s3://bucket/kold/snapshots/" + "0123456789abcdef" * 2


def _keys(client: redis.Redis, prefix: str) -> list[str]:
    return sorted(k.decode() for k in client.scan_iter(match=prefix + "*", count=1000))


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(redis_url, socket_connect_timeout=1)
    yield c
    c.close()


@pytest.fixture
def prefix(client: redis.Redis) -> Iterator[str]:
    """A fresh key prefix per test; every key under it is removed afterwards."""
    p = f"kold-test-{uuid.uuid4().hex}:"
    yield p
    keys = _keys(client, p)
    if keys:
        client.delete(*keys)


@pytest.fixture
def registry(client: redis.Redis, prefix: str) -> Registry:
    return Registry(client, prefix=prefix)


# -- names ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a", "tiny", "llama-3-8b", "a1", "x" * 63, "a--b", "q0"])
def test_good_function_names(name: str) -> None:
    assert validate_function_name(name) == name


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("", "must not be empty"),
        ("x" * 64, "at most 63"),
        ("Tiny", "lowercase letters, digits and '-'"),
        ("ti_ny", "lowercase letters, digits and '-'"),
        ("ti.ny", "lowercase letters, digits and '-'"),
        ("../etc", "lowercase letters, digits and '-'"),
        ("a/b", "lowercase letters, digits and '-'"),
        ("a:b", "lowercase letters, digits and '-'"),
        ("a*", "lowercase letters, digits and '-'"),
        ("tiny\n", "lowercase letters, digits and '-'"),
        ("tïny", "lowercase letters, digits and '-'"),
        ("1tiny", "must start with a lowercase letter"),
        ("-tiny", "must start with a lowercase letter"),
        ("tiny-", "must end with a lowercase letter or digit"),
        (None, "must be a string"),
    ],
)
def test_bad_function_names(name: object, message: str) -> None:
    with pytest.raises(InvalidNameError, match=message.replace("*", r"\*")):
        validate_function_name(name)
    assert issubclass(InvalidNameError, ValueError)


@pytest.mark.parametrize("rev", ["tiny-00001", "llama-3-8b-00042", "a-99999", "tiny-2-00001"])
def test_good_revision_ids(rev: str) -> None:
    assert validate_revision_id(rev) == rev


@pytest.mark.parametrize(
    ("rev", "message"),
    [
        ("tiny", "<function name>-<5 digits>"),
        ("tiny-1", "<function name>-<5 digits>"),
        ("tiny-000001", "<function name>-<5 digits>"),
        ("tiny-00000", "start at 1"),
        ("-00001", "<function name>-<5 digits>"),
        ("Tiny-00001", "lowercase letters"),
        ("../x-00001", "lowercase letters"),
        ("tiny-00001\n", "<function name>-<5 digits>"),
        ("tiny-٠٠٠٠١", "<function name>-<5 digits>"),  # Arabic-Indic digits are not [0-9]
    ],
)
def test_bad_revision_ids(rev: str, message: str) -> None:
    with pytest.raises(InvalidNameError, match=message):
        validate_revision_id(rev)


# -- specs ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"min_instances": 5, "max_instances": 4}, "min_instances"),
        ({"min_instances": -1}, "min_instances"),
        ({"max_instances": 0, "min_instances": 0}, "max_instances"),
        ({"target_concurrency": 0}, "target_concurrency"),
        ({"idle_timeout_s": 0}, "idle_timeout_s"),
        ({"request_timeout_s": -1.0}, "request_timeout_s"),
        ({"request_timeout_s": float("nan")}, "request_timeout_s"),
        ({"max_instances": 2.5}, "max_instances"),
        ({"max_instances": True}, "max_instances"),
    ],
)
def test_scaling_spec_validation(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        ScalingSpec(**kwargs)  # type: ignore[arg-type]


def test_runtime_spec_validation() -> None:
    RuntimeSpec(device="cuda:0", max_batch=1, max_seq_len=16)
    for kwargs, field in [
        ({"device": "cuda; rm -rf /"}, "device"),
        ({"max_batch": 0}, "max_batch"),
        ({"max_seq_len": 0}, "max_seq_len"),
    ]:
        with pytest.raises(ValueError, match=field):
            RuntimeSpec(**kwargs)  # type: ignore[arg-type]


# -- revisions and traffic --------------------------------------------------------------------------


def test_revisions_are_numbered_and_immutable(registry: Registry) -> None:
    scaling = ScalingSpec(min_instances=1, max_instances=3, target_concurrency=2, idle_timeout_s=1.5)
    runtime = RuntimeSpec(device="cuda", max_batch=4, max_seq_len=512)
    r1 = registry.create_revision("tiny", SNAP_A, scaling=scaling, runtime=runtime)
    assert r1.revision_id == "tiny-00001"
    assert r1.snapshot_id == "a" * 32
    assert registry.get_revision("tiny-00001") == r1  # JSON round trip, exactly

    fn = registry.get_function("tiny")
    assert fn is not None
    assert fn.revisions == ("tiny-00001",)
    assert fn.latest_revision == "tiny-00001"
    assert fn.serving_revision is None  # traffic moves only with set_traffic

    r2 = registry.create_revision("tiny", SNAP_B)
    assert r2.revision_id == "tiny-00002"
    assert r2.scaling == ScalingSpec() and r2.runtime == RuntimeSpec()
    assert registry.get_revision("tiny-00001") == r1  # the old one is untouched
    assert registry.get_revision("tiny-00002") == r2
    assert registry.get_revision("tiny-00003") is None
    fn = registry.get_function("tiny")
    assert fn is not None and fn.revisions == ("tiny-00001", "tiny-00002")
    assert fn.latest_revision == "tiny-00002" and fn.serving_revision is None
    with pytest.raises(FrozenInstanceError):
        r1.snapshot_uri = SNAP_B  # type: ignore[misc]


def test_functions_are_listed_sorted_and_unknown_ones_are_none(registry: Registry) -> None:
    assert registry.list_functions() == []
    assert registry.get_function("nope") is None
    for name in ("zeta", "alpha", "mid-1"):
        registry.create_revision(name, SNAP_A)
    assert [f.name for f in registry.list_functions()] == ["alpha", "mid-1", "zeta"]


def test_bad_input_never_reaches_redis(registry: Registry, client: redis.Redis, prefix: str) -> None:
    with pytest.raises(InvalidNameError):
        registry.create_revision("../etc", SNAP_A)
    with pytest.raises(ValueError, match="not a snapshot URI"):
        registry.create_revision("tiny", "file:///tmp/store/snapshots/not-an-id")
    with pytest.raises(InvalidNameError):
        registry.get_revision("tiny-00001:x")
    with pytest.raises(InvalidNameError):
        registry.get_function("a*")
    assert _keys(client, prefix) == []


def test_traffic_only_to_own_existing_revisions(registry: Registry) -> None:
    registry.create_revision("tiny", SNAP_A)
    registry.create_revision("other", SNAP_A)
    registry.set_traffic("tiny", "tiny-00001")
    fn = registry.get_function("tiny")
    assert fn is not None and fn.serving_revision == "tiny-00001"
    with pytest.raises(ValueError, match="does not belong"):
        registry.set_traffic("tiny", "other-00001")
    with pytest.raises(ValueError, match="has no revision"):
        registry.set_traffic("tiny", "tiny-00002")
    with pytest.raises(ValueError, match="has no revision"):
        registry.set_traffic("ghost", "ghost-00001")
    fn = registry.get_function("tiny")
    assert fn is not None and fn.serving_revision == "tiny-00001"


def test_rollback(registry: Registry) -> None:
    for _ in range(3):
        registry.create_revision("tiny", SNAP_A)
    with pytest.raises(ValueError, match="serves no revision"):
        registry.rollback("tiny")
    registry.set_traffic("tiny", "tiny-00003")
    assert registry.rollback("tiny") == "tiny-00002"
    assert registry.rollback("tiny") == "tiny-00001"
    with pytest.raises(ValueError, match="no revision before 'tiny-00001'"):
        registry.rollback("tiny")
    assert registry.rollback("tiny", "tiny-00003") == "tiny-00003"
    fn = registry.get_function("tiny")
    assert fn is not None and fn.serving_revision == "tiny-00003"
    with pytest.raises(ValueError, match="has no revision"):
        registry.rollback("tiny", "tiny-00009")
    with pytest.raises(ValueError, match="does not exist"):
        registry.rollback("ghost")


def test_delete_removes_everything_of_the_function(registry: Registry, client: redis.Redis, prefix: str) -> None:
    registry.create_revision("keep", SNAP_A)
    for _ in range(2):
        registry.create_revision("tiny", SNAP_A)
    registry.create_revision("tiny-2", SNAP_A)  # a name that shares "tiny" as a prefix survives
    registry.set_traffic("tiny", "tiny-00002")
    assert any(":fn:tiny:" in k for k in _keys(client, prefix))

    assert registry.delete_function("tiny") is True
    assert registry.delete_function("tiny") is False
    left = _keys(client, prefix)
    assert not [k for k in left if k.startswith(f"{prefix}fn:tiny:")]
    assert registry.get_function("tiny") is None
    assert registry.get_revision("tiny-00001") is None
    assert [f.name for f in registry.list_functions()] == ["keep", "tiny-2"]
    # the counter went too: a new function of the same name starts again at 1
    assert registry.create_revision("tiny", SNAP_B).revision_id == "tiny-00001"


def test_concurrent_create_revision_gives_unique_consecutive_numbers(registry: Registry) -> None:
    threads, per_thread = 8, 10
    made: list[str] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(per_thread):
                rev = registry.create_revision("busy", SNAP_A)
                with lock:
                    made.append(rev.revision_id)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not errors
    expected = [f"busy-{n:05d}" for n in range(1, threads * per_thread + 1)]
    assert sorted(made) == expected
    fn = registry.get_function("busy")
    assert fn is not None and list(fn.revisions) == expected  # listed in number order
    assert fn.latest_revision == expected[-1]


# -- API keys ---------------------------------------------------------------------------------------


def test_keys(registry: Registry, client: redis.Redis, prefix: str) -> None:
    assert registry.has_keys() is False
    assert registry.verify_key("kold_nothing") is False
    key = registry.create_key("laptop")
    other = registry.create_key("ci")
    assert key.secret.startswith("kold_") and len(key.secret) > 40
    assert key.secret not in repr(key)
    assert registry.has_keys() is True
    assert registry.verify_key(key.secret) is True
    assert registry.verify_key(other.secret) is True
    assert registry.verify_key(key.secret + "x") is False
    assert registry.verify_key(key.secret[:-1]) is False
    assert registry.verify_key("") is False

    # what Redis holds: no secret anywhere, in keys or values
    for k in _keys(client, prefix):
        assert key.secret not in k
        kind = client.type(k).decode()
        values = client.hvals(k) if kind == "hash" else [client.get(k)] if kind == "string" else client.smembers(k)
        assert all(key.secret.encode() not in v for v in values)

    listed = registry.list_keys()
    assert [(k.key_id, k.label) for k in listed] == [(key.key_id, "laptop"), (other.key_id, "ci")]
    assert all(isinstance(k, KeyInfo) for k in listed)
    assert set(KeyInfo.__dataclass_fields__) == {"key_id", "label", "created_at", "scope"}
    assert {k.scope for k in listed} == {"admin"}  # the default: as every key was before scopes

    assert registry.revoke_key(key.key_id) is True
    assert registry.verify_key(key.secret) is False
    assert registry.verify_key(other.secret) is True
    assert registry.revoke_key(key.key_id) is False
    assert registry.revoke_key("../../etc") is False
    assert [k.key_id for k in registry.list_keys()] == [other.key_id]
    with pytest.raises(ConflictError, match="turns authentication off"):  # never silently
        registry.revoke_key(other.key_id)
    assert registry.revoke_key(other.key_id, disable_auth=True) is True
    assert registry.has_keys() is False
    assert _keys(client, prefix) == []  # nothing left behind by revocation


def test_key_scopes(registry: Registry) -> None:
    with pytest.raises(ConflictError, match="admin key first"):
        registry.create_key("app", "invoke")  # keys nobody could manage
    admin = registry.create_key("ops", "admin")
    app = registry.create_key("app", "invoke")
    assert registry.key_scope(admin.secret) == "admin" and registry.key_scope(app.secret) == "invoke"
    assert registry.key_scope(app.secret + "x") is None
    with pytest.raises(ValueError, match="scope"):
        registry.create_key("x", "root")
    with pytest.raises(ConflictError, match="last admin key"):
        registry.revoke_key(admin.key_id)
    assert registry.revoke_key(app.key_id) and registry.revoke_key(admin.key_id, disable_auth=True)


def test_key_label_validation(registry: Registry) -> None:
    with pytest.raises(ValueError, match="label"):
        registry.create_key("x" * 201)
    with pytest.raises(ValueError, match="label"):
        registry.create_key("bad\nlabel")


# -- the pre-warm policy in the scaling spec ------------------------------------------------------


def test_scaling_spec_names_a_prewarm_policy_checked_at_deploy(registry: Registry) -> None:
    assert ScalingSpec().prewarm == DEFAULT_POLICY
    spec = ScalingSpec(prewarm="fixed-keepalive:minutes=5")
    rev = registry.create_revision("tiny", SNAP_A, scaling=spec)
    assert registry.get_revision(rev.revision_id) == rev and rev.scaling.prewarm == "fixed-keepalive:minutes=5"
    with pytest.raises(InvalidSpecError, match="unknown prewarm policy 'nope'"):
        ScalingSpec(prewarm="nope")
    with pytest.raises(InvalidSpecError, match="has no parameter 'hours'"):
        ScalingSpec(prewarm="fixed-keepalive:hours=5")
    with pytest.raises(InvalidSpecError, match="must be a string"):
        ScalingSpec(prewarm=5)  # type: ignore[arg-type]


def test_revisions_written_before_prewarm_existed_still_load(
    registry: Registry, client: redis.Redis, prefix: str
) -> None:
    """A revision stored without the field loads with the default policy, and one whose policy is no
    longer known loads too (the function keeps serving) rather than failing every request."""
    rev = registry.create_revision("old", SNAP_A, scaling=ScalingSpec(min_instances=1))
    key = f"{prefix}fn:old:rev:{rev.revision_id}"
    data = json.loads(client.get(key))  # type: ignore[arg-type]
    del data["scaling"]["prewarm"]
    client.set(key, json.dumps(data))
    loaded = registry.get_revision(rev.revision_id)
    assert loaded is not None and loaded.scaling == ScalingSpec(min_instances=1)
    data["scaling"]["prewarm"] = "retired-policy"
    client.set(key, json.dumps(data))
    loaded = registry.get_revision(rev.revision_id)
    assert loaded is not None and loaded.scaling.prewarm == DEFAULT_POLICY and loaded.scaling.min_instances == 1


def test_works_with_a_decoding_client(prefix: str, redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    registry = Registry(client, prefix=prefix)  # the `prefix` fixture cleans up
    rev = registry.create_revision("tiny", SNAP_A)
    registry.set_traffic("tiny", rev.revision_id)
    assert registry.get_revision(rev.revision_id) == rev
    fn = registry.get_function("tiny")
    assert fn is not None and fn.serving_revision == rev.revision_id
    key = registry.create_key("k")
    assert registry.verify_key(key.secret) and registry.revoke_key(key.key_id, disable_auth=True)
    client.close()
