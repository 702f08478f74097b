"""An instance that restored into the host pool says so, from the runtime's cold-start summary to
`kold describe`'s TIER column (`store→pool`); one that restored into fresh memory does not."""

from __future__ import annotations

from kold.describe import format_describe
from kold.runtime.lifecycle import ColdStart


def instance(instance_id: str, pooled: bool) -> dict[str, object]:
    cold = ColdStart(process_start=1000.0, ready=1000.5)
    cold.restore = {"snapshot_id": "abc", "source_tier": "store", "pooled": pooled, "data_bytes": 10, "total_s": 0.1}
    return {"id": instance_id, "state": "ready", "started_at": 1000.0, "cold_start": cold.summary()}


def test_the_summary_carries_pooled_and_describe_shows_it_in_tier() -> None:
    fresh, pooled = instance("f-1", False), instance("f-2", True)
    assert fresh["cold_start"]["restore"]["pooled"] is False  # type: ignore[index]
    assert pooled["cold_start"]["restore"]["pooled"] is True  # type: ignore[index]
    text = format_describe({"name": "f", "instances": [fresh, pooled]}, "http://127.0.0.1:8080", now=1001.0)
    rows = {line.split()[0]: line.split() for line in text.splitlines() if line.strip().startswith("f-")}
    assert "store" in rows["f-1"] and "store→pool" not in rows["f-1"]
    assert "store→pool" in rows["f-2"]
    assert "→pool: restored into a segment of the node's pre-faulted host pool" in text


def test_no_pool_note_when_no_instance_restored_into_the_pool() -> None:
    text = format_describe({"name": "f", "instances": [instance("f-1", False)]}, "http://127.0.0.1:8080", now=1001.0)
    assert "→pool" not in text
