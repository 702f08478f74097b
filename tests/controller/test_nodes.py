"""NodeWants against the real redis-server: wants in force, expiry and pruning, reports that expire."""

from __future__ import annotations

import json
import time

import pytest
import redis

from kold.controller.nodes import NodeWants, Want, validate_node_name

pytestmark = pytest.mark.redis

URI = "s3://models/kold/snapshots/" + "a" * 32


def test_a_want_is_read_back_until_it_expires(redis_client: redis.Redis, redis_prefix: str) -> None:
    wants = NodeWants(redis_client, redis_prefix)
    wants.want("tiny", URI, until=2000.0, reason="forecast: 3 calls expected", nbytes=4096)
    assert wants.wanted(now=1000.0) == [Want("tiny", URI, 2000.0, "forecast: 3 calls expected", 4096)]
    # the record is the documented JSON under the documented key
    stored = json.loads(redis_client.hget(f"{redis_prefix}node:wants", "tiny"))  # type: ignore[arg-type]
    assert stored == {"uri": URI, "until": 2000.0, "reason": "forecast: 3 calls expected", "bytes": 4096}
    assert wants.wanted(now=2000.0) == []
    assert redis_client.hlen(f"{redis_prefix}node:wants") == 0  # expired: pruned


def test_a_later_want_replaces_the_earlier_and_unwant_removes_it(redis_client: redis.Redis, redis_prefix: str) -> None:
    wants = NodeWants(redis_client, redis_prefix)
    wants.want("tiny", URI, until=2000.0)
    wants.want("tiny", URI.replace("a", "b"), until=3000.0)
    wants.want("big", URI, until=2500.0)
    assert [(w.function, w.uri[-1], w.until) for w in wants.wanted(now=1000.0)] == [
        ("big", "a", 2500.0),
        ("tiny", "b", 3000.0),
    ]
    wants.unwant("tiny")
    wants.unwant("never-wanted")  # nothing to remove: not an error
    assert [w.function for w in wants.wanted(now=1000.0)] == ["big"]


def test_pruning_never_removes_a_want_rewritten_since_it_was_read(redis_client: redis.Redis, redis_prefix: str) -> None:
    wants = NodeWants(redis_client, redis_prefix)
    wants.want("tiny", URI, until=1500.0)
    key = f"{redis_prefix}node:wants"
    stale = redis_client.hget(key, "tiny")
    wants.want("tiny", URI, until=9000.0)  # the controller renews it after the agent read the old value
    assert wants._prune(keys=[key], args=["tiny", stale]) == 0
    assert [w.until for w in wants.wanted(now=2000.0)] == [9000.0]


def test_unreadable_wants_are_skipped_and_removed(redis_client: redis.Redis, redis_prefix: str) -> None:
    wants = NodeWants(redis_client, redis_prefix)
    key = f"{redis_prefix}node:wants"
    redis_client.hset(key, "garbled", "{not json")
    redis_client.hset(key, "no-uri", json.dumps({"until": 5000.0}))
    redis_client.hset(key, "Bad_Name", json.dumps({"uri": URI, "until": 5000.0}))
    redis_client.hset(key, "inf", '{"uri": "x", "until": Infinity}')
    wants.want("good", URI, until=5000.0)
    assert [w.function for w in wants.wanted(now=1000.0)] == ["good"]
    assert redis_client.hkeys(key) == [b"good"]


def test_a_client_that_decodes_responses_reads_the_same(redis_url: str, redis_prefix: str) -> None:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        wants = NodeWants(client, redis_prefix)
        wants.want("tiny", URI, until=2000.0, nbytes=1)
        assert wants.wanted(now=1.0) == [Want("tiny", URI, 2000.0, "", 1)]
        wants.report("node-a", {"held": []}, ttl_s=30)
        assert [n["node"] for n in wants.nodes()] == ["node-a"]
    finally:
        client.close()


@pytest.mark.parametrize(
    ("kwargs", "expect"),
    [
        ({"function": "Tiny"}, "lowercase"),
        ({"uri": ""}, "URI"),
        ({"until": float("nan")}, "until"),
        ({"until": True}, "until"),
        ({"nbytes": -1}, "nbytes"),
    ],
)
def test_bad_wants_are_refused_before_anything_is_written(
    redis_client: redis.Redis, redis_prefix: str, kwargs: dict[str, object], expect: str
) -> None:
    wants = NodeWants(redis_client, redis_prefix)
    args: dict[str, object] = {"function": "tiny", "uri": URI, "until": 2000.0, "nbytes": 0}
    args.update(kwargs)
    with pytest.raises(ValueError, match=expect):
        wants.want(**args)  # type: ignore[arg-type]
    assert redis_client.hlen(f"{redis_prefix}node:wants") == 0


def test_reports_list_live_nodes_and_expire(redis_client: redis.Redis, redis_prefix: str) -> None:
    wants = NodeWants(redis_client, redis_prefix)
    wants.report("node-b", {"held": [{"snapshot_id": "x", "bytes": 3}]}, ttl_s=30)
    wants.report("node-a", {"held": []}, ttl_s=0.2)
    docs = wants.nodes()
    assert [d["node"] for d in docs] == ["node-a", "node-b"]
    assert docs[1]["held"] == [{"snapshot_id": "x", "bytes": 3}] and docs[1]["reported_at"] <= time.time()
    assert 0 < redis_client.pttl(f"{redis_prefix}node:report:node-a") <= 200
    time.sleep(0.3)
    assert [d["node"] for d in wants.nodes()] == ["node-b"]
    assert redis_client.zrange(f"{redis_prefix}node:reports", 0, -1) == [b"node-b"]  # the index is pruned too


def test_a_report_key_expired_before_its_index_entry_is_skipped(redis_client: redis.Redis, redis_prefix: str) -> None:
    wants = NodeWants(redis_client, redis_prefix)
    wants.report("node-a", {}, ttl_s=30)
    redis_client.delete(f"{redis_prefix}node:report:node-a")
    assert wants.nodes() == []


@pytest.mark.parametrize("name", ["", "node:1", "-edge", "a" * 254, "node a"])
def test_node_names_that_could_split_a_key_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="node name"):
        validate_node_name(name)


def test_kubernetes_and_host_names_are_node_names() -> None:
    for name in ("gke-pool-1-abc123", "ip-10-0-0-1.ec2.internal", "worker_7", "A"):
        assert validate_node_name(name) == name
