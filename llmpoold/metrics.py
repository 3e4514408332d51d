"""Prometheus metrics for one pool, served at ``GET /metrics``.

Each :class:`PoolMetrics` has its own ``CollectorRegistry`` (no global state: several
apps in one process, as in the tests, do not clash). Counters and histograms are
observed by :class:`llmpoold.inference.Inference`; gauges (queue depth, in-flight,
model state) are read from the pool's entries at scrape time.

Labels are configured model names, replica ids, outcomes and error codes only: never
fairness keys or anything from a request body, so the label sets stay small.

=============================================== ======================================
``llmpool_requests_total{model,outcome}``       ``ok``, ``error`` (failed while running),
                                                ``rejected`` (never ran: 4xx/5xx before a
                                                slot, queue full, queue timeout),
                                                ``cancelled`` (client went away)
``llmpool_rejected_requests_total{model,reason}`` reason = the error code, e.g.
                                                ``fairness_key_queue_full``,
                                                ``executor_queue_full``, ``queue_timeout``
``llmpool_queue_wait_seconds{model}``           histogram, enqueue → slot granted
``llmpool_time_to_first_token_seconds{model}``  histogram, request start → first text
``llmpool_request_duration_seconds{model}``     histogram, request start → last token (ok)
``llmpool_output_tokens_total{model}``          tokens the runtimes reported
``llmpool_queue_depth{model}``                  gauge, waiting requests
``llmpool_inflight_requests{model}``            gauge, queued + running
``llmpool_replica_inflight{model,replica}``     gauge, running on each replica
``llmpool_replica_slots{model,replica}``        gauge, effective concurrency of each replica
``llmpool_model_state{model,state}``            1 for the model's current state, else 0
``llmpool_model_loads_total{model,reason}``     loads that succeeded: ``startup``, ``admin``,
                                                ``on_demand``
``llmpool_model_unloads_total{model,reason}``   ``admin``, ``idle``, ``evicted``, ``shutdown``
``llmpool_model_load_seconds{model}``           histogram, load start → loaded (memory wait
                                                and evictions included)
``llmpool_memory_budget_bytes{device}``         each device's budget (``ram``, ``gpu0``...)
``llmpool_memory_held_bytes{device,model}``     what each model holds (observed or estimate)
=============================================== ======================================
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from llmpoold.entries import ModelEntry, ModelState

Entries = Callable[[], Mapping[str, ModelEntry]]
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class _PoolCollector(Collector):
    """Gauges read from the pool's live state at scrape time."""

    def __init__(self, entries: Entries) -> None:
        self.entries = entries

    def collect(self) -> Iterator[Metric]:
        depth = GaugeMetricFamily("llmpool_queue_depth", "Requests waiting in the model's queue", labels=["model"])
        inflight = GaugeMetricFamily("llmpool_inflight_requests", "Requests queued or running for the model",
                                     labels=["model"])
        replica_inflight = GaugeMetricFamily("llmpool_replica_inflight", "Requests running on the replica",
                                             labels=["model", "replica"])
        replica_slots = GaugeMetricFamily("llmpool_replica_slots", "Effective concurrent requests of the replica",
                                          labels=["model", "replica"])
        state = GaugeMetricFamily("llmpool_model_state", "1 for the model's current lifecycle state",
                                  labels=["model", "state"])
        for name, entry in list(self.entries().items()):
            scheduler = entry.scheduler
            depth.add_metric([name], scheduler.queue_depth if scheduler else 0)
            inflight.add_metric([name], entry.inflight_requests)
            for s in ModelState:
                state.add_metric([name, s], 1.0 if entry.state == s else 0.0)
            if scheduler is not None:
                for i, replica in enumerate(scheduler.replicas):
                    replica_inflight.add_metric([name, replica.replica_id], scheduler.inflight[i])
                    replica_slots.add_metric([name, replica.replica_id], scheduler.replica_target(i))
        yield from (depth, inflight, replica_inflight, replica_slots, state)


class PoolMetrics:
    """The pool's metrics and their registry."""

    def __init__(self, entries: Entries) -> None:
        """``entries``: the pool's live model entries (read at scrape time)."""
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("llmpool_requests", "Inference requests by outcome", ["model", "outcome"],
                                registry=r)
        self.rejected = Counter("llmpool_rejected_requests", "Requests refused before running, by error code",
                                ["model", "reason"], registry=r)
        self.queue_wait = Histogram("llmpool_queue_wait_seconds", "Time from enqueue to a replica slot", ["model"],
                                    buckets=(0.0005, 0.001, 0.005, *_LATENCY_BUCKETS[1:]), registry=r)
        self.ttft = Histogram("llmpool_time_to_first_token_seconds", "Time from request start to the first text",
                              ["model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("llmpool_request_duration_seconds",
                                 "Time from request start to the last token, successful requests", ["model"],
                                 buckets=_LATENCY_BUCKETS, registry=r)
        self.output_tokens = Counter("llmpool_output_tokens", "Output tokens reported by the runtimes", ["model"],
                                     registry=r)
        r.register(_PoolCollector(entries))
        self.lifecycle = LifecycleMetrics(r, entries)

    def outcome(self, model: str, outcome: str, *, reason: str | None = None) -> None:
        self.requests.labels(model, outcome).inc()
        if reason is not None:
            self.rejected.labels(model, reason).inc()

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


# ----- lifecycle and memory (issue 14) ---------------------------------------------------------


class _MemoryCollector(Collector):
    """Budgets and holdings, read from the pool at scrape time."""

    def __init__(self, memory: Any, entries: Entries) -> None:
        self.memory = memory
        self.entries = entries

    def collect(self) -> Iterator[Metric]:
        budget = GaugeMetricFamily("llmpool_memory_budget_bytes", "Memory budget of the device", labels=["device"])
        held = GaugeMetricFamily("llmpool_memory_held_bytes", "Memory the model holds on the device",
                                 labels=["device", "model"])
        for device, mib in self.memory.cached_budgets().items():
            budget.add_metric([device], mib * 2**20)
        for name, entry in list(self.entries().items()):
            if entry.held is not None and entry.state in _HOLDING:
                held.add_metric([entry.held.device, name], entry.held.mib * 2**20)
        yield from (budget, held)


_HOLDING = frozenset({ModelState.LOADING, ModelState.LOADED, ModelState.UNLOADING})


class LifecycleMetrics:
    """Loads, unloads and memory (see the table above)."""

    def __init__(self, registry: CollectorRegistry, entries: Entries) -> None:
        self.registry = registry
        self.entries = entries
        self.loads = Counter("llmpool_model_loads", "Successful model loads by reason", ["model", "reason"],
                             registry=registry)
        self.unloads = Counter("llmpool_model_unloads", "Model unloads by reason", ["model", "reason"],
                               registry=registry)
        self.load_seconds = Histogram("llmpool_model_load_seconds", "Time from load start to loaded", ["model"],
                                      buckets=(0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0),
                                      registry=registry)

    def watch(self, memory: Any) -> None:
        """Export ``memory``'s budgets and holdings (a :class:`llmpoold.memory.MemoryBudget`)."""
        self.registry.register(_MemoryCollector(memory, self.entries))

    def loaded(self, model: str, reason: str, seconds: float) -> None:
        self.loads.labels(model, reason).inc()
        self.load_seconds.labels(model).observe(seconds)

    def unloaded(self, model: str, reason: str) -> None:
        self.unloads.labels(model, reason).inc()
