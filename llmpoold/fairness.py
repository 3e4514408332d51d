"""The seed's client fairness as a :class:`~llmpoold.scheduler.QueuePolicy`.

One bucket per ``fairness_key`` (``None`` is the shared anonymous bucket), each with a
FIFO of waiting jobs, a ``weight`` (``engine.fairness.weights[key]`` or
``default_weight``) and a *virtual service time*: the replica milliseconds it has used,
divided by its weight. The next job comes from the bucket with the lowest score::

    score = virtual_service_ms + (elapsed ms of its running jobs) / weight

ties broken by who was served longest ago, then by who arrived first, so equal keys
alternate (a, b, a, b) and weights 2:1 get 2:1 of the replica time.

- **Soft cap**: buckets with fewer than ``soft_max_inflight_per_key`` running jobs go
  first; when none are below it, the others may borrow the free slot (work conserving).
- **New keys** start at the lowest score among buckets with work (0 when there is none):
  no windfall for arriving late, no penalty either. A bucket that went idle and comes
  back within ``idle_state_ttl_s`` keeps its score, raised to that same floor, so a pause
  cannot be saved up into a burst (the seed kept the old score as it was; this is the
  one deliberate difference).
- **Idle expiry**: a bucket with nothing waiting or running for ``idle_state_ttl_s`` is
  forgotten.
- **Bounds**: ``max_pending_per_key`` waiting in one bucket → 429
  ``fairness_key_queue_full``; ``max_pending_per_executor`` waiting in all → 429
  ``executor_queue_full`` (the scheduler adds ``Retry-After``). A bucket is created only
  for a request that passed both checks (a refused request leaves no state), and at most
  ``max_keys`` are kept: at the cap the oldest idle one is forgotten to make room; when
  all have work, 429 ``fairness_keys_exhausted``.
- **Charging**: :meth:`FairQueue.complete` adds the replica time the job actually used,
  cancelled and failed jobs included; a job that never ran is charged 0.

All methods run on the event loop; ``now`` is ``time.perf_counter()`` seconds.
"""

from __future__ import annotations

import itertools
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from llmpoold.config import FairnessSettings
from llmpoold.errors import ApiError
from llmpoold.scheduler import Job


@dataclass(eq=False)
class Bucket:
    """The fairness state of one key."""

    key: str | None
    weight: float
    virtual_service_ms: float
    activation_order: int
    pending: deque[Job] = field(default_factory=deque)
    active: dict[int, float] = field(default_factory=dict)  # job id -> start (perf_counter s)
    last_selected_order: int = 0
    idle_since: float | None = None
    rejected_per_key_limit: int = 0
    rejected_executor_limit: int = 0

    def score(self, now: float) -> float:
        running_ms = sum(max(0.0, now - start) for start in self.active.values()) * 1000
        return self.virtual_service_ms + running_ms / self.weight

    @property
    def busy(self) -> bool:
        return bool(self.pending or self.active)


class FairQueue:
    """Weighted fair queue over fairness keys for one model (see the module docstring)."""

    def __init__(self, model: str, settings: FairnessSettings | None = None, *,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.model = model
        self.settings = settings or FairnessSettings()
        self._clock = clock
        self._buckets: dict[str | None, Bucket] = {}
        # Indexes over _buckets so that every operation costs O(keys with work), however
        # many idle keys are remembered: busy buckets, and idle ones oldest first.
        self._busy: dict[str | None, Bucket] = {}
        self._idle: OrderedDict[str | None, Bucket] = OrderedDict()
        self._orders = itertools.count(1)
        self._pending = 0
        self.rejected_per_key_limit = 0
        self.rejected_executor_limit = 0
        self.rejected_key_limit = 0

    # ----- helpers -------------------------------------------------------------------

    def weight(self, key: str | None) -> float:
        if key is None:
            return self.settings.default_weight
        return self.settings.weights.get(key, self.settings.default_weight)

    def _floor(self, now: float, exclude: Bucket | None = None) -> float:
        """The lowest score among buckets with work (0 when none has any)."""
        scores = [b.score(now) for b in self._busy.values() if b is not exclude]
        return min(scores, default=0.0)

    def _expire(self, now: float) -> None:
        ttl = self.settings.idle_state_ttl_s
        while self._idle:
            key, oldest = next(iter(self._idle.items()))
            if oldest.idle_since is None or now - oldest.idle_since < ttl:
                return
            del self._idle[key]
            del self._buckets[key]

    def _new_bucket(self, key: str | None, now: float) -> Bucket:
        """A bucket for a key that has none, once the limit checks have passed. At
        ``max_keys`` the oldest idle bucket is forgotten first; when every bucket has
        work, 429 ``fairness_keys_exhausted`` (nothing is created)."""
        if len(self._buckets) >= self.settings.max_keys:
            if not self._idle:
                self.rejected_key_limit += 1
                raise ApiError(429, "fairness_keys_exhausted",
                               f"too many fairness keys have requests pending or running for model '{self.model}' "
                               f"(limit {self.settings.max_keys}); retry later", model=self.model)
            oldest, _ = self._idle.popitem(last=False)
            del self._buckets[oldest]
        bucket = Bucket(key=key, weight=self.weight(key), virtual_service_ms=self._floor(now),
                        activation_order=next(self._orders), idle_since=now)
        self._buckets[key] = bucket
        self._idle[key] = bucket
        return bucket

    def _mark_idle(self, bucket: Bucket) -> None:
        if not bucket.busy and bucket.key in self._busy:
            del self._busy[bucket.key]
            bucket.idle_since = self._clock()
            self._idle[bucket.key] = bucket  # newest idle last

    def _mark_busy(self, bucket: Bucket) -> None:
        if bucket.key not in self._busy:
            self._idle.pop(bucket.key, None)
            self._busy[bucket.key] = bucket
            bucket.idle_since = None

    # ----- QueuePolicy ---------------------------------------------------------------

    def push(self, job: Job, now: float) -> None:
        self._expire(now)
        bucket = self._buckets.get(job.fairness_key)
        if bucket is not None and len(bucket.pending) >= self.settings.max_pending_per_key:
            bucket.rejected_per_key_limit += 1
            self.rejected_per_key_limit += 1
            label = bucket.key if bucket.key is not None else "anonymous"
            raise ApiError(429, "fairness_key_queue_full",
                           f"pending queue for fairness key '{label}' is full for model '{self.model}'",
                           model=self.model)
        if self._pending >= self.settings.max_pending_per_executor:
            if bucket is not None:
                bucket.rejected_executor_limit += 1
            self.rejected_executor_limit += 1
            raise ApiError(429, "executor_queue_full", f"pending queue is full for model '{self.model}'",
                           model=self.model)
        if bucket is None:  # only a request that is queued creates a bucket
            bucket = self._new_bucket(job.fairness_key, now)
        if not bucket.busy:  # (re)activation: never below the floor of those with work
            bucket.virtual_service_ms = max(bucket.virtual_service_ms, self._floor(now, exclude=bucket))
        bucket.pending.append(job)
        self._mark_busy(bucket)
        self._pending += 1

    def pop_next(self, now: float) -> Job | None:
        self._expire(now)
        candidates = [b for b in self._busy.values() if b.pending]
        if not candidates:
            return None
        soft_cap = self.settings.soft_max_inflight_per_key
        under_cap = [b for b in candidates if len(b.active) < soft_cap]
        chosen = min(under_cap or candidates, key=lambda b: (b.score(now), b.last_selected_order, b.activation_order))
        job = chosen.pending.popleft()
        self._pending -= 1
        chosen.active[job.job_id] = now
        chosen.last_selected_order = next(self._orders)
        return job

    def remove(self, job: Job) -> bool:
        bucket = self._buckets.get(job.fairness_key)
        if bucket is None:
            return False
        try:
            bucket.pending.remove(job)
        except ValueError:
            return False
        self._pending -= 1
        self._mark_idle(bucket)
        return True

    def complete(self, job: Job, service_ms: float) -> None:
        bucket = self._buckets.get(job.fairness_key)
        if bucket is None or bucket.active.pop(job.job_id, None) is None:
            return
        bucket.virtual_service_ms += max(0.0, service_ms) / bucket.weight
        self._mark_idle(bucket)

    def drain(self) -> list[Job]:
        jobs: list[Job] = []
        for bucket in list(self._busy.values()):
            jobs.extend(bucket.pending)
            bucket.pending.clear()
            self._mark_idle(bucket)
        self._pending = 0
        return jobs

    def __len__(self) -> int:
        return self._pending

    def pending_for(self, key: str | None) -> int:
        bucket = self._buckets.get(key)
        return len(bucket.pending) if bucket else 0

    def snapshot(self, now: float) -> dict[str, Any]:
        """The admin view: totals, and one entry per key with work (anonymous first)."""
        self._expire(now)
        busy = sorted(self._busy.values(),
                      key=lambda b: (b.key is not None, b.key or ""))
        return {
            "rejected_per_key_limit": self.rejected_per_key_limit,
            "rejected_executor_limit": self.rejected_executor_limit,
            "keys": [{"fairness_key": b.key, "pending": len(b.pending), "active": len(b.active),
                      "weight": b.weight, "score": round(b.score(now), 3),
                      "rejected_per_key_limit": b.rejected_per_key_limit,
                      "rejected_executor_limit": b.rejected_executor_limit} for b in busy],
        }


def fair_queue_factory(model: str, settings: Any) -> FairQueue:
    """``Pool``'s ``queue_factory``: a fair queue configured by ``engine.fairness``."""
    return FairQueue(model, settings.engine.fairness)
