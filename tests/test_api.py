"""The seed's HTTP surface, end to end through aiohttp, with the echo test backend."""

from __future__ import annotations

import asyncio
from typing import Any

import echo_backend
import pytest
import structlog

from llmpoold.http.keys import POOL
from llmpoold.testing import sse_events

pytestmark = pytest.mark.timeout(60)




async def test_json_response_has_text_and_seed_metrics(client: Any) -> None:
    resp = await client.post("/v1/responses", json={"model": "echo", "input": "one two three"})
    assert resp.status == 200
    body = await resp.json()
    assert body["output_text"] == "one two three"
    assert body["output"] == [{"type": "output_text", "text": "one two three"}]
    assert body["object"] == "response" and body["id"].startswith("resp_")
    metrics = body["metrics"]
    assert metrics["engine_output_tokens"] == 3 and metrics["engine_prompt_tokens"] == 3
    assert metrics["engine_finish_reason"] == "stop"
    assert metrics["pool_total_wall_ms"] >= metrics["engine_total_wall_ms"] > 0
    assert resp.headers["X-Request-Id"]


async def test_stream_events_in_order(client: Any) -> None:
    resp = await client.post("/v1/responses", json={"model": "slow", "input": "a b c", "stream": True})
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
    events = sse_events(await resp.text())
    names = [name for name, _ in events]
    assert names == ["response.created", "response.output_text.delta", "response.output_text.delta",
                     "response.output_text.delta", "response.metrics", "response.completed"]
    assert "".join(d["delta"] for n, d in events if n.endswith(".delta")) == "a b c"
    assert events[-1][1]["output_text"] == "a b c"


async def test_stream_error_mid_way_ends_with_error_event(make_client: Any) -> None:
    client = await make_client({"engine": {"backend": "echo", "models": {"bad": {"echo_fail_after": 1}}}})
    resp = await client.post("/v1/responses", json={"model": "bad", "input": "a b c", "stream": True})
    events = sse_events(await resp.text())
    assert [n for n, _ in events] == ["response.created", "response.output_text.delta", "error"]
    assert events[-1][1]["error"]["code"] == "echo_failed"


async def test_max_tokens_limits_output(client: Any) -> None:
    resp = await client.post("/v1/responses", json={"model": "echo", "input": "a b c d e",
                                                    "decoding": {"max_tokens": 2}})
    body = await resp.json()
    assert body["output_text"] == "a b"
    assert body["metrics"]["engine_finish_reason"] == "length"


@pytest.mark.parametrize(("payload", "status", "code"), [
    ({"model": "nope", "input": "x"}, 404, "unknown_model"),
    ({"model": "off", "input": "x"}, 409, "model_not_loaded"),
])
async def test_model_errors_use_the_envelope(client: Any, payload: dict, status: int, code: str) -> None:
    resp = await client.post("/v1/responses", json=payload)
    assert resp.status == status
    detail = (await resp.json())["detail"]
    assert detail["code"] == code and detail["model"] == payload["model"]


async def test_malformed_bodies_get_clear_errors(client: Any) -> None:
    resp = await client.post("/v1/responses", data=b"{not json", headers={"Content-Type": "application/json"})
    assert resp.status == 400 and (await resp.json())["detail"]["code"] == "invalid_json"
    resp = await client.post("/v1/responses", data=b"hello", headers={"Content-Type": "text/plain"})
    assert resp.status == 415
    resp = await client.post("/v1/responses", json=[1, 2])
    assert resp.status == 422
    with structlog.testing.capture_logs() as logs:
        resp = await client.post("/v1/responses", json={"model": "echo", "input": "x",
                                                        "decoding": {"max_tokens": "many"}})
    assert resp.status == 422
    assert [(e["model"], e["status"]) for e in logs if e["event"] == "inference"] == [("echo", 422)]
    detail = (await resp.json())["detail"]
    assert detail[0]["loc"] == ["body", "decoding", "max_tokens"]
    resp = await client.post("/v1/responses", json={"model": "echo"})
    assert resp.status == 422
    # Unknown fields are ignored, as the seed (pydantic's default) does.
    resp = await client.post("/v1/responses", json={"model": "echo", "input": "x", "surprise": 1})
    assert resp.status == 200


async def test_oversized_body_is_413(make_client: Any) -> None:
    client = await make_client({"service": {"max_body_bytes": 2048}, "engine": {"backend": "echo",
                                                                              "models": {"echo": {}}}})
    resp = await client.post("/v1/responses", json={"model": "echo", "input": "x" * 5000})
    assert resp.status == 413
    assert (await resp.json())["detail"]["code"] == "request_too_large"


async def test_unknown_path_and_method(client: Any) -> None:
    resp = await client.get("/v1/nothing")
    assert resp.status == 404 and (await resp.json())["detail"]["code"] == "not_found"
    resp = await client.get("/v1/responses")
    assert resp.status == 405 and (await resp.json())["detail"]["code"] == "method_not_allowed"


async def test_models_and_health(client: Any) -> None:
    assert await (await client.get("/v1/models")).json() == {"models": ["echo", "slow"]}
    assert (await client.get("/healthz")).status == 200
    ready = await (await client.get("/readyz")).json()
    assert ready["ready"] is True and ready["loaded_models"] == ["echo", "slow"]


async def test_admin_lists_models_and_plugins(client: Any) -> None:
    models = {m["name"]: m for m in (await (await client.get("/v1/admin/models")).json())["models"]}
    assert models["echo"]["runtime_state"] == "loaded" and models["off"]["runtime_state"] == "unloaded"
    plugins = await (await client.get("/v1/admin/plugins")).json()
    assert "echo" in plugins["backends"]
    assert plugins["backends"]["echo"]["aliases"] == ["echo_alias"]


async def test_admin_unload_and_load_cycle(client: Any) -> None:
    resp = await client.post("/v1/admin/models/echo/unload")
    assert resp.status == 200
    resp = await client.post("/v1/responses", json={"model": "echo", "input": "x"})
    assert resp.status == 409
    resp = await client.post("/v1/admin/models/echo/load", json={"replicas": 2})
    assert resp.status == 400
    assert "exceeds replica_max 1" in (await resp.json())["detail"]["message"]
    resp = await client.post("/v1/admin/models/echo/load", json={})
    assert resp.status == 200, await resp.text()
    models = {m["name"]: m for m in (await (await client.get("/v1/admin/models")).json())["models"]}
    assert models["echo"]["runtime_state"] == "loaded"
    resp = await client.post("/v1/responses", json={"model": "echo", "input": "back again"})
    assert (await resp.json())["output_text"] == "back again"


async def test_load_override_is_validated_by_the_plugin(client: Any) -> None:
    await client.post("/v1/admin/models/echo/unload")
    resp = await client.post("/v1/admin/models/echo/load", json={"echo_ctx": "many"})  # the override model: 422
    assert resp.status == 422 and (await resp.json())["detail"][0]["loc"] == ["body", "echo_ctx"]
    resp = await client.post("/v1/admin/models/echo/load", json={"echo_ctx": 0})  # the plugin's range rule: 400
    assert resp.status == 400
    assert (await resp.json())["detail"]["message"] == "echo_ctx load override must be a positive integer"
    resp = await client.post("/v1/admin/models/echo/load", json={"gguf_n_ctx": 1024})
    assert resp.status == 400
    assert (await resp.json())["detail"]["code"] == "invalid_load_request"


async def test_failed_load_marks_model_failed_and_others_serve(make_client: Any) -> None:
    client = await make_client({"engine": {"backend": "echo", "models": {
        "broken": {"echo_fail_load": "weights file is corrupt"}, "good": {}}}})
    models = {m["name"]: m for m in (await (await client.get("/v1/admin/models")).json())["models"]}
    assert models["broken"]["runtime_state"] == "failed"
    assert "weights file is corrupt" in models["broken"]["last_error"]
    resp = await client.post("/v1/responses", json={"model": "broken", "input": "x"})
    assert resp.status == 409
    resp = await client.post("/v1/responses", json={"model": "good", "input": "fine"})
    assert (await resp.json())["output_text"] == "fine"


async def test_missing_backend_fails_only_that_model(make_client: Any) -> None:
    client = await make_client({"engine": {"models": {
        "ghost": {"backend": "no_such_backend", "model_path": "/nowhere"}, "good": {"backend": "echo"}}}})
    models = {m["name"]: m for m in (await (await client.get("/v1/admin/models")).json())["models"]}
    assert models["ghost"]["runtime_state"] == "failed"
    assert "no_such_backend" in models["ghost"]["last_error"] and "echo" in models["ghost"]["last_error"]
    resp = await client.post("/v1/responses", json={"model": "good", "input": "ok"})
    assert resp.status == 200


async def test_unload_waits_for_running_request(make_client: Any) -> None:
    client = await make_client({"engine": {"backend": "echo", "models": {"slow": {"echo_delay_s": 0.1}}}})
    running = asyncio.create_task(client.post("/v1/responses", json={"model": "slow", "input": "a b c d"}))
    await asyncio.sleep(0.15)
    unload = await client.post("/v1/admin/models/slow/unload")
    assert unload.status == 200
    resp = await running
    assert resp.status == 200 and (await resp.json())["output_text"] == "a b c d"


async def test_client_disconnect_cancels_generation(client: Any) -> None:
    before = {id(r) for r in echo_backend.RUNTIMES}
    await client.post("/v1/admin/models/slow/unload")
    await client.post("/v1/admin/models/slow/load")
    runtime = next(r for r in echo_backend.RUNTIMES if id(r) not in before)
    words = " ".join(f"w{i}" for i in range(100))
    resp = await client.post("/v1/responses", json={"model": "slow", "input": words, "stream": True})
    await resp.content.readline()
    resp.close()
    for _ in range(100):
        if runtime.cancelled:
            break
        await asyncio.sleep(0.05)
    assert runtime.cancelled, "the runtime never saw the cancel"
    resp = await client.post("/v1/responses", json={"model": "slow", "input": "next one"})
    assert (await resp.json())["output_text"] == "next one"


async def test_requests_queue_per_replica_concurrency(make_client: Any) -> None:
    client = await make_client({"engine": {"backend": "echo", "models": {
        "batched": {"echo_delay_s": 0.05, "echo_concurrency": 3, "target_inflight": 3}}}})
    app = client.server.app
    replica = app[POOL].entries["batched"].replicas[0]
    runtime = replica.runtime
    results = await asyncio.gather(*(client.post("/v1/responses", json={"model": "batched", "input": "a b c"})
                                     for _ in range(6)))
    assert all(r.status == 200 for r in results)
    assert runtime.max_active == 3


async def test_api_keys_and_admin_key(make_client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_LLMPOOL_KEY", "env-key")
    client = await make_client({"service": {"api_keys": ["k1"], "api_key_envs": ["TEST_LLMPOOL_KEY"],
                                            "admin_api_key": "root"},
                                "engine": {"backend": "echo", "models": {"echo": {}}}})
    body = {"model": "echo", "input": "hi"}
    resp = await client.post("/v1/responses", json=body)
    assert resp.status == 401 and (await resp.json())["detail"]["code"] == "unauthorized"
    assert (await client.post("/v1/responses", json=body, headers={"Authorization": "Bearer k1"})).status == 200
    assert (await client.post("/v1/responses", json=body, headers={"X-Api-Key": "env-key"})).status == 200
    assert (await client.get("/v1/admin/models", headers={"Authorization": "Bearer k1"})).status == 401
    assert (await client.get("/v1/admin/models", headers={"Authorization": "Bearer root"})).status == 200
    assert (await client.get("/healthz")).status == 200


SEED_ADMIN_KEYS = {
    "name", "resolved_backend", "configured_enabled", "runtime_state", "is_loaded", "replicas", "replica_max",
    "loaded_replicas", "inflight_requests", "queue_depth", "runtime_inflight", "configured_target_inflight",
    "effective_target_inflight", "fairness", "last_error", "vram_estimate_mib", "vram_estimate_replica_count",
    "vram_estimate_source", "load_constraints", "load_recommendations", "load_override", "capabilities",
    "definition",
}


async def test_admin_entry_has_every_seed_field(client: Any) -> None:
    models = (await (await client.get("/v1/admin/models")).json())["models"]
    assert [m["name"] for m in models] == ["echo", "slow", "off"], "catalog order"
    for entry in models:
        assert SEED_ADMIN_KEYS <= set(entry), SEED_ADMIN_KEYS - set(entry)
    echo = models[0]
    assert echo["resolved_backend"] == "echo" and echo["loaded_replicas"] == 1
    assert echo["fairness"] == {"rejected_per_key_limit": 0, "rejected_executor_limit": 0, "keys": []}
    assert echo["load_constraints"] == {"echo_ctx": {"kind": "integer", "minimum": 1, "step": 1}}
    assert echo["capabilities"]["multi_turn"] is True
    off = models[2]
    assert off["loaded_replicas"] == 0 and off["effective_target_inflight"] == 1


async def test_batching_runtime_is_fed_its_concurrency_by_default(make_client: Any) -> None:
    """Without an explicit target_inflight, a runtime that declares concurrency 3 gets 3."""
    client = await make_client({"engine": {"backend": "echo", "models": {
        "batched": {"echo_delay_s": 0.05, "echo_concurrency": 3}}}})
    runtime = client.server.app[POOL].entries["batched"].replicas[0].runtime
    results = await asyncio.gather(*(client.post("/v1/responses", json={"model": "batched", "input": "a b c"})
                                     for _ in range(6)))
    assert all(r.status == 200 for r in results)
    assert runtime.max_active == 3
    entry = next(m for m in (await (await client.get("/v1/admin/models")).json())["models"] if m["name"] == "batched")
    # Unset: null (the runtime is fed its own concurrency), never a 1 that is not in force.
    assert entry["configured_target_inflight"] is None and entry["effective_target_inflight"] == 3


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/responses", {"input": "a b c"}),
    ("/openai/v1/chat/completions", {"messages": [{"role": "user", "content": "a b c"}]}),
    ("/openai/v1/responses", {"input": "a b c"}),
])
async def test_client_leaving_right_after_the_sse_headers_releases_its_slot(
        client: Any, monkeypatch: pytest.MonkeyPatch, path: str, body: dict[str, Any]) -> None:
    """Fault injection: the first write after the headers fails as if the client had left.
    The slot (lease and in-flight count) must come back, or a concurrency-1 model blocks
    for good."""
    from llmpoold.http import respond

    real_send = respond.send_event
    calls = 0

    async def first_write_fails(request: Any, response: Any, data: Any, **kwargs: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionResetError("client left")
        await real_send(request, response, data, **kwargs)

    monkeypatch.setattr(respond, "send_event", first_write_fails)
    entry = client.app[POOL].entry("slow")
    try:
        await client.post(path, json={"model": "slow", "stream": True, **body})
    except Exception:  # noqa: BLE001 - the connection may end either way; the slot is what matters
        pass
    for _ in range(100):
        if entry.inflight_requests == 0:
            break
        await asyncio.sleep(0.01)
    assert calls >= 1
    assert entry.inflight_requests == 0 and entry.scheduler is not None and entry.scheduler.runtime_inflight == 0
    resp = await asyncio.wait_for(client.post("/v1/responses", json={"model": "slow", "input": "again"}), 5)
    assert (await resp.json())["output_text"] == "again"
