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
- **Groups** (an API key's share, :mod:`llmpoold.tenants`): a job with a
  ``fairness_group`` lands in the bucket ``fairness_key`` *inside* that group. The rules
  above apply between groups (a bucket without a group is a group of its own, so
  nothing changes for it), with the group's weight (``fairness_weight``, else
  ``engine.fairness.weights``) and its members' summed service; inside a group the
  same rules pick the member. So however many keys a client rotates through under one
  API key, together they get that key's share. ``max_pending_per_key`` bounds each
  bucket and each group.

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

BucketId = str | None | tuple[str, str | None]  # a key without a group, or (group, key)
GroupId = str | None | tuple[str, str]  # a lone key's own group, or ("group", name)


@dataclass(eq=False)
class Group:
    """The share of a group of buckets (an API key's), or of one lone bucket."""

    gid: GroupId
    name: str | None
    weight: float
    virtual_service_ms: float
    activation_order: int
    members: dict[BucketId, Bucket] = field(default_factory=dict)
    busy_members: dict[BucketId, Bucket] = field(default_factory=dict)
    pending: int = 0
    active: int = 0
    last_selected_order: int = 0

    def score(self, now: float) -> float:
        running_s = sum(max(0.0, now - start) for b in self.busy_members.values() for start in b.active.values())
        return self.virtual_service_ms + running_s * 1000 / self.weight

    @property
    def busy(self) -> bool:
        return bool(self.busy_members)


@dataclass(eq=False)
class Bucket:
    """The fairness state of one key (inside its group)."""

    key: str | None
    weight: float
    virtual_service_ms: float
    activation_order: int
    group: Group
    grouped: bool
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


def _ids(job: Job) -> tuple[BucketId, GroupId]:
    if job.fairness_group is None:
        return job.fairness_key, job.fairness_key
    return (job.fairness_group, job.fairness_key), ("group", job.fairness_group)


def _order(unit: Group | Bucket, now: float) -> tuple[float, int, int]:
    return unit.score(now), unit.last_selected_order, unit.activation_order


class FairQueue:
    """Weighted fair queue over fairness keys for one model (see the module docstring)."""

    def __init__(self, model: str, settings: FairnessSettings | None = None, *,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.model = model
        self.settings = settings or FairnessSettings()
        self._clock = clock
        self._buckets: dict[BucketId, Bucket] = {}
        self._groups: dict[GroupId, Group] = {}
        # Indexes so that every operation costs O(keys with work), however many idle
        # keys are remembered: busy buckets and groups, and idle buckets oldest first.
        self._busy: dict[BucketId, Bucket] = {}
        self._busy_groups: dict[GroupId, Group] = {}
        self._idle: OrderedDict[BucketId, Bucket] = OrderedDict()
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

    def _floor(self, now: float, exclude: Group | None = None) -> float:
        """The lowest score among groups with work (0 when none has any)."""
        return min((g.score(now) for g in self._busy_groups.values() if g is not exclude), default=0.0)

    @staticmethod
    def _member_floor(group: Group, now: float, exclude: Bucket) -> float:
        return min((b.score(now) for b in group.busy_members.values() if b is not exclude), default=0.0)

    def _forget(self, bucket_id: BucketId) -> None:
        bucket = self._buckets.pop(bucket_id)
        group = bucket.group
        group.members.pop(bucket_id, None)
        if not group.members:
            del self._groups[group.gid]

    def _expire(self, now: float) -> None:
        ttl = self.settings.idle_state_ttl_s
        while self._idle:
            bucket_id, oldest = next(iter(self._idle.items()))
            if oldest.idle_since is None or now - oldest.idle_since < ttl:
                return
            del self._idle[bucket_id]
            self._forget(bucket_id)

    def _new_bucket(self, job: Job, bucket_id: BucketId, group_id: GroupId, now: float) -> Bucket:
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
            self._forget(oldest)
        group = self._groups.get(group_id)
        if group is None:
            name = job.fairness_group if job.fairness_group is not None else job.fairness_key
            group = Group(gid=group_id, name=name, weight=self.weight(name), virtual_service_ms=self._floor(now),
                          activation_order=next(self._orders))
            self._groups[group_id] = group
        grouped = job.fairness_group is not None
        bucket = Bucket(key=job.fairness_key, weight=self.weight(job.fairness_key) if grouped else group.weight,
                        virtual_service_ms=0.0, activation_order=next(self._orders), group=group, grouped=grouped,
                        idle_since=now)
        group.members[bucket_id] = bucket
        self._buckets[bucket_id] = bucket
        self._idle[bucket_id] = bucket
        return bucket

    def _mark_idle(self, bucket_id: BucketId, bucket: Bucket) -> None:
        if not bucket.busy and bucket_id in self._busy:
            del self._busy[bucket_id]
            bucket.group.busy_members.pop(bucket_id, None)
            if not bucket.group.busy:
                del self._busy_groups[bucket.group.gid]
            bucket.idle_since = self._clock()
            self._idle[bucket_id] = bucket  # newest idle last

    def _mark_busy(self, bucket_id: BucketId, group_id: GroupId, bucket: Bucket) -> None:
        if bucket_id not in self._busy:
            self._idle.pop(bucket_id, None)
            self._busy[bucket_id] = bucket
            bucket.group.busy_members[bucket_id] = bucket
            self._busy_groups[group_id] = bucket.group
            bucket.idle_since = None

    # ----- QueuePolicy ---------------------------------------------------------------

    def push(self, job: Job, now: float) -> None:
        self._expire(now)
        bucket_id, group_id = _ids(job)
        bucket = self._buckets.get(bucket_id)
        group = self._groups.get(group_id)
        limit = self.settings.max_pending_per_key
        bucket_full = bucket is not None and len(bucket.pending) >= limit
        # A key's share (a group) is bounded as a whole: rotating keys does not dodge it.
        group_full = job.fairness_group is not None and group is not None and group.pending >= limit
        if bucket_full or group_full:
            if bucket is not None:
                bucket.rejected_per_key_limit += 1
            self.rejected_per_key_limit += 1
            label = job.fairness_key if bucket_full else job.fairness_group
            raise ApiError(429, "fairness_key_queue_full",
                           f"pending queue for fairness key '{label or 'anonymous'}' is full for model '{self.model}'",
                           model=self.model)
        if self._pending >= self.settings.max_pending_per_executor:
            if bucket is not None:
                bucket.rejected_executor_limit += 1
            self.rejected_executor_limit += 1
            raise ApiError(429, "executor_queue_full", f"pending queue is full for model '{self.model}'",
                           model=self.model)
        if bucket is None:  # only a request that is queued creates a bucket
            bucket = self._new_bucket(job, bucket_id, group_id, now)
        group = bucket.group
        if job.fairness_group is not None:  # the key's weight may have been reloaded
            group.weight = job.fairness_weight or self.weight(job.fairness_group)
        if not group.busy:  # (re)activation: never below the floor of those with work
            group.virtual_service_ms = max(group.virtual_service_ms, self._floor(now, exclude=group))
        if not bucket.busy:
            bucket.virtual_service_ms = max(bucket.virtual_service_ms, self._member_floor(group, now, bucket))
        bucket.pending.append(job)
        group.pending += 1
        self._mark_busy(bucket_id, group_id, bucket)
        self._pending += 1

    def pop_next(self, now: float) -> Job | None:
        self._expire(now)
        groups = [g for g in self._busy_groups.values() if g.pending]
        if not groups:
            return None
        soft_cap = self.settings.soft_max_inflight_per_key
        group = min([g for g in groups if g.active < soft_cap] or groups, key=lambda g: _order(g, now))
        members = [b for b in group.busy_members.values() if b.pending]
        chosen = min([b for b in members if len(b.active) < soft_cap] or members, key=lambda b: _order(b, now))
        job = chosen.pending.popleft()
        self._pending -= 1
        group.pending -= 1
        group.active += 1
        chosen.active[job.job_id] = now
        chosen.last_selected_order = group.last_selected_order = next(self._orders)
        return job

    def remove(self, job: Job) -> bool:
        bucket_id, _ = _ids(job)
        bucket = self._buckets.get(bucket_id)
        if bucket is None:
            return False
        try:
            bucket.pending.remove(job)
        except ValueError:
            return False
        self._pending -= 1
        bucket.group.pending -= 1
        self._mark_idle(bucket_id, bucket)
        return True

    def complete(self, job: Job, service_ms: float) -> None:
        bucket_id, _ = _ids(job)
        bucket = self._buckets.get(bucket_id)
        if bucket is None or bucket.active.pop(job.job_id, None) is None:
            return
        used = max(0.0, service_ms)
        bucket.virtual_service_ms += used / bucket.weight
        bucket.group.virtual_service_ms += used / bucket.group.weight
        bucket.group.active -= 1
        self._mark_idle(bucket_id, bucket)

    def drain(self) -> list[Job]:
        jobs: list[Job] = []
        for bucket_id, bucket in list(self._busy.items()):
            jobs.extend(bucket.pending)
            bucket.group.pending -= len(bucket.pending)
            bucket.pending.clear()
            self._mark_idle(bucket_id, bucket)
        self._pending = 0
        return jobs

    def __len__(self) -> int:
        return self._pending

    def pending_for(self, key: str | None, *, group: str | None = None) -> int:
        bucket = self._buckets.get(key if group is None else (group, key))
        return len(bucket.pending) if bucket else 0

    def snapshot(self, now: float) -> dict[str, Any]:
        """The admin view: totals, and one entry per key with work (anonymous first).
        ``weight`` and ``score`` are the share's: the group's for a key in a group
        (named by ``fairness_group``)."""
        self._expire(now)
        busy = sorted(self._busy.values(), key=lambda b: (b.key is not None, b.key or ""))
        return {
            "rejected_per_key_limit": self.rejected_per_key_limit,
            "rejected_executor_limit": self.rejected_executor_limit,
            "keys": [{"fairness_key": b.key, "pending": len(b.pending), "active": len(b.active),
                      "weight": b.group.weight, "score": round(b.group.score(now), 3),
                      "rejected_per_key_limit": b.rejected_per_key_limit,
                      "rejected_executor_limit": b.rejected_executor_limit,
                      **({"fairness_group": b.group.name} if b.grouped else {})} for b in busy],
        }


def fair_queue_factory(model: str, settings: Any) -> FairQueue:
    """``Pool``'s ``queue_factory``: a fair queue configured by ``engine.fairness``."""
    return FairQueue(model, settings.engine.fairness)
