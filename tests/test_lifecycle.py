"""Model lifecycle through the admin API: unload with queued and running work,
settings reload, GPU memory on a host without NVIDIA; and field-by-field validation."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import echo_backend
import pytest
from aiohttp.test_utils import TestClient, TestServer

from llmpoold.errors import SettingsError
from llmpoold.http.app import create_app
from llmpoold.http.keys import POOL
from llmpoold.testing import make_registry, settings_from

pytestmark = pytest.mark.timeout(60)


async def test_unload_drains_running_and_refuses_queued(make_client: Any) -> None:
    client = await make_client({"engine": {"backend": "echo", "models": {"slow": {"echo_delay_s": 0.1}}}})
    running = asyncio.create_task(client.post("/v1/responses", json={"model": "slow", "input": "a b c d"}))
    await asyncio.sleep(0.1)
    queued = asyncio.create_task(client.post("/v1/responses", json={"model": "slow", "input": "never runs"}))
    await asyncio.sleep(0.05)
    unload = await client.post("/v1/admin/models/slow/unload")
    assert unload.status == 200
    body = await unload.json()
    assert body["runtime_state"] == "unloaded" and body["is_loaded"] is False and body["loaded_replicas"] == 0
    queued_resp = await queued
    assert queued_resp.status == 409
    assert (await queued_resp.json())["detail"]["code"] == "model_unloading"
    running_resp = await running
    assert running_resp.status == 200 and (await running_resp.json())["output_text"] == "a b c d"
    runtime = next(r for r in reversed(echo_backend.RUNTIMES) if r.replica_id == "slow#1")
    assert runtime.unloaded and "never runs" not in runtime.served


async def test_settings_reload_adds_models_and_reports_conflicts(tmp_path: Path) -> None:
    settings_path = tmp_path / "settings.json"
    data = {"engine": {"backend": "echo", "models": {"a": {}}}}
    settings_path.write_text(json.dumps(data))
    app = create_app(settings_from(data), make_registry(echo_backend), settings_paths=(str(settings_path), None))
    async with TestClient(TestServer(app)) as client:
        await app[POOL].startup_done.wait()
        data["engine"]["models"]["b"] = {"enabled": False}
        settings_path.write_text(json.dumps(data))
        body = await (await client.post("/v1/admin/settings/reload")).json()
        assert body["added_models"] == ["b"] and body["unchanged_models"] == ["a"]
        assert body["service_restart_required"] is False
        assert (await client.post("/v1/admin/models/b/load")).status == 200
        # The worker policy is fixed at start: changing it is reported as needing a restart.
        data["engine"]["workers"] = {"restart_max": 9}
        settings_path.write_text(json.dumps(data))
        body = await (await client.post("/v1/admin/settings/reload")).json()
        assert body["service_restart_required"] is True
        # Changing an active model's settings is a conflict and changes nothing.
        data["engine"]["models"]["a"] = {"echo_delay_s": 1.0}
        settings_path.write_text(json.dumps(data))
        resp = await client.post("/v1/admin/settings/reload")
        assert resp.status == 409
        detail = (await resp.json())["detail"]
        assert detail["code"] == "settings_reload_conflict" and detail["conflicts"] == ["engine.models.a"]
        settings_path.write_text("{broken")
        resp = await client.post("/v1/admin/settings/reload")
        assert resp.status == 400 and (await resp.json())["detail"]["code"] == "invalid_settings"
        resp = await client.post("/v1/responses", json={"model": "a", "input": "still here"})
        assert (await resp.json())["output_text"] == "still here"


async def test_gpu_memory_without_nvidia_is_not_a_500(client: Any) -> None:
    resp = await client.get("/v1/admin/gpu-memory")
    assert resp.status == 200
    body = await resp.json()
    assert isinstance(body["gpus"], list)
    if not body["gpus"]:
        assert body["error"], "an empty GPU list comes with the reason"
    assert {m["name"] for m in body["models"]} == {"echo", "slow", "off"}


WRONG_TYPES = [
    ("model", 5), ("model", ""), ("input", 5), ("input", {"a": 1}), ("messages", "hi"),
    ("messages", [{"role": "robot", "content": "x"}]), ("instructions", []), ("fairness_key", 7),
    ("fairness_key", "   "), ("source_lang_code", 1), ("target_lang_code", []), ("allow_remote", "maybe"),
    ("stream", "yes please"), ("thinking", "sometimes"), ("reasoning_effort", ""), ("queue_timeout_s", -1),
    ("decoding", "greedy"), ("decoding", {"temperature": "hot"}), ("decoding", {"top_p": 0}),
    ("decoding", {"top_k": 0}), ("decoding", {"max_tokens": 0}), ("decoding", {"beam_size": 99}),
    ("decoding", {"repetition_penalty": -1}), ("decoding", {"stop": 5}),
]


@pytest.mark.parametrize(("field", "value"), WRONG_TYPES, ids=[f"{f}={v!r}" for f, v in WRONG_TYPES])
async def test_wrong_type_in_each_field_is_a_422_naming_the_field(client: Any, field: str, value: Any) -> None:
    body: dict[str, Any] = {"model": "echo", "input": "x"}
    body[field] = value
    resp = await client.post("/v1/responses", json=body)
    assert resp.status == 422, await resp.text()
    detail = (await resp.json())["detail"]
    assert any(err["loc"][:2] == ["body", field] or err["loc"] == ["body"] for err in detail), detail


async def test_huge_garbage_body_is_a_clean_4xx(client: Any) -> None:
    resp = await client.post("/v1/responses", data=b"\xff\xfe" * (10 * 1024 * 1024),
                             headers={"Content-Type": "application/json"})
    assert resp.status == 413
    resp = await client.post("/v1/responses", data=b"\xff\xfe\x00garbage", headers={"Content-Type": "application/json"})
    assert resp.status == 400 and (await resp.json())["detail"]["code"] == "invalid_json"


# ----- a lifecycle that always settles (issue 18) --------------------------------------------


async def _admin_model(client: Any, name: str) -> dict[str, Any]:
    resp = await client.get("/v1/admin/models")
    assert resp.status == 200, await resp.text()
    return next(m for m in (await resp.json())["models"] if m["name"] == name)


async def _wait_state(client: Any, name: str, state: str, within_s: float = 10.0) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while True:
        entry = await _admin_model(client, name)
        if entry["runtime_state"] == state or loop.time() > deadline:
            assert entry["runtime_state"] == state, entry
            return entry
        await asyncio.sleep(0.05)


async def test_load_finishes_when_the_client_gives_up(make_client: Any) -> None:
    """POST .../load with a 0.3 s client timeout: the load goes on and settles `loaded`
    (it used to be cancelled with the handler and stay `loading` for good)."""
    client = await make_client({"engine": {"backend": "echo", "models": {
        "later": {"enabled": False, "echo_load_delay_s": 1.0}}}})
    with pytest.raises(TimeoutError):
        await client.post("/v1/admin/models/later/load", timeout=aiohttp.ClientTimeout(total=0.3))
    assert (await _admin_model(client, "later"))["runtime_state"] == "loading"
    await _wait_state(client, "later", "loaded")
    resp = await client.post("/v1/responses", json={"model": "later", "input": "here now"})
    assert (await resp.json())["output_text"] == "here now"


async def test_failed_load_settles_failed_when_the_client_gives_up(make_client: Any) -> None:
    client = await make_client({"engine": {"backend": "echo", "models": {
        "broken": {"enabled": False, "echo_load_delay_s": 0.6, "echo_fail_load": "weights are corrupt"}}}})
    with pytest.raises(TimeoutError):
        await client.post("/v1/admin/models/broken/load", timeout=aiohttp.ClientTimeout(total=0.3))
    entry = await _wait_state(client, "broken", "failed")
    assert "weights are corrupt" in entry["last_error"]


async def test_unload_drains_with_a_timeout_then_stops_what_runs(make_client: Any) -> None:
    """The unload goes on when its client leaves; requests still running after
    engine.unload_drain_timeout_s are stopped with 503 model_unloaded (JSON and SSE)."""
    client = await make_client({"engine": {"backend": "echo", "unload_drain_timeout_s": 0.5, "models": {
        "slow": {"echo_delay_s": 0.2, "echo_concurrency": 2, "target_inflight": 2}}}})
    words = " ".join(f"w{i}" for i in range(40))  # ~8 s of output
    plain = asyncio.create_task(client.post("/v1/responses", json={"model": "slow", "input": words}))
    streamed = asyncio.create_task(client.post("/v1/responses", json={"model": "slow", "input": words,
                                                                       "stream": True}))
    await asyncio.sleep(0.3)
    started = asyncio.get_running_loop().time()
    with pytest.raises(TimeoutError):
        await client.post("/v1/admin/models/slow/unload", timeout=aiohttp.ClientTimeout(total=0.3))
    await _wait_state(client, "slow", "unloaded", within_s=5.0)
    assert asyncio.get_running_loop().time() - started < 4.0
    resp = await plain
    assert resp.status == 503
    detail = (await resp.json())["detail"]
    assert detail["code"] == "model_unloaded" and "engine.unload_drain_timeout_s" in detail["message"]
    stream = await (await streamed).text()
    assert "event: error" in stream and "model_unloaded" in stream
    assert "response.completed" not in stream


async def test_one_model_raising_anything_fails_alone(make_client: Any) -> None:
    """A plugin raising a plain exception for one model at start: that model is `failed`
    with the reason, the next one still loads, and the admin listing answers."""
    client = await make_client({"engine": {"backend": "echo", "models": {
        "bad": {"echo_fail_traits": True}, "good": {}}}})
    resp = await client.get("/v1/admin/models")
    assert resp.status == 200, await resp.text()
    models = {m["name"]: m for m in (await resp.json())["models"]}
    assert models["bad"]["runtime_state"] == "failed"
    assert "echo traits exploded" in models["bad"]["last_error"]
    assert models["good"]["runtime_state"] == "loaded"
    resp = await client.post("/v1/responses", json={"model": "good", "input": "still fine"})
    assert (await resp.json())["output_text"] == "still fine"


def test_unload_drain_timeout_is_validated() -> None:
    for bad in (0, -1, "soon", float("inf")):
        with pytest.raises(SettingsError, match="unload_drain_timeout_s"):
            settings_from({"engine": {"unload_drain_timeout_s": bad}})


async def test_on_demand_wait_counts_against_queue_timeout_and_the_load_goes_on(make_client: Any) -> None:
    client = await make_client({"engine": {"backend": "echo", "models": {
        "lazy": {"enabled": False, "on_demand": True, "echo_load_delay_s": 1.0},
        "manual": {"enabled": False}}}})
    resp = await client.post("/v1/responses", json={"model": "lazy", "input": "hi", "queue_timeout_s": 0.3})
    assert resp.status == 503 and (await resp.json())["detail"]["code"] == "queue_timeout"
    entry = await _admin_model(client, "lazy")
    assert entry["runtime_state"] == "loading" and entry["loading_since"] and entry["on_demand"] is True
    await _wait_state(client, "lazy", "loaded")
    resp = await client.post("/v1/responses", json={"model": "lazy", "input": "now fast"})
    assert (await resp.json())["output_text"] == "now fast"
    # Not on demand (the default): the seed's 409 stays.
    resp = await client.post("/v1/responses", json={"model": "manual", "input": "hi"})
    assert resp.status == 409 and (await resp.json())["detail"]["code"] == "model_not_loaded"


def test_lifecycle_settings_are_validated() -> None:
    for engine in ({"idle_ttl_s": 0}, {"memory": {"ram_budget_mib": -5}}, {"memory": {"vram_budget_mib": {"0": 0}}},
                   {"memory": {"min_residency_s": -1}}, {"memory": {"drain_timeout_s": 0}},
                   {"memory": {"evict_busy": "sometimes"}}):
        with pytest.raises(SettingsError):
            settings_from({"engine": {"backend": "echo", **engine}})
    # A bad per-model key fails only that model (issue 13), naming the key.
    for key, value in (("idle_ttl_s", -1), ("pinned", "yes please")):
        models = settings_from({"engine": {"backend": "echo", "models": {"m": {key: value}, "ok": {}}}}).engine.models
        assert models["m"].error is not None and f"engine.models.m.{key}" in models["m"].error
        assert models["ok"].error is None
