"""Per-model scheduling: a queue of waiting requests and replica choice.

A request *acquires a lease* on a replica: it waits in the model's queue until some
replica has a free slot (in-flight below its concurrency), then runs on that replica
and *releases* the lease with the time it used. The queue policy decides who goes
next: :class:`FifoQueue` here, the seed's fair queue in :mod:`llmpoold.fairness`
(the pool's default). ``Retry-After`` on 429 and 503 ``queue_timeout`` is estimated
from the recent service times.
Routing is the seed's: the eligible replica with the fewest in-flight requests, ties
broken round-robin.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from llmpoold.errors import ApiError, model_state_error
from llmpoold.replicas import Replica

_ids = itertools.count(1)
# A running job told to stop (:meth:`ModelScheduler.abort_running`) is asked through its
# cancel event and cut (its task cancelled) if still running this much later: a runtime
# may not look at the event.
ABORT_GRACE_S = 5.0


@dataclass(eq=False)
class Job:
    """One request waiting for, or holding, a replica slot."""

    model: str
    fairness_key: str | None = None
    # A key's share (llmpoold.tenants): its buckets compete inside the group, which
    # competes with the others at ``fairness_weight`` (None: engine.fairness.weights).
    fairness_group: str | None = None
    fairness_weight: float | None = None
    enqueued_at: float = field(default_factory=time.perf_counter)
    job_id: int = field(default_factory=lambda: next(_ids))
    future: asyncio.Future[Lease] | None = None


@dataclass(eq=False)
class Lease:
    """A job's claim on one replica slot; hand it back with :meth:`ModelScheduler.release`."""

    job: Job
    replica: Replica
    replica_index: int
    queue_wait_ms: float
    started_at: float = field(default_factory=time.perf_counter)
    released: bool = False
    # Called with the error when an unload's drain timeout passes while the job runs
    # (see :meth:`ModelScheduler.abort_running`); set by whoever runs the job.
    on_abort: Callable[[ApiError], None] | None = None


class QueuePolicy(Protocol):
    """Who waits and who goes next. All methods run on the event loop."""

    def push(self, job: Job, now: float) -> None:
        """Add a job or raise ApiError (429) when a limit is reached."""

    def pop_next(self, now: float) -> Job | None: ...

    def remove(self, job: Job) -> bool:
        """Drop a waiting job (client gone, deadline); False if it was not waiting."""

    def complete(self, job: Job, service_ms: float) -> None:
        """A popped job finished after using ``service_ms`` of replica time."""

    def drain(self) -> list[Job]: ...

    def __len__(self) -> int: ...

    def snapshot(self, now: float) -> dict[str, Any]: ...


class FifoQueue:
    """First come, first served, with one bound on the number waiting."""

    def __init__(self, model: str, *, max_pending: int = 128) -> None:
        self.model = model
        self.max_pending = max_pending
        self._jobs: deque[Job] = deque()
        self.rejected = 0

    def push(self, job: Job, now: float) -> None:
        if len(self._jobs) >= self.max_pending:
            self.rejected += 1
            raise ApiError(429, "executor_queue_full", f"pending queue is full for model '{self.model}'",
                           model=self.model)
        self._jobs.append(job)

    def pop_next(self, now: float) -> Job | None:
        return self._jobs.popleft() if self._jobs else None

    def remove(self, job: Job) -> bool:
        try:
            self._jobs.remove(job)
        except ValueError:
            return False
        return True

    def complete(self, job: Job, service_ms: float) -> None:
        pass

    def drain(self) -> list[Job]:
        jobs = list(self._jobs)
        self._jobs.clear()
        return jobs

    def __len__(self) -> int:
        return len(self._jobs)

    def snapshot(self, now: float) -> dict[str, Any]:
        return {"rejected_per_key_limit": 0, "rejected_executor_limit": self.rejected, "keys": []}


class ModelScheduler:
    """Queue and replica routing for one loaded model."""

    def __init__(self, model: str, replicas: Sequence[Replica], *, target_inflight: int,
                 queue: QueuePolicy | None = None) -> None:
        self.model = model
        self.replicas = list(replicas)
        self.inflight = [0] * len(self.replicas)
        self.configured_target_inflight = target_inflight
        self.queue: QueuePolicy = queue if queue is not None else FifoQueue(model)  # an empty queue is falsy
        self.accepting = True
        self._rr = 0
        self.leases: set[Lease] = set()  # granted and not yet released
        self._service_ms: deque[float] = deque(maxlen=64)  # recent completed jobs, for Retry-After
        self._idle = asyncio.Event()
        self._idle.set()

    def replica_target(self, index: int) -> int:
        """Slots of one replica: the configured target, capped by what its runtime declares."""
        return max(1, min(self.configured_target_inflight, self.replicas[index].concurrency))

    @property
    def effective_target_inflight(self) -> int:
        return min((self.replica_target(i) for i in range(len(self.replicas))), default=1)

    @property
    def runtime_inflight(self) -> int:
        return sum(self.inflight)

    @property
    def queue_depth(self) -> int:
        return len(self.queue)

    @property
    def slots(self) -> int:
        return sum(self.replica_target(i) for i in range(len(self.replicas))) or 1

    def retry_after_s(self, *, ahead: int | None = None) -> int:
        """Seconds until a slot is likely free for a newcomer: the jobs ahead of it
        (queued and running) times the mean recent service time, spread over the slots.
        At least 1 s; 1 s per job when nothing has finished yet."""
        mean_ms = sum(self._service_ms) / len(self._service_ms) if self._service_ms else 1000.0
        jobs = (self.queue_depth if ahead is None else ahead) + self.runtime_inflight
        estimate = math.ceil(jobs * mean_ms / 1000 / self.slots)
        return max(1, min(3600, estimate))

    def _pick_replica(self) -> int | None:
        # A replica that is not ``accepting`` (a crashed worker being restarted) gets nothing.
        eligible = [i for i in range(len(self.replicas))
                    if self.inflight[i] < self.replica_target(i) and self.replicas[i].accepting]
        if not eligible:
            return None
        low = min(self.inflight[i] for i in eligible)
        n = len(self.replicas)
        for step in range(n):
            index = (self._rr + step) % n
            if index in eligible and self.inflight[index] == low:
                self._rr = (index + 1) % n
                return index
        return None

    def replica_available(self) -> None:
        """A replica is accepting again (a worker restarted): let waiting jobs in."""
        self._dispatch()

    def _dispatch(self) -> None:
        now = time.perf_counter()
        while len(self.queue):
            index = self._pick_replica()
            if index is None:
                return
            job = self.queue.pop_next(now)
            if job is None:
                return
            assert job.future is not None
            if job.future.done():  # waiter already gone; give the slot to the next one
                self.queue.complete(job, 0.0)
                continue
            self.inflight[index] += 1
            self._idle.clear()
            lease = Lease(job=job, replica=self.replicas[index], replica_index=index,
                          queue_wait_ms=max(0.0, (now - job.enqueued_at) * 1000))
            self.leases.add(lease)
            job.future.set_result(lease)

    async def acquire(self, job: Job, *, timeout_s: float | None = None) -> Lease:
        """Wait for a replica slot. Raises ApiError: 409 while unloading, 429 when the
        queue is full, 503 ``queue_timeout`` when ``timeout_s`` passes first. A
        cancelled waiter leaves the queue and never reaches a replica."""
        if not self.accepting:
            raise model_state_error(self.model, "unloading")
        job.future = asyncio.get_running_loop().create_future()
        try:
            self.queue.push(job, time.perf_counter())
        except ApiError as exc:
            if exc.status == 429:
                exc.headers.setdefault("Retry-After", str(self.retry_after_s()))
            raise
        self._idle.clear()
        self._dispatch()
        try:
            return await asyncio.wait_for(asyncio.shield(job.future), timeout_s)
        except (asyncio.CancelledError, TimeoutError) as exc:
            if job.future.done() and not job.future.cancelled() and job.future.exception() is None:
                # The slot was granted in the same instant: hand it back unused.
                self.release(job.future.result(), service_ms=0.0, charge=False)
            else:
                self.queue.remove(job)
                job.future.cancel()
                self._check_idle()
            if isinstance(exc, TimeoutError):
                raise ApiError(503, "queue_timeout",
                               f"request waited longer than {timeout_s:g}s in the queue for model '{self.model}'",
                               model=self.model, headers={"Retry-After": str(self.retry_after_s())}) from None
            raise

    def release(self, lease: Lease, *, service_ms: float | None = None, charge: bool = True) -> None:
        """Give a slot back and let the next waiter in."""
        if lease.released:
            return
        lease.released = True
        self.leases.discard(lease)
        self.inflight[lease.replica_index] -= 1
        used = service_ms if service_ms is not None else (time.perf_counter() - lease.started_at) * 1000
        if charge:
            self._service_ms.append(used)
        self.queue.complete(lease.job, used if charge else 0.0)
        self._dispatch()
        self._check_idle()

    def _check_idle(self) -> None:
        if not len(self.queue) and not any(self.inflight):
            self._idle.set()

    def begin_shutdown(self) -> None:
        """Stop accepting; every waiting job fails with 409 ``model_unloading``;
        running jobs finish."""
        self.accepting = False
        for job in self.queue.drain():
            if job.future is not None and not job.future.done():
                job.future.set_exception(model_state_error(self.model, "unloading"))
        self._check_idle()

    async def wait_idle(self, timeout_s: float | None = None) -> bool:
        """Wait until nothing is queued or running; False if ``timeout_s`` passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    def abort_running(self, error: ApiError) -> int:
        """Tell every running job to stop with ``error`` (an unload whose drain timed
        out). Returns how many were told; each releases its slot as it stops."""
        leases = [lease for lease in self.leases if not lease.released]
        for lease in leases:
            if lease.on_abort is not None:
                lease.on_abort(error)
        return len(leases)

    def snapshot(self) -> dict[str, Any]:
        return self.queue.snapshot(time.perf_counter())
