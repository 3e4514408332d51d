"""GET /metrics: Prometheus text that parses, moves with traffic, and is per app."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from llmpoold.http.keys import POOL

pytestmark = pytest.mark.timeout(60)


async def scrape(client: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    resp = await client.get("/metrics")
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(await resp.text()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_metrics_move_with_requests(make_client: Any) -> None:
    client = await make_client({
        "service": {"api_keys": ["k"], "admin_api_key": "root"},
        "engine": {"backend": "echo", "fairness": {"max_pending_per_key": 1},
                   "models": {"echo": {}, "slow": {"echo_delay_s": 0.05}, "off": {"enabled": False}}}})
    auth = {"Authorization": "Bearer k"}
    before = await scrape(client)  # open without a key
    assert value(before, "llmpool_model_state", model="echo", state="loaded") == 1
    assert value(before, "llmpool_model_state", model="off", state="unloaded") == 1
    assert value(before, "llmpool_model_state", model="off", state="loaded") == 0
    assert value(before, "llmpool_replica_slots", model="echo", replica="echo#1") == 1

    for _ in range(2):
        resp = await client.post("/v1/responses", json={"model": "echo", "input": "one two three"}, headers=auth)
        assert resp.status == 200
    running = asyncio.create_task(client.post(
        "/v1/responses", json={"model": "slow", "input": "a b c d e f", "fairness_key": "x"}, headers=auth))
    sched = client.server.app[POOL].entries["slow"].scheduler
    while sched.runtime_inflight == 0:
        await asyncio.sleep(0.005)
    queued = asyncio.create_task(client.post(
        "/v1/responses", json={"model": "slow", "input": "g", "fairness_key": "x"}, headers=auth))
    while sched.queue_depth == 0:
        await asyncio.sleep(0.005)
    full = await client.post("/v1/responses", json={"model": "slow", "input": "h", "fairness_key": "x"},
                             headers=auth)
    assert full.status == 429
    during = await scrape(client)
    assert value(during, "llmpool_queue_depth", model="slow") == 1
    assert value(during, "llmpool_inflight_requests", model="slow") == 2
    assert value(during, "llmpool_replica_inflight", model="slow", replica="slow#1") == 1
    await asyncio.gather(running, queued)
    unknown = await client.post("/v1/responses", json={"model": "nope", "input": "x"}, headers=auth)
    assert unknown.status == 404

    after = await scrape(client)
    assert value(after, "llmpool_requests_total", model="echo", outcome="ok") == 2
    assert value(after, "llmpool_requests_total", model="slow", outcome="ok") == 2
    assert value(after, "llmpool_requests_total", model="slow", outcome="rejected") == 1
    assert value(after, "llmpool_rejected_requests_total", model="slow", reason="fairness_key_queue_full") == 1
    assert not any(labels and dict(labels).get("model") == "nope" for _, labels in after), "no label per typo"
    assert value(after, "llmpool_output_tokens_total", model="echo") == 6
    assert value(after, "llmpool_queue_wait_seconds_count", model="slow") == 2
    assert value(after, "llmpool_time_to_first_token_seconds_count", model="echo") == 2
    assert value(after, "llmpool_request_duration_seconds_count", model="slow") == 2
    assert value(after, "llmpool_request_duration_seconds_sum", model="slow") >= 0.3
    assert value(after, "llmpool_queue_depth", model="slow") == 0
    assert value(after, "llmpool_replica_inflight", model="slow", replica="slow#1") == 0


async def test_cancelled_and_unloaded_outcomes(make_client: Any) -> None:
    client = await make_client({"engine": {"backend": "echo", "models": {"slow": {"echo_delay_s": 0.05}}}})
    resp = await client.post("/v1/responses", json={"model": "slow", "input": " ".join(["w"] * 100),
                                                     "stream": True})
    await resp.content.readline()
    resp.close()
    sched = client.server.app[POOL].entries["slow"].scheduler
    for _ in range(200):
        if value(await scrape(client), "llmpool_requests_total", model="slow", outcome="cancelled"):
            break
        await asyncio.sleep(0.02)
    while sched.runtime_inflight:
        await asyncio.sleep(0.01)
    await client.post("/v1/admin/models/slow/unload")
    resp = await client.post("/v1/responses", json={"model": "slow", "input": "x"})
    assert resp.status == 409
    samples = await scrape(client)
    assert value(samples, "llmpool_requests_total", model="slow", outcome="cancelled") == 1
    assert value(samples, "llmpool_rejected_requests_total", model="slow", reason="model_not_loaded") == 1
    assert value(samples, "llmpool_model_state", model="slow", state="unloaded") == 1
    assert not any(name == "llmpool_replica_inflight" for name, _ in samples)


async def test_two_apps_have_separate_registries(make_client: Any) -> None:
    settings = {"engine": {"backend": "echo", "models": {"echo": {}}}}
    first, second = await make_client(settings), await make_client(settings)
    assert (await first.post("/v1/responses", json={"model": "echo", "input": "hi"})).status == 200
    assert value(await scrape(first), "llmpool_requests_total", model="echo", outcome="ok") == 1
    assert value(await scrape(second), "llmpool_requests_total", model="echo", outcome="ok") == 0
