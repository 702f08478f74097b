"""Demand in Redis: the gateway's invocation and cold-start records, and each function's folded history.

The gateway appends records to two capped streams per function (one pipelined round trip per batch);
the controller that holds the lease folds what is new into the function's `DemandHistory` and stores
it back with the stream cursors it read up to. A cursor is a stream id, so a record is folded once
and a fold reads only what arrived since the last one, never the whole stream. Every key is capped
(MAXLEN ~) or bounded by construction, and expires `ttl_s` after it was last written, so a function
nobody calls or deletes stops costing memory. The layout is in controller/README.md ("Redis schema").

Works with clients created with or without `decode_responses`. Redis errors (RedisError) propagate:
the caller's loop decides how to wait for Redis to come back; nothing here retries. `HeldHistories`
is the leased controller's in-memory copy of the histories it folds, so a fold with nothing new
costs a stream read, not a read and parse of the stored history.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import redis

from kold.controller.history import DemandHistory
from kold.controller.records import OUTCOMES, ColdStart, Invocation
from kold.gateway.names import validate_function_name

log = logging.getLogger(__name__)

INVOCATIONS_MAXLEN = 10_000  # per function; approximate trimming keeps XADD O(1)
COLDSTARTS_MAXLEN = 1_000
PAGE = 1_000  # records per XRANGE: a fold of a long backlog is many small reads, never one huge one
DEFAULT_TTL_S = 7 * 86400.0

_PREFIX = re.compile(r"[A-Za-z0-9_.:-]{1,100}")  # the registry's rule: both share one key space
_STREAM_ID = re.compile(r"[0-9]{1,20}-[0-9]{1,20}")


class DemandStore:
    """Per-function demand records and folded histories in one Redis, under the registry's prefix.

    Keys (`{p}fn:{name}:` is the function's key space, shared with the registry):
    `invocations` and `coldstarts` STREAMs, and `demand`, the folded history with its cursors as JSON.
    """

    def __init__(self, redis_client: redis.Redis, prefix: str = "kold:", *, ttl_s: float = DEFAULT_TTL_S) -> None:
        if not isinstance(prefix, str) or not _PREFIX.fullmatch(prefix):
            raise ValueError(f"prefix {prefix!r} must be 1-100 characters of [A-Za-z0-9_.:-]")
        if not _finite(ttl_s) or ttl_s < 1:
            raise ValueError(f"ttl_s must be a number of seconds, at least 1, not {ttl_s!r}")
        self.redis = redis_client
        self.prefix = prefix
        self.ttl_s = float(ttl_s)
        self._ttl_ms = int(self.ttl_s * 1000)

    # -- keys --

    def _key(self, function: str, what: str) -> str:
        return f"{self.prefix}fn:{validate_function_name(function)}:{what}"

    @property
    def _functions_key(self) -> str:
        return f"{self.prefix}functions"

    # -- writing (the gateway's recorder) --

    def record_invocations(self, records: Iterable[Invocation]) -> None:
        """Append invocation records to their functions' streams: one pipelined round trip for the batch.

        The whole batch is checked first, so a bad record (ValueError naming it) writes nothing."""
        batch = list(records)
        for rec in batch:
            _check_invocation(rec)
        self._append(
            [(self._key(rec.function, "invocations"), _invocation_fields(rec)) for rec in batch], INVOCATIONS_MAXLEN
        )

    def record_cold_starts(self, reports: Iterable[ColdStart]) -> None:
        """Append cold-start reports to their functions' streams: one pipelined round trip for the batch."""
        batch = list(reports)
        for rep in batch:
            _check_cold_start(rep)
        self._append(
            [(self._key(rep.function, "coldstarts"), _cold_start_fields(rep)) for rep in batch], COLDSTARTS_MAXLEN
        )

    def _append(self, entries: list[tuple[str, dict[Any, Any]]], maxlen: int) -> None:
        if not entries:
            return
        pipe = self.redis.pipeline(transaction=False)
        touched: dict[str, None] = {}  # ordered set: one expiry refresh per key, not per record
        for key, fields in entries:
            pipe.xadd(key, fields, maxlen=maxlen, approximate=True)
            touched[key] = None
        for key in touched:
            pipe.pexpire(key, self._ttl_ms)
        pipe.execute()

    # -- reading raw records (tests, `kold describe`) --

    def invocations(self, function: str, since: float | None = None, limit: int | None = None) -> list[Invocation]:
        """The function's recorded invocations still in its stream, oldest first: with `since`, only
        those that arrived at or after it; with `limit`, the first `limit` of those."""
        key = self._key(function, "invocations")
        _check_limit(limit)
        out: list[Invocation] = []
        if limit == 0:
            return out
        for entry_id, fields in self._entries(key, None):
            rec = _parse_invocation(function, fields, "invocations", entry_id)
            if rec is not None and (since is None or rec.arrival >= since):
                out.append(rec)
                if len(out) == limit:
                    break
        return out

    def cold_starts(self, function: str, limit: int | None = None) -> list[ColdStart]:
        """The function's recorded cold starts still in its stream, oldest first (the first `limit`)."""
        key = self._key(function, "coldstarts")
        _check_limit(limit)
        out: list[ColdStart] = []
        if limit == 0:
            return out
        for entry_id, fields in self._entries(key, None):
            rep = _parse_cold_start(function, fields, "coldstarts", entry_id)
            if rep is not None:
                out.append(rep)
                if len(out) == limit:
                    break
        return out

    def _entries(self, key: str, after: str | None) -> Iterator[tuple[str, dict[str, str]]]:
        """The stream's entries after the id `after` (all of them for None), oldest first, read in pages
        of PAGE with an exclusive start, so a stream trimmed past `after` just continues from its head."""
        start = "-" if after is None else "(" + after
        while True:
            page = self.redis.xrange(key, min=start, max="+", count=PAGE)
            for raw_id, raw_fields in page or ():
                entry_id = _text(raw_id)
                yield entry_id, {_text(k): _text(v) for k, v in (raw_fields or {}).items()}
                start = "(" + entry_id
            if not page or len(page) < PAGE:
                return

    # -- folding (only the controller holding the lease) --

    def fold(self, function: str) -> DemandHistory:
        """Read the records that arrived since the stored cursors, observe them into the stored history
        and store it back with the new cursors; returns the history.

        A missing demand key starts a fresh history (a new function, or a Redis that lost its data); a
        garbled one does too, with a warning. Not safe to run concurrently for one function: the lease
        makes the folding controller the only writer of `demand`. The controller keeps its histories
        in memory between folds instead (`HeldHistories`); this reads and writes Redis every time."""
        folded = self._load(function)
        self._fold_new(function, folded)
        if folded.unsaved:  # new records, or a garbled history replaced
            self._save(function, folded)
        else:  # nothing to write: keep the stored history alive while it is being folded
            self.redis.pexpire(self._key(function, "demand"), self._ttl_ms)
        return folded.history

    def _load(self, function: str) -> _Folded:
        """The stored history and cursors (one GET); a fresh one for a missing or garbled key."""
        raw = self.redis.get(self._key(function, "demand"))
        loaded = None if raw is None else _parse_demand(function, _text(raw))
        if loaded is None:
            return _Folded(DemandHistory(), None, None, unsaved=raw is not None)  # a garbled one is replaced
        return _Folded(*loaded)

    def _fold_new(self, function: str, folded: _Folded) -> int:
        """Observe the records after `folded`'s cursors into its history and move them; how many."""
        new = 0
        history = folded.history
        for entry_id, fields in self._entries(self._key(function, "invocations"), folded.invocations):
            folded.invocations = entry_id
            rec = _parse_invocation(function, fields, "invocations", entry_id)
            if rec is not None:
                history.observe(rec.arrival, rec.concurrency)
            new += 1
        for entry_id, fields in self._entries(self._key(function, "coldstarts"), folded.coldstarts):
            folded.coldstarts = entry_id
            rep = _parse_cold_start(function, fields, "coldstarts", entry_id)
            if rep is not None:
                history.observe_cold_start(rep.total_s)
            new += 1
        folded.unsaved = folded.unsaved or new > 0
        return new

    def _save(self, function: str, folded: _Folded) -> None:
        cursor = {"invocations": folded.invocations, "coldstarts": folded.coldstarts}
        doc = {"history": folded.history.to_dict(), "cursor": cursor}
        self.redis.set(self._key(function, "demand"), json.dumps(doc, separators=(",", ":")), px=self._ttl_ms)
        folded.unsaved = False

    def history(self, function: str) -> DemandHistory | None:
        """The stored history as of the last fold (read-only); None when there is none or it is garbled."""
        key = self._key(function, "demand")
        raw = self.redis.get(key)
        if raw is None:
            return None
        loaded = _parse_demand(function, _text(raw))
        return None if loaded is None else loaded[0]

    # -- functions --

    def functions(self) -> list[str]:
        """The registry's function names (SSCAN of `{p}functions`, never a scan of the keyspace), sorted."""
        return sorted({_text(name) for name in self.redis.sscan_iter(self._functions_key, count=1000)})

    def forget(self, function: str) -> None:
        """Drop the function's demand keys (its streams and its folded history)."""
        self.redis.delete(*(self._key(function, what) for what in ("invocations", "coldstarts", "demand")))


@dataclass(slots=True)
class _Folded:
    """A function's history with the stream cursors it has been folded up to."""

    history: DemandHistory
    invocations: str | None  # the last invocations entry id folded (None: none yet)
    coldstarts: str | None
    unsaved: bool = False  # folded records (or a garbled history replaced) not written back yet
    written_at: float = -math.inf  # when it was last written or its expiry refreshed (the holder's clock)


class HeldHistories:
    """The leased controller's histories, kept in memory between folds.

    `DemandStore.fold` GETs and parses a function's stored history (about 100 KB of JSON after three
    days) every time; a controller folding every function every second would spend its time there.
    This reads the stored history once (when first folded after `clear`), then reads only the streams
    after its cursors, and writes it back when records were folded, at most every `save_every_s` per
    function. A holder that loses the lease loses at most that window of writes, and nothing is lost
    with it: the stored cursors are written with the history, so the next holder folds those records
    again from the streams.

    Call `clear` whenever the lease is (re)acquired or lost (Redis is the truth then: another holder
    may have folded since), `flush` before giving the lease up. Not thread-safe: one folder at a time,
    as the lease makes it."""

    def __init__(self, store: DemandStore, *, save_every_s: float = 5.0) -> None:
        if not _finite(save_every_s) or save_every_s < 0:
            raise ValueError(f"save_every_s must be a number of seconds >= 0, not {save_every_s!r}")
        self.store = store
        self.save_every_s = float(save_every_s)
        # the stored history's expiry is refreshed this often while nothing new is folded
        self.touch_every_s = min(600.0, store.ttl_s / 4)
        self._held: dict[str, _Folded] = {}

    def fold(self, function: str, now: float) -> DemandHistory:
        """The function's history with every record folded (the stored one read on first use); the
        held object itself, which the caller must not change."""
        folded = self._held.get(function)
        if folded is None:
            folded = self._held[function] = self.store._load(function)
        self.store._fold_new(function, folded)
        if folded.unsaved and now - folded.written_at >= self.save_every_s:
            self.store._save(function, folded)
            folded.written_at = now
        elif not folded.unsaved and now - folded.written_at >= self.touch_every_s:
            self.store.redis.pexpire(self.store._key(function, "demand"), self.store._ttl_ms)
            folded.written_at = now
        return folded.history

    def flush(self) -> None:
        """Write back every history with records folded since it was last written."""
        for function, folded in self._held.items():
            if folded.unsaved:
                self.store._save(function, folded)

    def clear(self) -> None:
        """Forget what is held, unwritten: the next folds start from what Redis stored."""
        self._held.clear()

    def drop(self, function: str) -> None:
        """Forget one function's history, unwritten (it left the registry)."""
        self._held.pop(function, None)


# -- record encoding: every field a string, None fields left out ---------------------------------------


def _invocation_fields(rec: Invocation) -> dict[str, str]:
    fields = {
        "arrival": repr(float(rec.arrival)),
        "cold": "1" if rec.cold else "0",
        "wait_s": repr(float(rec.wait_s)),
        "outcome": rec.outcome,
        "concurrency": str(int(rec.concurrency)),
    }
    if rec.tokens_in is not None:
        fields["tokens_in"] = str(int(rec.tokens_in))
    if rec.tokens_out is not None:
        fields["tokens_out"] = str(int(rec.tokens_out))
    return fields


def _cold_start_fields(rep: ColdStart) -> dict[str, str]:
    fields = {"revision": rep.revision, "at": repr(float(rep.at)), "total_s": repr(float(rep.total_s))}
    if rep.restore_s is not None:
        fields["restore_s"] = repr(float(rep.restore_s))
    if rep.snapshot_bytes is not None:
        fields["snapshot_bytes"] = str(int(rep.snapshot_bytes))
    if rep.tiers:
        fields["tiers"] = json.dumps({str(k): float(v) for k, v in rep.tiers.items()}, separators=(",", ":"))
    if rep.start_method is not None:
        fields["start_method"] = rep.start_method
    return fields


def _parse_invocation(function: str, f: Mapping[str, str], where: str, entry_id: str) -> Invocation | None:
    """The record, or None (with a warning) for an entry this module did not write: skipped, so one bad
    entry cannot stall every later fold."""
    try:
        return Invocation(
            function=function,
            arrival=float(f["arrival"]),
            cold=f["cold"] == "1",
            wait_s=float(f["wait_s"]),
            outcome=f.get("outcome", "ok"),
            tokens_in=_opt_int(f.get("tokens_in")),
            tokens_out=_opt_int(f.get("tokens_out")),
            concurrency=int(f.get("concurrency", "1")),
        )
    except (KeyError, ValueError) as exc:
        log.warning("demand: skipping malformed %s entry %s of %s: %r", where, entry_id, function, exc)
        return None


def _parse_cold_start(function: str, f: Mapping[str, str], where: str, entry_id: str) -> ColdStart | None:
    try:
        tiers = json.loads(f["tiers"]) if "tiers" in f else {}
        if not isinstance(tiers, dict):
            raise ValueError(f"tiers is {type(tiers).__name__}, not an object")
        return ColdStart(
            function=function,
            revision=f["revision"],
            at=float(f["at"]),
            total_s=float(f["total_s"]),
            restore_s=_opt_float(f.get("restore_s")),
            snapshot_bytes=_opt_int(f.get("snapshot_bytes")),
            tiers={str(k): float(v) for k, v in tiers.items()},
            start_method=f.get("start_method"),
        )
    except (KeyError, ValueError, TypeError) as exc:
        log.warning("demand: skipping malformed %s entry %s of %s: %r", where, entry_id, function, exc)
        return None


def _parse_demand(function: str, raw: str) -> tuple[DemandHistory, str | None, str | None] | None:
    """The stored history and its cursors; None (with a warning) when the JSON is garbled."""
    try:
        doc = json.loads(raw)
        cursor = doc["cursor"]
        cursors = (cursor.get("invocations"), cursor.get("coldstarts"))
        for c in cursors:
            if c is not None and not (isinstance(c, str) and _STREAM_ID.fullmatch(c)):
                raise ValueError(f"cursor {c!r} is not a stream id")
        history = DemandHistory.from_dict(doc["history"])
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        log.warning("demand: the stored history of %s is garbled (%r): starting a fresh one", function, exc)
        return None
    return history, cursors[0], cursors[1]


# -- checks -----------------------------------------------------------------------------------------


def _check_invocation(rec: Invocation) -> None:
    validate_function_name(rec.function)
    if rec.outcome not in OUTCOMES:
        raise ValueError(f"invocation of {rec.function!r}: outcome {rec.outcome!r} is not one of {', '.join(OUTCOMES)}")
    for name in ("arrival", "wait_s"):
        if not _finite(getattr(rec, name)):
            raise ValueError(
                f"invocation of {rec.function!r}: {name} must be a finite number, not {getattr(rec, name)!r}"
            )
    for name in ("tokens_in", "tokens_out", "concurrency"):
        value = getattr(rec, name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise ValueError(f"invocation of {rec.function!r}: {name} must be a whole number >= 0, not {value!r}")


def _check_cold_start(rep: ColdStart) -> None:
    validate_function_name(rep.function)
    if not isinstance(rep.revision, str) or not rep.revision:
        raise ValueError(f"cold start of {rep.function!r}: revision must be a non-empty string, not {rep.revision!r}")
    for name in ("at", "total_s", "restore_s"):
        value = getattr(rep, name)
        if (value is not None or name != "restore_s") and not _finite(value):
            raise ValueError(f"cold start of {rep.function!r}: {name} must be a finite number, not {value!r}")
    size = rep.snapshot_bytes
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
        raise ValueError(f"cold start of {rep.function!r}: snapshot_bytes must be a whole number >= 0, not {size!r}")
    for tier, seconds in rep.tiers.items():
        if not _finite(seconds):
            raise ValueError(f"cold start of {rep.function!r}: tier {tier!r} seconds must be finite, not {seconds!r}")


def _check_limit(limit: int | None) -> None:
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 0):
        raise ValueError(f"limit must be a whole number >= 0, not {limit!r}")


# -- helpers ----------------------------------------------------------------------------------------


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _opt_int(value: str | None) -> int | None:
    return None if value is None else int(value)


def _opt_float(value: str | None) -> float | None:
    return None if value is None else float(value)


def _text(value: Any) -> str:
    """Redis replies are bytes unless the client decodes them."""
    return value.decode() if isinstance(value, bytes) else str(value)
