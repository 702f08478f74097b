"""The demand records the gateway writes for the pre-warm controller, off the request path.

Every request becomes a `records.Invocation` (timed out, failed and cancelled ones too) and every
instance that becomes READY a `records.ColdStart`. They go through the shared batching writer,
`kold.controller.recorder.Recorder` (the runtime reports its demand on Knative through it too): queued
without waiting, written in batches through the demand store (controller/demand.py), dropped and
counted (`kold_gateway_invocation_records_dropped_total`) when Redis is away or the queue is full.
What is the gateway's own is here: a request's `Call` while it runs, and its outcome by status.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from kold.controller import recorder, records
from kold.controller.recorder import Recorder, cold_start_record
from kold.controller.records import Invocation

__all__ = ["Call", "DemandWriter", "Recorder", "cold_start_record", "outcome_of"]


class DemandWriter(recorder.DemandWriter, Protocol):
    """What the gateway needs of `kold.controller.demand.DemandStore`: the recorder's writes, and
    dropping a removed function's records."""

    def forget(self, function: str) -> None: ...


@dataclass(slots=True)
class Call:
    """One request's record while it is under way (the router fills it in; mutable until finished).

    `known` turns true once the function's revision was found: a request for a name that is no
    function is never recorded (it would create keys for a function that does not exist)."""

    function: str
    arrival: float  # Unix time
    known: bool = False
    concurrency: int = 0
    cold: bool = False
    wait_s: float = 0.0
    finished: bool = False

    def invocation(self, outcome: str, tokens_in: int | None, tokens_out: int | None) -> Invocation:
        return Invocation(
            function=self.function,
            arrival=self.arrival,
            cold=self.cold,
            wait_s=self.wait_s,
            outcome=outcome,
            tokens_in=tokens_in,
            tokens_out=tokens_out,
            concurrency=max(1, self.concurrency),
        )


def outcome_of(status: int) -> str:
    """An answer's outcome by its status: the instance's 5xx is a failure, anything else answered."""
    return records.FAILED if status >= 500 else records.OK
