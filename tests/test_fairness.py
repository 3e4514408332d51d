"""The seed's fairness policy (llmpoold.fairness.FairQueue), deterministically: time is
passed in explicitly, no event loop, no backend."""

from __future__ import annotations

from collections import Counter

import pytest

from llmpoold.config import FairnessSettings
from llmpoold.errors import ApiError
from llmpoold.fairness import FairQueue
from llmpoold.scheduler import Job


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make_queue(**settings: object) -> tuple[FairQueue, Clock]:
    clock = Clock()
    return FairQueue("m", FairnessSettings.model_validate(settings), clock=clock), clock


def push(queue: FairQueue, clock: Clock, key: str | None, n: int = 1) -> list[Job]:
    jobs = [Job(model="m", fairness_key=key) for _ in range(n)]
    for job in jobs:
        queue.push(job, clock.now)
    return jobs


def serve_one_slot(queue: FairQueue, clock: Clock, count: int, service_s: float = 0.01) -> list[str | None]:
    """One replica slot: pop, run ``service_s``, charge it, repeat. Returns the keys served."""
    served = []
    for _ in range(count):
        job = queue.pop_next(clock.now)
        assert job is not None
        clock.now += service_s
        queue.complete(job, service_s * 1000)
        served.append(job.fairness_key)
    return served


def key_entry(queue: FairQueue, clock: Clock, key: str | None) -> dict:
    return next(k for k in queue.snapshot(clock.now)["keys"] if k["fairness_key"] == key)


def test_equal_keys_alternate() -> None:
    queue, clock = make_queue()
    push(queue, clock, "a", 3)
    push(queue, clock, "b", 3)
    assert serve_one_slot(queue, clock, 6) == ["a", "b", "a", "b", "a", "b"]
    assert len(queue) == 0 and queue.pop_next(clock.now) is None


def test_anonymous_is_one_bucket_competing_with_keys() -> None:
    queue, clock = make_queue()
    push(queue, clock, None, 2)
    push(queue, clock, "a", 2)
    assert serve_one_slot(queue, clock, 4) == [None, "a", None, "a"]


def test_weights_two_to_one_get_two_to_one_service() -> None:
    queue, clock = make_queue(weights={"gold": 2.0, "std": 1.0})
    push(queue, clock, "gold", 20)
    push(queue, clock, "std", 20)
    served = Counter(serve_one_slot(queue, clock, 18))
    assert served == {"gold": 12, "std": 6}


def test_weight_counts_service_time_not_requests() -> None:
    """A key whose requests run 3x longer gets a third of the requests at equal weight."""
    queue, clock = make_queue()
    push(queue, clock, "long", 10)
    push(queue, clock, "short", 10)
    served = []
    for _ in range(8):
        job = queue.pop_next(clock.now)
        assert job is not None
        service = 0.03 if job.fairness_key == "long" else 0.01
        clock.now += service
        queue.complete(job, service * 1000)
        served.append(job.fairness_key)
    assert Counter(served) == {"long": 2, "short": 6}


def test_running_jobs_count_before_they_finish() -> None:
    queue, clock = make_queue(soft_max_inflight_per_key=4)
    push(queue, clock, "a", 2)
    push(queue, clock, "b", 1)
    first = queue.pop_next(clock.now)
    assert first is not None and first.fairness_key == "a"
    clock.now += 0.5  # a's job is still running: its elapsed time already counts
    assert key_entry(queue, clock, "a")["score"] == pytest.approx(500.0)
    nxt = queue.pop_next(clock.now)
    assert nxt is not None and nxt.fairness_key == "b"


def test_soft_cap_prefers_keys_under_it_and_borrows_when_all_are_at_it() -> None:
    queue, clock = make_queue(soft_max_inflight_per_key=1)
    push(queue, clock, "a", 3)
    a1 = queue.pop_next(clock.now)
    assert a1 is not None and a1.fairness_key == "a"
    # a has used much more than b, but b is under the cap: it goes first regardless.
    queue.complete(a1, 10_000)
    a2 = queue.pop_next(clock.now)
    push(queue, clock, "b", 1)
    b1 = queue.pop_next(clock.now)
    assert a2 is not None and b1 is not None and b1.fairness_key == "b"
    # Only a has work left and it is at its cap: a free slot is lent to it (work conserving).
    a3 = queue.pop_next(clock.now)
    assert a3 is not None and a3.fairness_key == "a"
    assert key_entry(queue, clock, "a")["active"] == 2


def test_soft_cap_under_cap_key_wins_even_with_a_higher_score() -> None:
    queue, clock = make_queue(soft_max_inflight_per_key=1)
    push(queue, clock, "a", 2)
    push(queue, clock, "b", 2)
    b_job = None
    for _ in range(2):  # both run once; b is charged far more
        job = queue.pop_next(clock.now)
        assert job is not None
        if job.fairness_key == "b":
            b_job = job
        else:
            queue.complete(job, 1.0)
    assert b_job is not None
    queue.complete(b_job, 5_000)
    a_running = queue.pop_next(clock.now)  # a (lower score) takes one slot
    assert a_running is not None and a_running.fairness_key == "a"
    push(queue, clock, "a", 1)
    nxt = queue.pop_next(clock.now)  # a is at its cap, b is not: b despite its score
    assert nxt is not None and nxt.fairness_key == "b"


def test_new_key_starts_at_the_minimum_active_score() -> None:
    queue, clock = make_queue(soft_max_inflight_per_key=4)
    push(queue, clock, "a", 2)
    push(queue, clock, "b", 2)
    a1, b1 = queue.pop_next(clock.now), queue.pop_next(clock.now)
    assert a1 is not None and b1 is not None
    queue.complete(a1, 100.0)
    queue.complete(b1, 40.0)
    push(queue, clock, "c", 1)
    assert key_entry(queue, clock, "c")["score"] == pytest.approx(40.0), "no windfall, no penalty"
    # with nothing else busy a new key starts at 0
    fresh, clock2 = make_queue()
    push(fresh, clock2, "z", 1)
    assert key_entry(fresh, clock2, "z")["score"] == 0.0


def test_idle_key_keeps_its_score_until_idle_expiry() -> None:
    queue, clock = make_queue(idle_state_ttl_s=10)
    push(queue, clock, "heavy", 1)
    job = queue.pop_next(clock.now)
    assert job is not None
    queue.complete(job, 1_000.0)  # heavy is now idle with 1000 ms of service
    assert queue.snapshot(clock.now)["keys"] == [], "idle keys are not listed"
    push(queue, clock, "light", 1)  # light starts at 0: nothing else was busy
    clock.now += 5
    push(queue, clock, "heavy", 1)  # back within the TTL: its score is remembered
    assert key_entry(queue, clock, "heavy")["score"] == pytest.approx(1_000.0)
    assert serve_one_slot(queue, clock, 2) == ["light", "heavy"]
    clock.now += 10  # both idle past the TTL: forgotten
    push(queue, clock, "heavy", 1)
    assert key_entry(queue, clock, "heavy")["score"] == 0.0
    assert "light" not in {b.key for b in queue._buckets.values()}


def test_returning_key_cannot_bank_its_pause() -> None:
    """A key back from a pause starts no lower than the busy keys' minimum score."""
    queue, clock = make_queue(soft_max_inflight_per_key=4)
    push(queue, clock, "a", 1)
    job = queue.pop_next(clock.now)
    assert job is not None
    queue.complete(job, 10.0)
    push(queue, clock, "b", 3)
    serve_one_slot(queue, clock, 2, service_s=0.5)  # b accumulates 1000 ms while a is idle
    push(queue, clock, "a", 1)
    assert key_entry(queue, clock, "a")["score"] == pytest.approx(key_entry(queue, clock, "b")["score"])


def test_per_key_limit_is_429_fairness_key_queue_full() -> None:
    queue, clock = make_queue(max_pending_per_key=2)
    push(queue, clock, "a", 2)
    with pytest.raises(ApiError) as exc:
        push(queue, clock, "a", 1)
    assert exc.value.status == 429 and exc.value.code == "fairness_key_queue_full"
    assert exc.value.message == "pending queue for fairness key 'a' is full for model 'm'"
    push(queue, clock, None, 2)
    with pytest.raises(ApiError) as exc:
        push(queue, clock, None, 1)
    assert exc.value.message == "pending queue for fairness key 'anonymous' is full for model 'm'"
    snap = queue.snapshot(clock.now)
    assert snap["rejected_per_key_limit"] == 2 and snap["rejected_executor_limit"] == 0
    assert [k["fairness_key"] for k in snap["keys"]] == [None, "a"], "anonymous first"
    assert key_entry(queue, clock, "a")["rejected_per_key_limit"] == 1
    assert len(queue) == 4


def test_executor_limit_is_429_executor_queue_full() -> None:
    queue, clock = make_queue(max_pending_per_executor=3)
    push(queue, clock, "a", 2)
    push(queue, clock, "b", 1)
    with pytest.raises(ApiError) as exc:
        push(queue, clock, "c", 1)
    assert exc.value.status == 429 and exc.value.code == "executor_queue_full"
    assert exc.value.message == "pending queue is full for model 'm'"
    assert queue.snapshot(clock.now)["rejected_executor_limit"] == 1
    queue.pop_next(clock.now)  # a slot frees a place in the queue
    push(queue, clock, "c", 1)


def test_removed_job_is_not_charged_and_cancelled_running_job_is() -> None:
    queue, clock = make_queue()
    a_jobs = push(queue, clock, "a", 2)
    push(queue, clock, "b", 1)
    assert queue.remove(a_jobs[1]) and not queue.remove(a_jobs[1])
    running = queue.pop_next(clock.now)
    assert running is a_jobs[0]
    clock.now += 0.2
    queue.complete(running, 200.0)  # cancelled after 200 ms: charged what it used
    assert queue._buckets["a"].virtual_service_ms == pytest.approx(200.0)
    assert len(queue) == 1


def test_snapshot_fields_and_drain() -> None:
    queue, clock = make_queue(weights={"b": 3.0}, default_weight=0.5)
    push(queue, clock, "b", 2)
    push(queue, clock, None, 1)
    job = queue.pop_next(clock.now)
    assert job is not None
    snap = queue.snapshot(clock.now)
    assert snap["keys"][0] == {"fairness_key": None, "pending": 0 if job.fairness_key is None else 1,
                               "active": 1 if job.fairness_key is None else 0, "weight": 0.5, "score": 0.0,
                               "rejected_per_key_limit": 0, "rejected_executor_limit": 0}
    assert snap["keys"][1]["weight"] == 3.0
    drained = queue.drain()
    assert len(drained) == 2 and len(queue) == 0


def test_many_one_off_keys_are_forgotten_after_the_ttl() -> None:
    """Keys used once (e.g. a key per request) expire oldest first; only keys with work are scanned."""
    queue, clock = make_queue(idle_state_ttl_s=10)
    for i in range(500):
        push(queue, clock, f"once-{i}", 1)
        serve_one_slot(queue, clock, 1, service_s=0.01)
    assert len(queue._buckets) == 500 and not queue._busy
    clock.now = 10 + 2.505  # key i went idle at 0.01 * (i + 1): the first 250 are past the TTL
    push(queue, clock, "new", 1)
    assert len(queue._buckets) == 251 and list(queue._busy) == ["new"]


def test_a_refused_request_creates_no_bucket() -> None:
    """Limit checks come first: a flood of 429'd one-off keys leaves no state behind."""
    queue, clock = make_queue(max_pending_per_executor=2)
    push(queue, clock, "a", 2)
    for i in range(50):
        with pytest.raises(ApiError) as exc:
            push(queue, clock, f"flood-{i}", 1)
        assert exc.value.code == "executor_queue_full"
    assert list(queue._buckets) == ["a"]
    assert queue.snapshot(clock.now)["rejected_executor_limit"] == 50


def test_max_keys_forgets_the_oldest_idle_bucket_first() -> None:
    queue, clock = make_queue(max_keys=3)
    for key in ("a", "b", "c"):
        push(queue, clock, key, 1)
        clock.now += 1
        serve_one_slot(queue, clock, 1)
    push(queue, clock, "b", 1)  # b has work again: a and c are idle, a the oldest
    push(queue, clock, "d", 1)
    assert sorted(queue._buckets) == ["b", "c", "d"]
    push(queue, clock, "e", 1)
    assert sorted(queue._buckets) == ["b", "d", "e"]


def test_max_keys_with_every_bucket_busy_is_429() -> None:
    queue, clock = make_queue(max_keys=2)
    push(queue, clock, "a", 1)
    push(queue, clock, "b", 1)
    with pytest.raises(ApiError) as exc:
        push(queue, clock, "c", 1)
    assert exc.value.status == 429 and exc.value.code == "fairness_keys_exhausted"
    assert exc.value.message == ("too many fairness keys have requests pending or running for model 'm' "
                                 "(limit 2); retry later")
    assert sorted(queue._buckets) == ["a", "b"] and len(queue) == 2
    push(queue, clock, "a", 1)  # known keys still queue
    assert serve_one_slot(queue, clock, 2) == ["a", "b"]  # b is idle now, a still has a job
    push(queue, clock, "c", 1)  # b's bucket makes room
    assert sorted(queue._buckets) == ["a", "c"]


@pytest.mark.parametrize("value", [0, -1, 1.5, "many", True])
def test_max_keys_must_be_a_positive_integer(value: object) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="engine.fairness.max_keys must be an integer greater than 0"):
        FairnessSettings.model_validate({"max_keys": value})
    assert FairnessSettings().max_keys == 10000


def push_grouped(queue: FairQueue, clock: Clock, group: str, keys: list[str | None],
                 weight: float | None = None) -> list[Job]:
    jobs = [Job(model="m", fairness_key=f"{group}:{k}" if k else group, fairness_group=group, fairness_weight=weight)
            for k in keys]
    for job in jobs:
        queue.push(job, clock.now)
    return jobs


def test_rotating_keys_inside_a_group_share_the_group_share() -> None:
    """One API key's client sends every request under a new fairness_key: together they
    get that key's share, not one share each."""
    queue, clock = make_queue()
    push_grouped(queue, clock, "rotator", [f"k{i}" for i in range(20)])
    push(queue, clock, "steady", 20)
    served = Counter("rotator" if (k or "").startswith("rotator") else k for k in serve_one_slot(queue, clock, 20))
    assert served == {"rotator": 10, "steady": 10}


def test_groups_with_weights_two_to_one_and_members_split_fairly() -> None:
    queue, clock = make_queue()
    push_grouped(queue, clock, "gold", ["a"] * 15 + ["b"] * 15, weight=2.0)
    push_grouped(queue, clock, "std", [None] * 20, weight=1.0)
    served = Counter(serve_one_slot(queue, clock, 18))
    assert served["gold:a"] + served["gold:b"] == 12 and served["std"] == 6
    assert served["gold:a"] == served["gold:b"] == 6
    snap = {k["fairness_key"]: k for k in queue.snapshot(clock.now)["keys"]}
    assert snap["gold:a"]["fairness_group"] == "gold" and snap["gold:a"]["weight"] == 2.0


def test_max_pending_per_key_bounds_the_whole_group() -> None:
    queue, clock = make_queue(max_pending_per_key=3)
    push_grouped(queue, clock, "t", ["a", "b", "c"])
    with pytest.raises(ApiError) as err:
        push_grouped(queue, clock, "t", ["d"])
    assert err.value.code == "fairness_key_queue_full" and "'t'" in (err.value.message or "")


def test_an_idle_group_is_forgotten_with_its_last_member() -> None:
    queue, clock = make_queue(idle_state_ttl_s=1)
    (job,) = push_grouped(queue, clock, "t", ["a"])
    serve_one_slot(queue, clock, 1)
    clock.now += 2
    push(queue, clock, "other")
    assert list(queue._buckets) == ["other"] and list(queue._groups) == ["other"]
