"""The seed's request fields and shapes on ``/v1/responses`` (contract 1.3, 1.5, 1.6, 2.x):
``response_format``, ``thinking_token_budget``, text items, SSE bytes, 422 messages,
state errors, and the admin fields the seed defines. Echo test backend; the model's
capabilities come from its ``echo_*`` options."""

from __future__ import annotations

import json
from typing import Any

import pytest

from llmpoold.http.keys import POOL
from llmpoold.prompts import SEED_THINKING_FORMATS, capabilities_for

pytestmark = pytest.mark.timeout(60)

SCHEMA = {"type": "json_schema", "json_schema": {"name": "answer", "schema": {"type": "object"}}}
MODELS = {
    "plain": {},  # text only: refuses response_format and thinking_token_budget
    "structured": {"echo_response_formats": ["text", "json_schema"]},
    "budget": {"echo_thinking_budget": True, "thinking_token_budget_max": 100, "reasoning_efforts": ["low", "none"]},
    "nobudget": {"echo_thinking_budget": True},  # honours budgets, but none is configured
}


@pytest.fixture
async def client(make_client: Any) -> Any:
    return await make_client({"engine": {"backend": "echo", "decoding": {"max_tokens": 50}, "models": MODELS}})


def runtime_requests(client: Any, model: str) -> list[Any]:
    return client.server.app[POOL].entries[model].replicas[0].runtime.requests


async def detail(resp: Any) -> Any:
    return (await resp.json())["detail"]


# ----- response_format ----------------------------------------------------------------


async def test_response_format_refused_where_the_backend_cannot_honour_it(client: Any) -> None:
    resp = await client.post("/v1/responses", json={"model": "plain", "input": "x", "response_format": SCHEMA})
    assert resp.status == 400
    assert await detail(resp) == {"code": "response_format_unsupported", "model": "plain",
                                  "message": "model 'plain' does not support response_format"}
    assert runtime_requests(client, "plain") == []  # the backend is never called


async def test_response_format_reaches_a_backend_that_declares_it(client: Any) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "a", "description": "d", "schema": {"type": "object"},
                                                  "strict": False}}
    resp = await client.post("/v1/responses", json={"model": "structured", "input": "x y", "response_format": fmt})
    assert resp.status == 200, await resp.text()
    assert runtime_requests(client, "structured")[-1].response_format == fmt
    resp = await client.post("/v1/responses", json={"model": "structured", "input": "x"})
    assert runtime_requests(client, "structured")[-1].response_format is None


@pytest.mark.parametrize(("fmt", "loc"), [
    ({"type": "json_schema", "json_schema": {"name": "", "schema": {}}}, ["name"]),
    ({"type": "json_schema", "json_schema": {"name": "a", "schema": {}, "extra": 1}}, ["extra"]),
    ({"type": "json_schema", "json_schema": {"name": "a", "schema": {}}, "extra": 1}, []),
    ({"type": "json_schema", "json_schema": {"name": "a"}}, ["schema"]),
    ({"type": "xml"}, []),
])
async def test_response_format_shape_is_the_seeds(client: Any, fmt: dict, loc: list) -> None:
    resp = await client.post("/v1/responses", json={"model": "structured", "input": "x", "response_format": fmt})
    assert resp.status == 422
    assert all(issue["loc"][:2] == ["body", "response_format"] for issue in await detail(resp))


async def test_response_format_with_stream_is_422_with_pydantics_prefix(client: Any) -> None:
    resp = await client.post("/v1/responses", json={"model": "structured", "input": "x", "stream": True,
                                                    "response_format": SCHEMA})
    assert resp.status == 422
    assert [issue["msg"] for issue in await detail(resp)] == [
        "Value error, response_format is not supported with stream=true"]


async def test_model_validator_messages_keep_the_value_error_prefix(client: Any) -> None:
    """FastAPI passes pydantic's message on as is; the seed's clients see the prefix."""
    resp = await client.post("/v1/responses", json={"model": "plain", "messages": []})
    assert [i["msg"] for i in await detail(resp)] == ["Value error, messages must not be empty"]
    resp = await client.post("/v1/responses", json={"model": "plain", "input": "x", "fairness_key": " "})
    assert [i["msg"] for i in await detail(resp)] == ["Value error, fairness_key must not be blank"]


# ----- thinking_token_budget ------------------------------------------------------------


@pytest.mark.parametrize("budget", [0, 4097, "many"])
async def test_thinking_token_budget_bounds_are_422(client: Any, budget: Any) -> None:
    resp = await client.post("/v1/responses", json={"model": "budget", "input": "x", "thinking_token_budget": budget})
    assert resp.status == 422
    assert (await detail(resp))[0]["loc"] == ["body", "thinking_token_budget"]


@pytest.mark.parametrize(("model", "extra", "code", "message"), [
    ("plain", {"thinking": "enabled"}, "unsupported", "model 'plain' does not support thinking_token_budget"),
    ("nobudget", {"thinking": "enabled"}, "unsupported",
     "model 'nobudget' does not support thinking_token_budget"),
    ("budget", {"thinking": "enabled", "thinking_token_budget": 101}, "out_of_range",
     "thinking_token_budget must be at most 100 for model 'budget'"),
    ("budget", {}, "requires_thinking", "thinking_token_budget requires enabled thinking"),
    ("budget", {"thinking": "disabled"}, "requires_thinking", "thinking_token_budget requires enabled thinking"),
    ("budget", {"reasoning_effort": "none"}, "requires_thinking", "thinking_token_budget requires enabled thinking"),
    ("budget", {"thinking": "enabled"}, "exhausts_output",  # engine default max_tokens is 50
     "thinking_token_budget must be lower than decoding.max_tokens"),
    ("budget", {"reasoning_effort": "low", "thinking_token_budget": 10, "decoding": {"max_tokens": 10}},
     "exhausts_output", "thinking_token_budget must be lower than decoding.max_tokens"),
])
async def test_thinking_token_budget_admission_codes(client: Any, model: str, extra: dict, code: str,
                                                     message: str) -> None:
    body = {"model": model, "input": "x", "thinking_token_budget": 60, **extra}
    resp = await client.post("/v1/responses", json=body)
    assert resp.status == 400
    assert await detail(resp) == {"code": f"thinking_token_budget_{code}", "model": model, "message": message}
    assert runtime_requests(client, model) == []


async def test_thinking_token_budget_admitted_reaches_the_backend(client: Any) -> None:
    for extra in ({"thinking": "enabled"}, {"reasoning_effort": "low", "decoding": {"max_tokens": 100}}):
        body = {"model": "budget", "input": "x", "thinking_token_budget": 40, **extra}
        resp = await client.post("/v1/responses", json=body)
        assert resp.status == 200, await resp.text()
        assert runtime_requests(client, "budget")[-1].thinking_token_budget == 40
    admin = {m["name"]: m for m in (await (await client.get("/v1/admin/models")).json())["models"]}
    assert admin["budget"]["capabilities"]["thinking_token_budget"] == {"minimum": 1, "maximum": 100}
    assert admin["plain"]["capabilities"]["thinking_token_budget"] is None
    assert admin["structured"]["capabilities"]["response_formats"] == ["text", "json_schema"]


# ----- shapes -------------------------------------------------------------------------


async def test_text_items_concatenate_without_separator(client: Any) -> None:
    items = [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo world"}]
    resp = await client.post("/v1/responses", json={"model": "plain", "input": items})
    assert (await resp.json())["output_text"] == "Hello world"
    resp = await client.post("/v1/responses", json={"model": "plain", "messages": [{"role": "user", "content": items}]})
    assert (await resp.json())["output_text"] == "Hello world"


async def test_sse_data_uses_json_dumps_defaults(client: Any) -> None:
    resp = await client.post("/v1/responses", json={"model": "plain", "input": "caf\u00e9 ok", "stream": True})
    raw = (await resp.read()).decode()
    datas = [line.removeprefix("data: ") for line in raw.splitlines() if line.startswith("data: ")]
    assert datas and all(d == json.dumps(json.loads(d), ensure_ascii=True) for d in datas)
    assert '"id": "resp_' in datas[0] and '"delta": "caf\\u00e9"' in raw


async def test_state_errors_carry_a_message(make_client: Any) -> None:
    client = await make_client({"engine": {"backend": "echo", "models": {"off": {"enabled": False}}}})
    resp = await client.post("/v1/responses", json={"model": "off", "input": "x"})
    assert resp.status == 409
    assert await detail(resp) == {"code": "model_not_loaded", "model": "off",
                                  "message": "model 'off' is not loaded; load it first"}


# ----- admin ----------------------------------------------------------------------------


async def test_admin_seed_fields(make_client: Any, tmp_path: Any) -> None:
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"\0" * (3 * 2**20))
    client = await make_client({"engine": {"backend": "echo", "models": {
        "sized": {"model_path": str(weights)}, "pinned": {"target_inflight": 2, "echo_concurrency": 4},
        "boom": {"echo_fail_load": "", "enabled": False}}}})
    resp = await client.post("/v1/admin/models/sized/unload")
    resp = await client.post("/v1/admin/models/sized/load", json={"echo_ctx": 64, "target_inflight": 2})
    entry = await resp.json()
    assert resp.status == 200, entry
    assert entry["load_override"] == {"echo_ctx": 64, "target_inflight": 2}  # as sent
    assert (entry["configured_target_inflight"], entry["effective_target_inflight"]) == (2, 1)
    # The seed's enum: the artifact size (the plugin's estimate is memory_estimate's).
    assert (entry["vram_estimate_mib"], entry["vram_estimate_source"]) == (3, "model_artifact_size")
    admin = {m["name"]: m for m in (await (await client.get("/v1/admin/models")).json())["models"]}
    assert admin["pinned"]["configured_target_inflight"] == 2
    assert admin["boom"]["vram_estimate_source"] == "unavailable"
    gpu = {m["name"]: m for m in (await (await client.get("/v1/admin/gpu-memory")).json())["models"]}
    assert gpu["sized"]["vram_estimate_source"] == "model_artifact_size"
    assert gpu["pinned"]["configured_target_inflight"] == 2
    # A load error without a message is its class name (the seed's rule).
    resp = await client.post("/v1/admin/models/boom/load")
    assert resp.status == 500
    assert (await detail(resp))["message"] == "boom#1: LoadError"


async def test_load_override_echo_normalised_only_where_the_check_converts(make_client: Any) -> None:
    client = await make_client({"engine": {"backend": "echo", "models": {"m": {"enabled": False}}}})
    resp = await client.post("/v1/admin/models/m/load", json={"echo_ctx": 7, "replicas": 1})
    assert (await resp.json())["load_override"] == {"echo_ctx": 7}


def test_thinking_modes_follow_the_seeds_backends() -> None:
    ct2 = SEED_THINKING_FORMATS["ct2"]
    assert capabilities_for("qwen3_template", thinking_formats=ct2).thinking_modes == ("default", "enabled",
                                                                                        "disabled")
    assert capabilities_for("gemma4_template", thinking_formats=ct2).thinking_modes == ("default",)
    gguf = SEED_THINKING_FORMATS["gguf"]
    assert capabilities_for("qwen3_template", thinking_formats=gguf).thinking_modes == ("default",)
    assert capabilities_for("gemma4_template", thinking_formats=gguf).thinking_modes == ("default", "enabled",
                                                                                         "disabled")
