"""The door (issue 18): keys that fail closed, browser rules (Origin, Host) and the bounds
on what a request may carry, end to end through aiohttp with the echo test backend."""

from __future__ import annotations

import json
from typing import Any

import echo_backend
import pytest
import structlog
from aiohttp import web

from llmpoold.errors import SettingsError
from llmpoold.http.app import create_app
from llmpoold.testing import make_registry, settings_from

pytestmark = pytest.mark.timeout(60)

ECHO = {"backend": "echo", "models": {"echo": {}}}
ADMIN = {"Authorization": "Bearer adm"}


async def _state(client: Any, name: str = "echo") -> str:
    models = (await (await client.get("/v1/admin/models", headers=ADMIN)).json())["models"]
    return next(m["runtime_state"] for m in models if m["name"] == name)


def _raw(body: str | bytes) -> dict[str, Any]:
    data = body.encode() if isinstance(body, str) else body
    return {"data": data, "headers": {"Content-Type": "application/json"}}


# ----- keys -----------------------------------------------------------------------------


async def test_admin_is_closed_with_inference_keys_and_no_admin_key(make_client: Any) -> None:
    client = await make_client({"service": {"api_keys": ["k1"]}, "engine": ECHO})
    resp = await client.post("/v1/admin/models/echo/unload")
    assert resp.status == 401 and resp.headers["WWW-Authenticate"] == "Bearer"
    detail = (await resp.json())["detail"]
    assert detail["code"] == "unauthorized" and "admin_open" in detail["message"]
    # An inference key does not open it either, and the model was not touched.
    assert (await client.post("/v1/admin/models/echo/unload", headers={"Authorization": "Bearer k1"})).status == 401
    assert (await client.get("/v1/admin/models")).status == 401
    resp = await client.post("/v1/responses", json={"model": "echo", "input": "still here"},
                             headers={"Authorization": "Bearer k1"})
    assert (await resp.json())["output_text"] == "still here"


async def test_admin_open_leaves_admin_open_on_purpose(make_client: Any) -> None:
    client = await make_client({"service": {"api_keys": ["k1"], "admin_open": True}, "engine": ECHO})
    assert (await client.post("/v1/admin/models/echo/unload")).status == 200
    assert (await client.post("/v1/responses", json={"model": "echo", "input": "x"})).status == 401


async def test_admin_key_opens_both_surfaces(make_client: Any) -> None:
    client = await make_client({"service": {"api_keys": ["k1"], "admin_api_key": "adm"}, "engine": ECHO})
    assert (await client.post("/v1/admin/models/echo/unload", headers={"X-Api-Key": "wrong"})).status == 401
    assert (await client.post("/v1/admin/models/echo/load", headers={"X-Api-Key": "adm"})).status == 200
    resp = await client.post("/v1/responses", json={"model": "echo", "input": "x"}, headers=ADMIN)
    assert resp.status == 200


async def test_keys_are_resolved_when_the_app_is_built(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_DOOR_KEY", "from-env")
    settings = settings_from({"service": {"api_key_envs": ["TEST_DOOR_KEY"]}, "engine": ECHO})
    monkeypatch.delenv("TEST_DOOR_KEY")
    with pytest.raises(SettingsError, match="TEST_DOOR_KEY"):
        create_app(settings, make_registry(echo_backend))


async def test_off_loopback_metrics_take_a_key_and_health_stays_open(make_client: Any) -> None:
    client = await make_client({"service": {"host": "0.0.0.0", "api_keys": ["k1"], "admin_api_key": "adm"},
                                "engine": ECHO})
    assert (await client.get("/metrics")).status == 401
    assert (await client.get("/metrics", headers={"Authorization": "Bearer k1"})).status == 200
    assert (await client.get("/metrics", headers=ADMIN)).status == 200
    for path in ("/healthz", "/readyz", "/", "/openapi.json"):
        assert (await client.get(path)).status == 200, path
    # On loopback /metrics stays open with the same keys.
    loopback = await make_client({"service": {"api_keys": ["k1"], "admin_api_key": "adm"}, "engine": ECHO})
    assert (await loopback.get("/metrics")).status == 200


# ----- browsers -------------------------------------------------------------------------


async def test_a_foreign_origin_is_refused(make_client: Any) -> None:
    client = await make_client({"engine": ECHO})  # no keys: the browser rules are all that guard it
    resp = await client.post("/v1/admin/models/echo/unload", headers={"Origin": "https://evil.example"})
    assert resp.status == 403 and (await resp.json())["detail"]["code"] == "origin_not_allowed"
    resp = await client.post("/v1/responses", json={"model": "echo", "input": "x"}, headers={"Origin": "null"})
    assert resp.status == 403
    assert await _state(client) == "loaded"
    # The console's own page posts from the daemon's own origin.
    own = f"http://{client.host}:{client.port}"
    assert (await client.post("/v1/admin/models/echo/unload", headers={"Origin": own})).status == 200


async def test_an_allowed_origin_gets_cors(make_client: Any) -> None:
    client = await make_client({"service": {"allowed_origins": ["https://app.example"]}, "engine": ECHO})
    origin = {"Origin": "https://app.example"}
    resp = await client.post("/v1/responses", json={"model": "echo", "input": "x"}, headers=origin)
    assert resp.status == 200 and resp.headers["Access-Control-Allow-Origin"] == "https://app.example"
    resp = await client.post("/v1/responses", json={"model": "echo", "input": "x", "stream": True}, headers=origin)
    assert resp.status == 200 and resp.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert "X-Request-Id" in resp.headers["Access-Control-Expose-Headers"]
    preflight = await client.options("/v1/responses", headers={**origin, "Access-Control-Request-Method": "POST"})
    assert preflight.status == 204 and "Authorization" in preflight.headers["Access-Control-Allow-Headers"]
    other = await client.options("/v1/responses", headers={"Origin": "https://evil.example",
                                                           "Access-Control-Request-Method": "POST"})
    assert other.status == 403 and "Access-Control-Allow-Origin" not in other.headers


async def test_a_foreign_host_on_loopback_is_misdirected(make_client: Any) -> None:
    client = await make_client({"service": {"allowed_hosts": ["llm.internal"]}, "engine": ECHO})
    port = client.port
    for host in (f"evil.example:{port}", "evil.example", f"localhost.evil.example:{port}"):
        resp = await client.get("/v1/admin/models", headers={"Host": host})
        assert resp.status == 421 and (await resp.json())["detail"]["code"] == "misdirected_request", host
    assert (await client.get("/metrics", headers={"Host": "evil.example"})).status == 421
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", f"LLM.internal:{port}"):
        assert (await client.get("/v1/admin/models", headers={"Host": host})).status == 200, host


# ----- bounds ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/responses", "/openai/v1/responses"])
async def test_lone_surrogate_is_invalid_json(client: Any, path: str) -> None:
    resp = await client.post(path, **_raw('{"model": "echo", "input": "\\ud800 hi"}'))
    assert resp.status == 400
    body = await resp.json()
    code = body["error"]["code"] if "error" in body else body["detail"]["code"]
    assert code == "invalid_json"
    # A pair is one character (an emoji), and a key is checked too.
    resp = await client.post("/v1/responses", **_raw('{"model": "echo", "input": "\\ud83d\\ude00 hi"}'))
    assert resp.status == 200 and (await resp.json())["output_text"] == "\U0001f600 hi"
    resp = await client.post("/v1/responses", **_raw('{"model": "echo", "input": "x", "\\udfff": 1}'))
    assert resp.status == 400
    resp = await client.post("/v1/responses", **_raw(b'{"model": "echo", "input": "\xff"}'))
    assert resp.status == 400 and (await resp.json())["detail"]["code"] == "invalid_json"


@pytest.mark.parametrize("body", [
    "[" * 5000 + "]" * 5000,
    '{"model": "echo", "input": "x", "extra": ' + "[" * 40 + "]" * 40 + "}",
    '{"model": "echo", "input": ' + "1" * 5000 + "}",
])
async def test_deep_or_huge_json_is_400(client: Any, body: str) -> None:
    resp = await client.post("/v1/responses", **_raw(body))
    assert resp.status == 400 and (await resp.json())["detail"]["code"] == "invalid_json"
    resp = await client.post("/v1/admin/models/echo/load", **_raw(body))
    assert resp.status == 400


async def test_a_huge_model_name_is_not_echoed(client: Any) -> None:
    name = "m" * 1_000_000
    with structlog.testing.capture_logs() as logs:
        for path in ("/v1/responses", "/openai/v1/responses"):
            resp = await client.post(path, json={"model": name, "input": "x"})
            assert resp.status == 422
            assert len(await resp.read()) < 1024, path
    assert all(len(json.dumps(entry, default=str)) < 1024 for entry in logs)
    resp = await client.post("/v1/admin/models/" + "m" * 4000 + "/unload")
    assert resp.status == 404 and len(await resp.read()) < 1024
    resp = await client.get("/openai/v1/models/" + "m" * 4000)
    assert resp.status == 404 and len(await resp.read()) < 1024
    resp = await client.post("/openai/v1/responses", json={"model": "echo", "input": [
        {"type": "message", "role": "user", "content": [{"type": "t" * 60}]}]})
    assert resp.status == 400 and len(await resp.read()) < 1024
    # pydantic's own messages can quote input (a union tag): cut too.
    resp = await client.post("/v1/responses", json={"model": "echo", "input": [{"type": "t" * 100_000}]})
    assert resp.status == 422 and len(await resp.read()) < 1024
    resp = await client.post("/openai/v1/responses", json={"model": "echo", "metadata": {"k" * 100_000: "v"},
                                                           "input": "x"})
    assert resp.status == 422 and len(await resp.read()) < 1024


async def test_a_client_request_id_is_kept_only_when_it_is_one(client: Any) -> None:
    resp = await client.get("/v1/models", headers={"X-Request-Id": "abc-123"})
    assert resp.headers["X-Request-Id"] == "abc-123"
    resp = await client.get("/v1/models", headers={"X-Request-Id": "x" * 4000})
    assert len(resp.headers["X-Request-Id"]) == 32


def _stops(count: int, length: int = 3) -> list[str]:
    return [f"{i:0{length}d}" for i in range(count)]


@pytest.mark.parametrize(("decoding", "status"), [
    ({"stop": _stops(16)}, 200),
    ({"stop": _stops(17)}, 422),
    ({"stop": ["s" * 256]}, 200),
    ({"stop": ["s" * 257]}, 422),
    ({"repetition_penalty": 0}, 422),
    ({"repetition_penalty": 0.5}, 200),
])
async def test_decoding_bounds(client: Any, decoding: dict[str, Any], status: int) -> None:
    resp = await client.post("/v1/responses", json={"model": "echo", "input": "x", "decoding": decoding})
    assert resp.status == status, await resp.text()


@pytest.mark.parametrize(("stop", "status"), [(_stops(17), 422), ("s" * 257, 422), (_stops(16), 200)])
async def test_openai_stop_bounds(client: Any, stop: Any, status: int) -> None:
    resp = await client.post("/openai/v1/chat/completions",
                             json={"model": "echo", "messages": [{"role": "user", "content": "x"}], "stop": stop})
    assert resp.status == status, await resp.text()
    if status == 422:
        assert (await resp.json())["error"]["param"].startswith("stop")


@pytest.mark.parametrize(("body", "where"), [
    ({"input": [{"type": "text", "text": "x"}] * 257}, "input"),
    ({"messages": [{"role": "user", "content": "x"}] * 1001}, "messages"),
    ({"input": "x", "instructions": "i" * 100_001}, "instructions"),
    ({"input": "x" * 1_000_001}, "input"),
    ({"input": "x" * 600_000, "instructions": "i" * 1_000, "messages": None,
      "decoding": {}}, None),  # fits
    ({"messages": [{"role": "user", "content": "x" * 600_000}, {"role": "assistant", "content": "a"},
                   {"role": "user", "content": "y" * 600_000}]}, "body"),  # the total
    ({"input": "x", "prompt_cache_key": "k" * 257}, "prompt_cache_key"),
])
async def test_text_and_list_bounds(client: Any, body: dict[str, Any], where: str | None) -> None:
    resp = await client.post("/v1/responses", json={"model": "echo", **body, "decoding": {"max_tokens": 1}})
    if where is None:
        assert resp.status == 200
        return
    assert resp.status == 422
    detail = (await resp.json())["detail"]
    assert detail[0]["loc"][:2] == ["body", where] if where != "body" else detail[0]["loc"] == ["body"]
    assert len(json.dumps(detail)) < 2048


async def test_openai_metadata_is_bounded(client: Any) -> None:
    base = {"model": "echo", "input": "x"}
    resp = await client.post("/openai/v1/responses", json={**base, "metadata": {str(i): "v" for i in range(17)}})
    assert resp.status == 422 and (await resp.json())["error"]["param"] == "metadata"
    resp = await client.post("/openai/v1/responses", json={**base, "metadata": {"k": "v" * 513}})
    assert resp.status == 422
    resp = await client.post("/openai/v1/responses", json={**base, "metadata": {"k": "v"}})
    assert resp.status == 200 and (await resp.json())["metadata"] == {"k": "v"}


# ----- 500s -----------------------------------------------------------------------------


async def test_a_plugin_exception_is_an_internal_error_with_the_request_id(make_client: Any) -> None:
    client = await make_client({"engine": {"backend": "echo", "models": {
        "faulty": {"echo_raise": "secret detail at /srv/models/x"}}}})
    with structlog.testing.capture_logs() as logs:
        resp = await client.post("/v1/responses", json={"model": "faulty", "input": "x"},
                                 headers={"X-Request-Id": "req-42"})
    assert resp.status == 500
    detail = (await resp.json())["detail"]
    assert detail == {"code": "backend_error", "model": "faulty", "message": "internal error (request id req-42)"}
    logged = next(e for e in logs if e["event"] == "backend_error")
    assert "secret detail" in logged["error"] and logged["exc_info"] is True
    resp = await client.post("/openai/v1/chat/completions", json={
        "model": "faulty", "messages": [{"role": "user", "content": "x"}]})
    error = (await resp.json())["error"]
    assert resp.status == 500 and "secret" not in error["message"]
    assert error["message"].startswith("internal error (request id ")


async def test_a_handler_exception_is_an_internal_error_with_the_request_id(aiohttp_client: Any) -> None:
    app = create_app(settings_from({"engine": ECHO}), make_registry(echo_backend), load_on_startup=False)

    async def broken(request: web.Request) -> web.Response:  # fault injection: a handler bug
        raise KeyError("internal/state/path")

    app.router.add_get("/v1/broken", broken)
    client = await aiohttp_client(app)
    with structlog.testing.capture_logs() as logs:
        resp = await client.get("/v1/broken")
    assert resp.status == 500
    request_id = resp.headers["X-Request-Id"]
    assert (await resp.json())["detail"] == {"code": "internal_error",
                                             "message": f"internal error (request id {request_id})"}
    logged = next(e for e in logs if e["event"] == "unhandled_error")
    assert logged["exc_info"] is True and logged["path"] == "/v1/broken"
