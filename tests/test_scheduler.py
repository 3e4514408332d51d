"""ModelScheduler (routing, deadlines, cancellation, Retry-After) on its own, then the
fair queue, limits, deadlines and disconnects through HTTP with the echo test backend."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import echo_backend
import pytest
import structlog

from llmpoold.config import FairnessSettings
from llmpoold.errors import ApiError
from llmpoold.fairness import FairQueue
from llmpoold.http.keys import POOL
from llmpoold.scheduler import Job, ModelScheduler

pytestmark = pytest.mark.timeout(60)


@dataclass(eq=False)
class SlotOnlyReplica:
    """Stands in for a replica where only scheduling is under test (never streamed)."""

    replica_id: str
    concurrency: int = 1
    accepting: bool = True


def make_scheduler(*concurrency: int, target: int = 1, **fairness: Any) -> ModelScheduler:
    replicas = [SlotOnlyReplica(f"m#{i + 1}", c) for i, c in enumerate(concurrency)]
    queue = FairQueue("m", FairnessSettings.model_validate(fairness))
    return ModelScheduler("m", replicas, target_inflight=target, queue=queue)  # type: ignore[arg-type]


async def until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)


# ----- the scheduler on its own -------------------------------------------------------------


async def test_routing_fewest_inflight_then_round_robin() -> None:
    sched = make_scheduler(1, 1, 1)
    leases = [await sched.acquire(Job(model="m")) for _ in range(3)]
    assert [lease.replica_index for lease in leases] == [0, 1, 2]
    waiting = asyncio.create_task(sched.acquire(Job(model="m")))
    await asyncio.sleep(0.01)
    assert not waiting.done() and sched.queue_depth == 1
    sched.release(leases[1], service_ms=5.0)
    assert (await waiting).replica_index == 1
    for lease in (leases[0], leases[2], waiting.result()):
        sched.release(lease, service_ms=5.0)
    order = []
    for _ in range(4):  # all idle: ties rotate
        lease = await sched.acquire(Job(model="m"))
        order.append(lease.replica_index)
        sched.release(lease, service_ms=1.0)
    assert sorted(order[:3]) == [0, 1, 2] and order[3] == order[0]


async def test_batching_replica_gets_several_simple_one_gets_one() -> None:
    sched = make_scheduler(4, 1, target=4)
    assert sched.replica_target(0) == 4 and sched.replica_target(1) == 1
    assert sched.effective_target_inflight == 1 and sched.slots == 5
    leases = [await sched.acquire(Job(model="m")) for _ in range(5)]
    assert sorted(lease.replica_index for lease in leases) == [0, 0, 0, 0, 1]
    assert sched.inflight == [4, 1] and sched.runtime_inflight == 5
    extra = asyncio.create_task(sched.acquire(Job(model="m")))
    await asyncio.sleep(0.01)
    assert not extra.done()
    extra.cancel()


async def test_deadline_is_503_with_retry_after_and_never_leased() -> None:
    sched = make_scheduler(1)
    held = await sched.acquire(Job(model="m"))
    job = Job(model="m", fairness_key="late")
    with pytest.raises(ApiError) as exc:
        await sched.acquire(job, timeout_s=0.05)
    assert exc.value.status == 503 and exc.value.code == "queue_timeout"
    assert int(exc.value.headers["Retry-After"]) >= 1
    assert sched.queue_depth == 0
    sched.release(held, service_ms=1.0)
    assert sched.runtime_inflight == 0, "the expired job was not handed the freed slot"


async def test_cancel_while_queued_leaves_the_queue_uncharged() -> None:
    sched = make_scheduler(1)
    held = await sched.acquire(Job(model="m", fairness_key="a"))
    waiter = asyncio.create_task(sched.acquire(Job(model="m", fairness_key="b")))
    await until(lambda: sched.queue_depth == 1)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert sched.queue_depth == 0
    assert [k["fairness_key"] for k in sched.snapshot()["keys"]] == ["a"]
    sched.release(held, service_ms=250.0)
    assert sched.runtime_inflight == 0
    assert sched.queue._buckets["a"].virtual_service_ms == pytest.approx(250.0)  # type: ignore[attr-defined]
    await asyncio.wait_for(sched.wait_idle(), 1)


async def test_queue_full_retry_after_comes_from_recent_service_times() -> None:
    sched = make_scheduler(1, max_pending_per_executor=2, max_pending_per_key=1)
    for _ in range(2):  # two finished jobs of 3 s each
        sched.release(await sched.acquire(Job(model="m")), service_ms=3000.0)
    held = await sched.acquire(Job(model="m", fairness_key="x"))
    waiters = [asyncio.create_task(sched.acquire(Job(model="m", fairness_key=k))) for k in ("a", "b")]
    await until(lambda: sched.queue_depth == 2)
    with pytest.raises(ApiError) as exc:
        await sched.acquire(Job(model="m", fairness_key="c"))
    assert exc.value.code == "executor_queue_full"
    # 2 waiting + 1 running, 3 s each, one slot
    assert exc.value.headers["Retry-After"] == str(math.ceil(3 * 3.0))
    with pytest.raises(ApiError) as exc:
        await sched.acquire(Job(model="m", fairness_key="a"))
    assert exc.value.code == "fairness_key_queue_full" and "Retry-After" in exc.value.headers
    snap = sched.snapshot()
    assert snap["rejected_executor_limit"] == 1 and snap["rejected_per_key_limit"] == 1
    for task in waiters:
        task.cancel()
    sched.release(held, service_ms=1.0)


# ----- through HTTP ------------------------------------------------------------------------


def _settings(**model: Any) -> dict[str, Any]:
    fairness = model.pop("fairness", {})
    return {"engine": {"backend": "echo", "fairness": fairness,
                       "models": {"slow": {"echo_delay_s": 0.03, **model}}}}


def _post(client: Any, rid: str, key: str | None = None, words: int = 4, **extra: Any) -> asyncio.Task[Any]:
    body = {"model": "slow", "input": " ".join(f"w{i}" for i in range(words)), **extra}
    if key is not None:
        body["fairness_key"] = key
    return asyncio.create_task(client.post("/v1/responses", json=body, headers={"X-Request-Id": rid}))


async def test_http_equal_keys_are_interleaved(make_client: Any) -> None:
    client = await make_client(_settings())
    entry = client.server.app[POOL].entries["slow"]
    runtime, sched = entry.replicas[0].runtime, entry.scheduler
    tasks = [_post(client, "a1", "a", words=6)]
    await until(lambda: sched.runtime_inflight == 1)
    for n, (rid, key) in enumerate([("a2", "a"), ("a3", "a"), ("a4", "a"), ("b1", "b"), ("b2", "b")], 1):
        tasks.append(_post(client, rid, key))
        await until(lambda n=n: sched.queue_depth == n)
    admin = {m["name"]: m for m in (await (await client.get("/v1/admin/models")).json())["models"]}["slow"]
    assert admin["queue_depth"] == 5 and admin["runtime_inflight"] == 1 and admin["inflight_requests"] == 6
    keys = {k["fairness_key"]: k for k in admin["fairness"]["keys"]}
    assert keys["a"]["pending"] == 3 and keys["a"]["active"] == 1 and keys["b"]["pending"] == 2
    responses = await asyncio.gather(*tasks)
    assert all(r.status == 200 for r in responses)
    # FIFO would serve a1 a2 a3 a4 b1 b2; the fair queue lets b in at once and alternates.
    assert runtime.served[:4] in (["a1", "b1", "a2", "b2"], ["a1", "b1", "b2", "a2"])


async def test_http_queue_limits_are_429_with_retry_after(make_client: Any) -> None:
    client = await make_client(_settings(fairness={"max_pending_per_key": 1, "max_pending_per_executor": 2}))
    sched = client.server.app[POOL].entries["slow"].scheduler
    tasks = [_post(client, "r0", "a")]
    await until(lambda: sched.runtime_inflight == 1)
    tasks.append(_post(client, "r1", "a"))
    await until(lambda: sched.queue_depth == 1)
    resp = await client.post("/v1/responses", json={"model": "slow", "input": "x", "fairness_key": "a"})
    assert resp.status == 429 and int(resp.headers["Retry-After"]) >= 1
    assert (await resp.json())["detail"] == {
        "code": "fairness_key_queue_full", "model": "slow",
        "message": "pending queue for fairness key 'a' is full for model 'slow'"}
    tasks.append(_post(client, "r2", "b"))
    await until(lambda: sched.queue_depth == 2)
    resp = await client.post("/v1/responses", json={"model": "slow", "input": "x"})
    assert resp.status == 429 and "Retry-After" in resp.headers
    assert (await resp.json())["detail"]["code"] == "executor_queue_full"
    assert all(r.status == 200 for r in await asyncio.gather(*tasks))
    admin = (await (await client.get("/v1/admin/models")).json())["models"][0]
    assert admin["fairness"] == {"rejected_per_key_limit": 1, "rejected_executor_limit": 1, "keys": []}


async def test_http_queue_deadline_is_503_and_never_reaches_the_runtime(make_client: Any) -> None:
    client = await make_client(_settings(queue_timeout_s=30))
    entry = client.server.app[POOL].entries["slow"]
    runtime, sched = entry.replicas[0].runtime, entry.scheduler
    first = _post(client, "busy", words=8)
    await until(lambda: sched.runtime_inflight == 1)
    resp = await client.post("/v1/responses", json={"model": "slow", "input": "x y", "queue_timeout_s": 0.05},
                             headers={"X-Request-Id": "expired"})
    assert resp.status == 503 and int(resp.headers["Retry-After"]) >= 1
    assert (await resp.json())["detail"]["code"] == "queue_timeout"
    assert sched.queue_depth == 0
    assert (await first).status == 200
    assert "expired" not in runtime.served + runtime.cancelled


async def test_http_model_default_queue_deadline(make_client: Any) -> None:
    client = await make_client(_settings(queue_timeout_s=0.05))
    sched = client.server.app[POOL].entries["slow"].scheduler
    first = _post(client, "busy", words=6)
    await until(lambda: sched.runtime_inflight == 1)
    resp = await client.post("/v1/responses", json={"model": "slow", "input": "x", "stream": True})
    assert resp.status == 503 and (await resp.json())["detail"]["code"] == "queue_timeout"
    assert (await first).status == 200


def _inference_lines(logs: list[dict[str, Any]]) -> list[tuple[int, str | None]]:
    return [(e["status"], e.get("error")) for e in logs if e["event"] == "inference"]


@pytest.mark.parametrize("stream", [False, True])
async def test_http_disconnect_while_queued_removes_the_job(make_client: Any, stream: bool) -> None:
    client = await make_client(_settings())
    entry = client.server.app[POOL].entries["slow"]
    runtime, sched = entry.replicas[0].runtime, entry.scheduler
    first = _post(client, "running", "a", words=8)
    await until(lambda: sched.runtime_inflight == 1)
    queued = _post(client, "gone", "b", stream=stream)
    await until(lambda: sched.queue_depth == 1)
    with structlog.testing.capture_logs() as logs:
        queued.cancel()
        await until(lambda: sched.queue_depth == 0 and entry.inflight_requests == 1)
    assert _inference_lines(logs) == [(499, "client_disconnected")]  # every request gets its line
    assert [k["fairness_key"] for k in sched.snapshot()["keys"]] == ["a"]
    assert (await first).status == 200
    await until(lambda: sched.runtime_inflight == 0)
    assert "gone" not in runtime.served + runtime.cancelled


@pytest.mark.parametrize("stream", [False, True])
async def test_http_disconnect_while_running_cancels_and_charges(make_client: Any, stream: bool) -> None:
    client = await make_client(_settings())
    entry = client.server.app[POOL].entries["slow"]
    runtime, sched = entry.replicas[0].runtime, entry.scheduler
    assert isinstance(runtime, echo_backend.EchoRuntime)
    with structlog.testing.capture_logs() as logs:
        if stream:
            resp = await client.post("/v1/responses", headers={"X-Request-Id": "dropped"},
                                     json={"model": "slow", "input": " ".join(["w"] * 200), "stream": True,
                                           "fairness_key": "k"})
            await resp.content.readline()
            await asyncio.sleep(0.1)
            resp.close()
        else:
            task = _post(client, "dropped", "k", words=200)
            await until(lambda: runtime.active == 1)
            await asyncio.sleep(0.1)
            task.cancel()
        await until(lambda: "dropped" in runtime.cancelled and runtime.active == 0)
        await until(lambda: bool(_inference_lines(logs)))
    assert _inference_lines(logs) == [(499, "client_disconnected")]
    await until(lambda: sched.runtime_inflight == 0 and entry.inflight_requests == 0)
    # charged for the time it actually held the replica (≥ the 0.1 s it ran), not 0
    assert sched.queue._buckets["k"].virtual_service_ms >= 90
    resp = await client.post("/v1/responses", json={"model": "slow", "input": "next one"})
    assert (await resp.json())["output_text"] == "next one"


async def test_http_batching_runtime_gets_several_simple_one_gets_one(make_client: Any) -> None:
    client = await make_client({"engine": {"backend": "echo", "models": {
        "simple": {"echo_delay_s": 0.02, "target_inflight": 4},
        "batched": {"echo_delay_s": 0.02, "target_inflight": 3, "echo_concurrency": 8}}}})
    pool = client.server.app[POOL]
    body = {"input": "a b c d"}
    results = await asyncio.gather(*(client.post("/v1/responses", json={"model": m, **body})
                                     for m in ("simple", "batched") for _ in range(6)))
    assert all(r.status == 200 for r in results)
    assert pool.entries["simple"].replicas[0].runtime.max_active == 1
    assert pool.entries["batched"].replicas[0].runtime.max_active == 3
    admin = {m["name"]: m for m in (await (await client.get("/v1/admin/models")).json())["models"]}
    assert (admin["simple"]["configured_target_inflight"], admin["simple"]["effective_target_inflight"]) == (4, 1)
    assert (admin["batched"]["configured_target_inflight"], admin["batched"]["effective_target_inflight"]) == (3, 3)
    assert admin["batched"]["queue_depth"] == 0 and admin["batched"]["runtime_inflight"] == 0
