"""Prometheus metrics of one runtime instance, in a registry of its own (never the global one).

Counters only count: no `_created` sample beside each (a scrape of one instance is small, and
Prometheus does not use them), and rates are Prometheus's to compute (`rate(...)`), not ours.
Generated tokens are counted once, by the engine (`kold_engine_generated_tokens_total`: every
token it generated, whether or not a client read it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from kold.runtime.backend import EngineStats
    from kold.runtime.lifecycle import ColdStart

CONTENT_TYPE = CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5)
_QUEUE_BUCKETS = (0.001, 0.01, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class RuntimeMetrics:
    def __init__(
        self,
        state: Callable[[], str],
        queue_depth: Callable[[], float],
        in_flight: Callable[[], float],
        engine: Callable[[], EngineStats | None],
    ) -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call]  # process-wide: no `*_created` samples
        r = self.registry = CollectorRegistry(auto_describe=True)
        r.register(_EngineCollector(engine))
        self.restore_phase = Gauge(
            "kold_restore_phase_seconds", "Seconds spent in each phase of the weight restore", ["phase"], registry=r
        )
        self.startup_phase = Gauge(
            "kold_startup_phase_seconds",
            "Seconds spent in each phase of the start: imports, torch_import, restore, tokenizer, model, engine",
            ["phase"],
            registry=r,
        )
        self.cold_start = Gauge("kold_cold_start_seconds", "Process start to ready (weights in place)", registry=r)
        self.restore_bytes = Gauge("kold_restore_bytes", "Bytes of weights restored", registry=r)
        self.ttft = Histogram(
            "kold_time_to_first_token_seconds",
            "Request received to its first generated token (includes any wait for the model)",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "kold_inter_token_latency_seconds",
            "Time between consecutive tokens of a sequence",
            buckets=_ITL_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "kold_queue_wait_seconds",
            "Time a request waited for the model to be ready",
            buckets=_QUEUE_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "kold_request_duration_seconds", "Request received to its last token", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.prompt_tokens = Counter("kold_prompt_tokens", "Prompt tokens processed", registry=r)
        self.requests = Counter(
            "kold_requests", "Inference requests by endpoint and status", ["endpoint", "status"], registry=r
        )
        self.cancelled = Counter("kold_cancelled_generations", "Generations cancelled (client disconnects)", registry=r)
        Gauge(
            "kold_queue_depth", "Requests waiting: for the model to load, or for a batch slot", registry=r
        ).set_function(queue_depth)
        Gauge("kold_requests_in_flight", "Inference requests being handled", registry=r).set_function(in_flight)
        self._state = state
        self.state = Gauge("kold_state", "1 for the instance's current lifecycle state", ["state"], registry=r)

    def record_cold_start(self, cold: ColdStart) -> None:
        if cold.cold_start_ms is not None:
            self.cold_start.set(cold.cold_start_ms / 1000)
        for key, value in cold.restore.items():
            if key.endswith("_s") and isinstance(value, int | float):
                self.restore_phase.labels(key.removesuffix("_s")).set(value)
        if isinstance(cold.restore.get("data_bytes"), int):
            self.restore_bytes.set(cold.restore["data_bytes"])
        for phase, seconds in cold.phases.items():
            self.startup_phase.labels(phase).set(seconds)
        if cold.imports_done is not None:
            self.startup_phase.labels("imports").set(cold.imports_done - cold.process_start)

    def render(self) -> bytes:
        from kold.runtime.lifecycle import State

        current = self._state()
        for s in State:
            self.state.labels(s.value).set(1 if s.value == current else 0)
        return generate_latest(self.registry)


class _EngineCollector(Collector):
    """The engine's own counts, read at scrape time (nothing while the model is loading)."""

    def __init__(self, engine: Callable[[], EngineStats | None]) -> None:
        self.engine = engine

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        stats = self.engine()
        if stats is None:
            return
        yield GaugeMetricFamily(
            "kold_engine_waiting", "Requests submitted to the engine, waiting for a slot", value=stats.waiting
        )
        yield GaugeMetricFamily("kold_engine_running", "Sequences in the engine's batch", value=stats.running)
        yield CounterMetricFamily(
            "kold_engine_generated_tokens", "Tokens the engine generated (read or not)", value=stats.generated_tokens
        )
        yield CounterMetricFamily(
            "kold_engine_prompt_tokens", "Prompt tokens the engine prefilled", value=stats.prompt_tokens
        )
