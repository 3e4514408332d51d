"""Model lifecycle through the admin API: unload with queued and running work,
settings reload, GPU memory on a host without NVIDIA; and field-by-field validation."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import echo_backend
import pytest
from aiohttp.test_utils import TestClient, TestServer

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
