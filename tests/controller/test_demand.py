"""DemandStore against a real redis-server: the session's (`redis_url`), and private ones for restarts."""

from __future__ import annotations

import json
import logging
import os
import random
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from kold.controller.demand import COLDSTARTS_MAXLEN, INVOCATIONS_MAXLEN, PAGE, DemandStore, HeldHistories
from kold.controller.history import IDLE_BINS, RING_MINUTES, DemandHistory
from kold.controller.records import CANCELLED, FAILED, OK, TIMED_OUT, ColdStart, Invocation

from .redis_restart import is_down, supervised_redis, wait_until

pytestmark = pytest.mark.redis


@pytest.fixture(params=[False, True], ids=["bytes-client", "decoding-client"])
def store(request: pytest.FixtureRequest, redis_url: str, redis_prefix: str) -> Iterator[DemandStore]:
    """A store under the test's own prefix, on a client with and without decode_responses."""
    client = redis.Redis.from_url(redis_url, socket_connect_timeout=1, decode_responses=request.param)
    yield DemandStore(client, redis_prefix)
    client.close()


def _inv(t: float, function: str = "fn", **kw: object) -> Invocation:
    return Invocation(function, t, cold=False, wait_s=0.0, **kw)  # type: ignore[arg-type]


def _str(value: str | bytes) -> str:
    return value if isinstance(value, str) else value.decode()


def _keys(client: redis.Redis, prefix: str) -> list[str]:
    return sorted(k.decode() for k in client.scan_iter(match=prefix + "*", count=1000))


# -- records ----------------------------------------------------------------------------------------


def test_every_field_round_trips_and_unknown_tokens_stay_none(store: DemandStore) -> None:
    invs = [
        Invocation("fn", 1_700_000_000.123456789, True, 2.5, OK, 12, 345, 3),
        Invocation("fn", 1_700_000_001.5, False, 0.0, FAILED, None, None, 1),
        Invocation("fn", 1_700_000_002.0, False, 31.0, TIMED_OUT, 7, None, 9),
        Invocation("fn", 1_700_000_003.0, True, 0.25, CANCELLED, None, 0, 2),
    ]
    colds = [
        ColdStart("fn", "fn-00001", 1_700_000_000.5, 1.75, 0.9, 123_456_789, {"ram": 0.1, "disk": 0.8}, "fork"),
        ColdStart("fn", "fn-00002", 1_700_000_009.0, 4.0),
    ]
    store.record_invocations(invs[:1])
    store.record_invocations(invs[1:])
    store.record_cold_starts(colds)

    assert store.invocations("fn") == invs
    assert store.cold_starts("fn") == colds
    raw = store.redis.xrange(f"{store.prefix}fn:fn:invocations")
    fields = [{_str(k) for k in f} for _id, f in raw]
    assert "tokens_in" not in fields[1] and "tokens_out" not in fields[1]  # absent, not "None"
    assert "tokens_in" in fields[2] and "tokens_out" not in fields[2]


def test_reads_filter_by_arrival_and_limit(store: DemandStore) -> None:
    store.record_invocations(_inv(float(t)) for t in range(10))
    assert [r.arrival for r in store.invocations("fn", since=6.0)] == [6.0, 7.0, 8.0, 9.0]
    assert [r.arrival for r in store.invocations("fn", since=2.0, limit=3)] == [2.0, 3.0, 4.0]
    assert store.invocations("fn", limit=0) == []
    assert store.invocations("other") == [] and store.cold_starts("other") == []
    store.record_cold_starts(ColdStart("fn", "fn-00001", float(t), 1.0) for t in range(5))
    assert [c.at for c in store.cold_starts("fn", limit=2)] == [0.0, 1.0]


def test_one_batch_is_one_round_trip_that_refreshes_each_key_once(store: DemandStore) -> None:
    sent: list[list[tuple[object, ...]]] = []
    real = store.redis.pipeline

    def spy(transaction: bool = True, shard_hint: object = None) -> redis.client.Pipeline:
        pipe = real(transaction=transaction)
        assert transaction is False
        execute = pipe.execute

        def run(raise_on_error: bool = True) -> list[object]:
            sent.append([c[0] for c in pipe.command_stack])
            return execute(raise_on_error)

        pipe.execute = run  # type: ignore[method-assign]
        return pipe

    store.redis.pipeline = spy  # type: ignore[method-assign]
    store.record_invocations([_inv(1.0, "a"), _inv(2.0, "b"), _inv(3.0, "a")])
    assert len(sent) == 1
    names = [cmd[0] for cmd in sent[0]]
    assert names.count("XADD") == 3 and names.count("PEXPIRE") == 2
    assert store.invocations("a") == [_inv(1.0, "a"), _inv(3.0, "a")]
    store.record_invocations([])
    assert len(sent) == 1  # nothing to write: no round trip


# -- folding ----------------------------------------------------------------------------------------


def test_the_cursor_never_counts_a_record_twice(store: DemandStore) -> None:
    store.record_invocations(_inv(t) for t in (0.0, 30.0, 200.0))
    store.record_cold_starts([ColdStart("fn", "fn-00001", 0.0, 2.0)])
    assert store.fold("fn").arrivals == 3
    again = store.fold("fn")
    assert (again.arrivals, again.cold_starts, again.cold_start_s) == (3, 1, 2.0)
    store.record_invocations(_inv(t) for t in (400.0, 401.0))
    folded = store.fold("fn")
    assert folded.arrivals == 5 and folded.last_arrival == 401.0 and folded.cold_starts == 1
    stored = store.history("fn")
    assert stored is not None and stored.to_dict() == folded.to_dict()
    doc = json.loads(store.redis.get(f"{store.prefix}fn:fn:demand") or "")
    ids = [_str(i) for i, _ in store.redis.xrange(f"{store.prefix}fn:fn:invocations")]
    assert doc["cursor"]["invocations"] == ids[-1]


def test_a_backlog_longer_than_a_page_folds_completely(store: DemandStore) -> None:
    n = 2 * PAGE + 500
    store.record_invocations(_inv(float(t)) for t in range(n))
    store.record_cold_starts(ColdStart("fn", "fn-00001", float(t), 1.0) for t in range(PAGE + 1))
    history = store.fold("fn")
    assert history.arrivals == n and history.last_arrival == n - 1
    assert history.cold_starts == PAGE + 1
    assert len(store.invocations("fn")) == n
    assert store.fold("fn").arrivals == n


def test_folding_gives_the_same_history_as_observing_the_records(store: DemandStore) -> None:
    """Gaps from seconds to beyond the histogram's 4 hours (within the 3-day ring), concurrency peaks, and
    a few out-of-order arrivals (several gateways), folded in uneven slices."""
    rng = random.Random(13)
    t, invs = 1_700_000_000.0, []
    for _ in range(1500):
        r = rng.random()
        t += rng.uniform(0, 5) if r < 0.6 else rng.uniform(60, 200) if r < 0.995 else rng.uniform(14400, 20000)
        late = rng.random() < 0.05
        invs.append(_inv(t - 120 if late else t, concurrency=rng.randint(1, 8)))
    assert t - invs[0].arrival < RING_MINUTES * 60  # so every count is still in the ring
    colds = [ColdStart("fn", "fn-00001", t, rng.uniform(0.5, 6.0)) for _ in range(20)]
    expected = DemandHistory()
    for rec in invs:
        expected.observe(rec.arrival, rec.concurrency)
    for c in colds:
        expected.observe_cold_start(c.total_s)

    for lo, hi in ((0, 1), (1, 700), (700, 701), (701, 1500)):
        store.record_invocations(invs[lo:hi])
        store.fold("fn")
    store.record_cold_starts(colds)
    history = store.fold("fn")

    assert history.to_dict() == expected.to_dict()
    assert sum(history.idle_bins) > 0 and history.idle_over > 0 and len(history.idle_bins) == IDLE_BINS
    assert max(history.peaks.values()) == 8 and sum(history.counts.values()) == len(invs)
    stored = store.history("fn")
    assert stored is not None and stored.to_dict() == expected.to_dict()


def _calls(client: redis.Redis, command: str) -> int:
    """How many times the server ran `command` (the test server is this session's alone)."""
    stats = client.info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


def _stored_arrivals(store: DemandStore) -> int | None:
    stored = store.history("fn")
    return None if stored is None else stored.arrivals


def test_a_held_history_is_read_once_and_written_only_after_new_records_at_most_every_few_seconds(
    store: DemandStore,
) -> None:
    store.record_invocations(_inv(t) for t in (0.0, 30.0))
    store.fold("fn")  # what an earlier holder stored
    held = HeldHistories(store, save_every_s=5.0)
    gets, sets = _calls(store.redis, "get"), _calls(store.redis, "set")
    for now in range(10):
        assert held.fold("fn", 1000.0 + now).arrivals == 2
    assert (_calls(store.redis, "get") - gets, _calls(store.redis, "set") - sets) == (1, 0), "nothing new: no write"
    store.record_invocations([_inv(100.0)])
    assert held.fold("fn", 1010.0).arrivals == 3 and _stored_arrivals(store) == 3, "new records: written"
    store.record_invocations([_inv(101.0)])
    assert held.fold("fn", 1012.0).arrivals == 4 and _stored_arrivals(store) == 3, "not within save_every_s"
    assert held.fold("fn", 1015.0).arrivals == 4 and _stored_arrivals(store) == 4, "written once it passed"
    assert _calls(store.redis, "get") - gets == 1 + 3, "the three reads of the stored history are the test's"


def test_a_holder_that_goes_without_writing_loses_no_record_and_counts_none_twice(store: DemandStore) -> None:
    """Its unwritten window is folded again from the stored cursors by the next holder."""
    times = [0.0, 30.0, 100.0, 101.0, 250.0]
    a = HeldHistories(store, save_every_s=60.0)
    store.record_invocations(_inv(t) for t in times[:2])
    a.fold("fn", 1000.0)
    for t in times[2:]:
        store.record_invocations([_inv(t)])
        a.fold("fn", 1000.0 + t / 10)
    assert _stored_arrivals(store) == 2, "a wrote once, then within its window"
    b = HeldHistories(store)
    expected = DemandHistory()
    for t in times:
        expected.observe(t)
    assert b.fold("fn", 1100.0).to_dict() == expected.to_dict() == a.fold("fn", 1100.0).to_dict()


def test_flush_writes_what_is_unwritten_and_clear_rereads_what_redis_stored(store: DemandStore) -> None:
    held = HeldHistories(store, save_every_s=60.0)
    store.record_invocations([_inv(0.0)])
    held.fold("fn", 1000.0)
    store.record_invocations([_inv(10.0)])
    held.fold("fn", 1001.0)
    assert _stored_arrivals(store) == 1
    held.flush()
    assert _stored_arrivals(store) == 2
    key = f"{store.prefix}fn:fn:demand"
    doc = json.loads(store.redis.get(key) or "")
    doc["history"]["cold_starts"] = 42  # another holder's fold, as far as this one can tell
    store.redis.set(key, json.dumps(doc))
    assert held.fold("fn", 1003.0).cold_starts == 0, "held: what it folded is what it knows"
    held.clear()
    assert held.fold("fn", 1004.0).cold_starts == 42, "cleared: read again from Redis"


def test_a_held_history_keeps_its_stored_copy_alive(redis_client: redis.Redis, redis_prefix: str) -> None:
    store = DemandStore(redis_client, redis_prefix, ttl_s=100.0)
    held = HeldHistories(store)
    store.record_invocations([_inv(0.0)])
    held.fold("fn", 1000.0)
    key = f"{redis_prefix}fn:fn:demand"
    redis_client.pexpire(key, 1000)
    held.fold("fn", 1010.0)
    assert redis_client.pttl(key) <= 1000, "not refreshed at every fold"
    held.fold("fn", 1000.0 + held.touch_every_s)
    assert redis_client.pttl(key) > 90_000, "refreshed every touch_every_s while nothing new comes"


def test_held_histories_refuse_a_bad_save_interval(store: DemandStore) -> None:
    with pytest.raises(ValueError, match="save_every_s"):
        HeldHistories(store, save_every_s=-1.0)


def test_streams_are_capped_keys_expire_and_a_trimmed_cursor_continues(
    redis_client: redis.Redis, redis_prefix: str
) -> None:
    store = DemandStore(redis_client, redis_prefix, ttl_s=600)
    store.record_invocations(_inv(float(t)) for t in range(10))
    assert store.fold("fn").arrivals == 10
    for start in range(0, INVOCATIONS_MAXLEN + 2000, 4000):  # pushes the folded records out
        store.record_invocations(_inv(float(t)) for t in range(start + 10, start + 4010))
    store.record_cold_starts(ColdStart("fn", "fn-00001", float(t), 1.0) for t in range(COLDSTARTS_MAXLEN + 500))

    inv_len = redis_client.xlen(f"{redis_prefix}fn:fn:invocations")
    cold_len = redis_client.xlen(f"{redis_prefix}fn:fn:coldstarts")
    assert INVOCATIONS_MAXLEN <= inv_len < INVOCATIONS_MAXLEN + 200  # MAXLEN ~ trims whole nodes
    assert COLDSTARTS_MAXLEN <= cold_len < COLDSTARTS_MAXLEN + 200
    history = store.fold("fn")
    assert history.arrivals == 10 + inv_len  # what was trimmed unread is lost, nothing counted twice
    assert history.cold_starts == cold_len
    for what in ("invocations", "coldstarts", "demand"):
        assert 0 < redis_client.ttl(f"{redis_prefix}fn:fn:{what}") <= 600


@pytest.mark.parametrize(
    "garbled",
    [
        "{not json",
        "[]",
        '{"history": {}}',
        '{"history": {"counts": {"x": 1}}, "cursor": {}}',
        '{"history": {}, "cursor": {"invocations": "$", "coldstarts": null}}',
    ],
    ids=["not JSON", "not an object", "no cursor", "bad counts", "bad cursor"],
)
def test_a_garbled_history_starts_fresh(store: DemandStore, garbled: str, caplog: pytest.LogCaptureFixture) -> None:
    store.record_invocations(_inv(t) for t in (0.0, 100.0))
    store.redis.set(f"{store.prefix}fn:fn:demand", garbled)
    assert store.history("fn") is None
    with caplog.at_level(logging.WARNING, logger="kold.controller.demand"):
        history = store.fold("fn")
    assert history.arrivals == 2  # fresh: everything still in the stream, once
    assert any("garbled" in r.getMessage() and " fn " in r.getMessage() for r in caplog.records)
    stored = store.history("fn")
    assert stored is not None and stored.arrivals == 2  # replaced by a sound one
    assert store.fold("fn").arrivals == 2


def test_a_garbled_history_is_replaced_even_with_nothing_new(store: DemandStore) -> None:
    store.redis.set(f"{store.prefix}fn:fn:demand", "{not json")
    assert store.fold("fn").arrivals == 0
    assert store.history("fn") is not None


def test_a_foreign_stream_entry_is_skipped_and_passed(store: DemandStore, caplog: pytest.LogCaptureFixture) -> None:
    store.record_invocations([_inv(1.0)])
    store.redis.xadd(f"{store.prefix}fn:fn:invocations", {"arrival": "soon"})
    store.redis.xadd(f"{store.prefix}fn:fn:coldstarts", {"revision": "fn-00001"})
    store.record_invocations([_inv(2.0)])
    with caplog.at_level(logging.WARNING, logger="kold.controller.demand"):
        assert store.fold("fn").arrivals == 2
    assert sum("malformed" in r.getMessage() for r in caplog.records) == 2
    assert store.fold("fn").arrivals == 2
    assert [r.arrival for r in store.invocations("fn")] == [1.0, 2.0]


def test_a_function_with_no_records_folds_to_an_empty_history(store: DemandStore) -> None:
    history = store.fold("quiet")
    assert history.arrivals == 0 and history.last_arrival is None
    assert store.history("quiet") is None  # nothing worth storing yet


# -- functions and forget ---------------------------------------------------------------------------


def test_functions_are_the_registrys_set(store: DemandStore) -> None:
    assert store.functions() == []
    store.record_invocations([_inv(1.0, "unregistered")])  # records alone do not make a function
    names = [f"fn-{i:04d}" for i in range(1500)]
    store.redis.sadd(f"{store.prefix}functions", *names)
    assert store.functions() == sorted(names)


def test_forget_drops_the_three_keys_of_that_function_only(store: DemandStore, redis_client: redis.Redis) -> None:
    for name in ("tiny", "tiny-2"):
        store.record_invocations([_inv(1.0, name)])
        store.record_cold_starts([ColdStart(name, f"{name}-00001", 1.0, 1.0)])
        store.fold(name)
    assert len(_keys(redis_client, store.prefix)) == 6
    store.forget("tiny")
    assert _keys(redis_client, store.prefix) == [
        f"{store.prefix}fn:tiny-2:{w}" for w in ("coldstarts", "demand", "invocations")
    ]
    assert store.history("tiny") is None and store.fold("tiny").arrivals == 0


# -- bad input --------------------------------------------------------------------------------------

BAD_NAMES = ["Bad_Name", "", "a:b", "../x", "x*"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_a_bad_function_name_is_a_value_error_naming_it(
    store: DemandStore, redis_client: redis.Redis, name: str
) -> None:
    calls: list[Callable[[], object]] = [
        lambda: store.record_invocations([_inv(1.0), _inv(1.0, name)]),
        lambda: store.record_cold_starts([ColdStart(name, "x-00001", 1.0, 1.0)]),
        lambda: store.invocations(name),
        lambda: store.cold_starts(name),
        lambda: store.fold(name),
        lambda: store.history(name),
        lambda: store.forget(name),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="function name") as err:
            call()
        assert repr(name) in str(err.value) or not name
    assert _keys(redis_client, store.prefix) == []  # the good record of the batch was not written either


@pytest.mark.parametrize(
    ("record", "problem"),
    [
        (Invocation("fn", 1.0, False, 0.0, outcome="fine"), "outcome 'fine'"),
        (Invocation("fn", float("nan"), False, 0.0), "arrival"),
        (Invocation("fn", 1.0, False, float("inf")), "wait_s"),
        (Invocation("fn", 1.0, False, 0.0, tokens_in=-1), "tokens_in"),
        (Invocation("fn", 1.0, False, 0.0, tokens_out=1.5), "tokens_out"),  # type: ignore[arg-type]
        (ColdStart("fn", "", 1.0, 1.0), "revision"),
        (ColdStart("fn", "fn-00001", 1.0, float("nan")), "total_s"),
        (ColdStart("fn", "fn-00001", 1.0, 1.0, snapshot_bytes=-5), "snapshot_bytes"),
        (ColdStart("fn", "fn-00001", 1.0, 1.0, tiers={"ram": float("inf")}), "tier 'ram'"),
    ],
)
def test_a_bad_record_is_a_value_error_naming_the_field(
    store: DemandStore, redis_client: redis.Redis, record: Invocation | ColdStart, problem: str
) -> None:
    with pytest.raises(ValueError, match=problem):
        if isinstance(record, Invocation):
            store.record_invocations([_inv(0.0), record])
        else:
            store.record_cold_starts([record])
    assert _keys(redis_client, store.prefix) == []


def test_bad_settings_are_value_errors(redis_client: redis.Redis) -> None:
    with pytest.raises(ValueError, match="prefix"):
        DemandStore(redis_client, "kold *")
    with pytest.raises(ValueError, match="ttl_s"):
        DemandStore(redis_client, ttl_s=0)
    with pytest.raises(ValueError, match="limit"):
        DemandStore(redis_client).invocations("fn", limit=-1)


# -- a Redis restart --------------------------------------------------------------------------------


@pytest.mark.parametrize("persist", [False, True], ids=["in-memory", "append-only-file"])
def test_a_redis_restart_loses_only_the_window_in_flight_and_folding_recovers(tmp_path: Path, persist: bool) -> None:
    """The server is killed and its supervisor (as under `kold up`) restarts it on the same port; the
    same client and store carry on. In memory, what Redis held is gone and folding starts fresh; with
    the append-only file (`kold up`'s default) every acknowledged record comes back, none counted twice.
    While it is down every call fails with a RedisError and nothing else."""
    with supervised_redis(tmp_path / "redis", persist=persist) as (server, gate, client):
        store = DemandStore(client)
        store.record_invocations(_inv(float(t)) for t in range(5))
        store.record_cold_starts([ColdStart("fn", "fn-00001", 1.0, 3.0)])
        assert store.fold("fn").arrivals == 5
        store.record_invocations(_inv(float(t)) for t in range(5, 8))  # written, not folded yet

        pid = server.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: is_down(client), "the server is down")
        with pytest.raises(redis.RedisError):
            store.record_invocations([_inv(9.0)])
        with pytest.raises(redis.RedisError):
            store.fold("fn")

        gate.open.set()
        wait_until(lambda: server.restarts == 1 and not is_down(client), "the server is back")
        history = store.fold("fn")
        if persist:
            assert (history.arrivals, history.cold_starts, history.last_arrival) == (8, 1, 7.0)
        else:
            assert (history.arrivals, history.cold_starts) == (0, 0)
        store.record_invocations([_inv(100.0), _inv(101.0)])
        assert store.fold("fn").arrivals == (10 if persist else 2)
