"""The exllamav3 plugin behind the daemon's HTTP API, with the FAKE exllamav3
(``fake_exllamav3.py``) in the daemon process (``isolation: inline``)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from llmpoold.http.app import create_app
from llmpoold.http.keys import POOL
from llmpoold.testing import make_registry, settings_from, sse_events


@pytest.fixture
async def client(aiohttp_client: Any, fake_exl3: ModuleType, exl3_model_dir: Path) -> Any:
    settings = settings_from({"engine": {"models": {"exl": {
        "backend": "exl3", "model_path": str(exl3_model_dir), "isolation": "inline", "prompt_format": "generic",
        "exllama_cache_size": 1024, "exllama_max_batch_size": 3, "target_inflight": 3}}}})
    app = create_app(settings, make_registry("exllamav3"))
    test_client = await aiohttp_client(app, server_kwargs={"handler_cancellation": True})
    await app[POOL].startup_done.wait()
    return test_client


async def test_response_and_stream_through_the_api(client: Any, fake_exl3: ModuleType) -> None:
    fake_exl3.RESPONDER = lambda prompt: ["Hallo", " wereld", "!"]
    resp = await client.post("/v1/responses", json={"model": "exl", "input": "Hello world"})
    body = await resp.json()
    assert resp.status == 200, body
    assert body["output_text"] == "Hallo wereld!"
    assert body["metrics"]["engine_output_tokens"] == 4 and body["metrics"]["engine_finish_reason"] == "stop"
    resp = await client.post("/v1/responses", json={"model": "exl", "input": "Hello world", "stream": True})
    events = sse_events(await resp.text())
    assert [d["delta"] for n, d in events if n == "response.output_text.delta"] == ["Hallo", " wereld", "!"]
    assert events[-1][0] == "response.completed"


async def test_admin_shows_the_seed_fields_and_batch_concurrency(client: Any) -> None:
    models = {m["name"]: m for m in (await (await client.get("/v1/admin/models")).json())["models"]}
    entry = models["exl"]
    assert entry["runtime_state"] == "loaded" and entry["resolved_backend"] == "exllamav3"
    assert entry["definition"]["exllama_cache_size"] == 1024 and entry["definition"]["exllama_cache_quant"] is None
    assert entry["load_constraints"]["exllama_cache_size"] == {"kind": "integer", "minimum": 256, "step": 256}
    assert "exllama_cache_bit_pairs" in entry["load_recommendations"]
    assert entry["vram_estimate_mib"] is not None


async def test_requests_run_together_up_to_the_batch_size(client: Any, fake_exl3: ModuleType) -> None:
    """The scheduler sends a replica min(target_inflight, exllama_max_batch_size) requests."""
    fake_exl3.STEP_DELAY = 0.01
    payload = {"model": "exl", "input": "Count", "decoding": {"max_tokens": 8}}
    responses = await asyncio.gather(*(client.post("/v1/responses", json=payload) for _ in range(3)))
    assert all(r.status == 200 for r in responses)
    assert max(len(step) for step in fake_exl3.ITERATIONS) == 3  # all three in one generator step
    entry = (await (await client.get("/v1/admin/models")).json())["models"][0]
    assert entry["effective_target_inflight"] == 3


async def test_admin_load_with_cache_bits_override(client: Any, fake_exl3: ModuleType) -> None:
    assert (await client.post("/v1/admin/models/exl/unload")).status == 200
    resp = await client.post("/v1/admin/models/exl/load",
                             json={"exllama_cache_k_bits": 8, "exllama_cache_v_bits": 4, "exllama_cache_size": 2048})
    body = await resp.json()
    assert resp.status == 200, body
    assert body["load_override"] == {"exllama_cache_quant": "8,4", "exllama_cache_size": 2048}
    cache = fake_exl3.calls("Cache")[-1]
    assert (cache["k_bits"], cache["v_bits"], cache["max_num_tokens"]) == (8, 4, 2048)
    assert (await client.post("/v1/admin/models/exl/unload")).status == 200
    for bad, message in (({"exllama_cache_size": 8000}, "positive multiple of 256"),
                         ({"exllama_cache_quant": "fp16"}, "exllama_cache_quant must be"),
                         ({"exllama_cache_k_bits": 8}, "must be provided together"),
                         ({"gguf_n_ctx": 512}, "unsupported load override for exllamav3 backend: gguf_n_ctx")):
        resp = await client.post("/v1/admin/models/exl/load", json=bad)
        detail = (await resp.json())["detail"]
        assert resp.status == 400 and message in detail["message"], detail
