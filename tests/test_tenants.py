"""API keys as tenants (issue 15), through HTTP with the echo test backend: allowed
models, the key's fairness share, limits, usage, admin rights and reloads."""

from __future__ import annotations

import asyncio
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import echo_backend
import pytest
import structlog
from aiohttp.test_utils import TestClient, TestServer

from llmpoold.http.app import create_app
from llmpoold.http.keys import POOL, TENANTS
from llmpoold.testing import make_registry, settings_from

pytestmark = pytest.mark.timeout(60)

ADMIN = {"Authorization": "Bearer root-key"}


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def settings(*keys: Any, models: dict[str, Any] | None = None, **fairness: Any) -> dict[str, Any]:
    return {"service": {"api_keys": list(keys), "admin_api_key": "root-key"},
            "engine": {"backend": "echo", "fairness": fairness, "models": models or {
                "echo": {}, "slow": {"echo_delay_s": 0.05}}}}


async def post(client: Any, key: str, model: str = "echo", text: str = "one two three", *,
               path: str = "/v1/responses", **extra: Any) -> Any:
    body = ({"model": model, "messages": [{"role": "user", "content": text}], **extra} if "chat" in path
            else {"model": model, "input": text, **extra})
    return await client.post(path, json=body, headers={**auth(key), **extra.pop("headers", {})})


async def detail(resp: Any) -> dict[str, Any]:
    return (await resp.json())["detail"]


async def test_a_key_restricted_to_some_models_gets_403_on_the_others(make_client: Any) -> None:
    client = await make_client(settings({"name": "app", "key": "k-app", "models": ["ech?"]}, "k-plain"))
    assert (await post(client, "k-app", "echo")).status == 200
    resp = await post(client, "k-app", "slow")
    assert resp.status == 403
    assert await detail(resp) == {"code": "model_not_allowed", "model": "slow",
                                  "message": "this API key may not use model 'slow'"}
    resp = await post(client, "k-app", "no-such-model")  # whether a model exists is not revealed
    assert resp.status == 403
    resp = await post(client, "k-app", "slow", path="/openai/v1/chat/completions")
    assert resp.status == 403 and (await resp.json())["error"]["code"] == "model_not_allowed"
    assert (await post(client, "k-plain", "slow")).status == 200, "a plain string key keeps working unrestricted"
    assert (await post(client, "k-wrong", "echo")).status == 401


async def flood(client: Any, keys: dict[str, str], count: int, **extra: Any) -> list[str]:
    """``count`` requests per key at once on the one-slot model; the keys in the order
    the runtime served them."""
    async def one(name: str, key: str, i: int) -> None:
        body = {"model": "one", "input": "a b c d", **{k: (v(i) if callable(v) else v) for k, v in extra.items()}}
        resp = await client.post("/v1/responses", json=body, headers={**auth(key), "X-Request-Id": f"{name}-{i}"})
        assert resp.status == 200, await resp.text()

    await asyncio.gather(*(one(name, key, i) for name, key in keys.items() for i in range(count)))
    runtime = next(r for r in reversed(echo_backend.RUNTIMES) if r.replica_id == "one#1")
    return [request_id.rsplit("-", 1)[0] for request_id in runtime.served]


ONE_SLOT = {"one": {"echo_delay_s": 0.01}}  # one request at a time, ~40 ms each


async def test_two_keys_weighted_two_to_one_get_two_to_one_of_the_service(make_client: Any) -> None:
    client = await make_client(settings({"name": "gold", "key": "k-gold", "weight": 2.0},
                                        {"name": "std", "key": "k-std"}, models=ONE_SLOT))
    served = await flood(client, {"gold": "k-gold", "std": "k-std"}, 12)
    # While both keys have work (the first 12 of 24), 2:1 is 8:4; one either way for
    # whoever reached the queue first.
    first = Counter(served[:12])
    assert 7 <= first["gold"] <= 9, served


async def test_a_key_weight_can_come_from_engine_fairness_weights(make_client: Any) -> None:
    client = await make_client(settings({"name": "gold", "key": "k-gold", "fairness_key": "team-gold"},
                                        {"name": "std", "key": "k-std"}, models=ONE_SLOT,
                                        weights={"team-gold": 2.0, "gold": 0.1}))
    first = Counter((await flood(client, {"gold": "k-gold", "std": "k-std"}, 12))[:12])
    assert 7 <= first["gold"] <= 9


async def test_rotating_fairness_keys_under_one_key_gets_no_more_than_its_share(make_client: Any) -> None:
    client = await make_client(settings({"name": "rot", "key": "k-rot"}, {"name": "fix", "key": "k-fix"},
                                        models=ONE_SLOT))
    served = await flood(client, {"rot": "k-rot", "fix": "k-fix"}, 12, fairness_key=lambda i: f"client-{i}")
    first = Counter(served[:12])
    assert 5 <= first["rot"] <= 7, served  # 6 of 12, not 11 of 12 (one new key per request)
    pool_entry = client.server.app[POOL].entries["one"]
    assert pool_entry.scheduler.snapshot()["keys"] == []


async def test_client_fairness_keys_are_sub_buckets_of_the_key(make_client: Any) -> None:
    client = await make_client(settings({"name": "translation", "key": "k-t", "fairness_key": "translation-service"},
                                        models={"slow": {"echo_delay_s": 0.2}}))
    running = asyncio.create_task(post(client, "k-t", "slow", "a b", fairness_key="image"))
    queued = asyncio.create_task(post(client, "k-t", "slow", "a b", fairness_key="text"))
    await asyncio.sleep(0.15)
    models = await (await client.get("/v1/admin/models", headers=ADMIN)).json()
    keys = {k["fairness_key"]: k for k in models["models"][0]["fairness"]["keys"]}
    assert set(keys) == {"translation-service:image", "translation-service:text"}
    assert {k["fairness_group"] for k in keys.values()} == {"translation-service"}
    assert (await running).status == (await queued).status == 200


async def test_per_key_concurrency_limit_is_429_with_retry_after(make_client: Any) -> None:
    client = await make_client(settings({"name": "batch", "key": "k-b", "max_inflight": 1, "max_queued": 1},
                                        {"name": "other", "key": "k-o"}))
    first = asyncio.create_task(post(client, "k-b", "slow", "a b c d e f"))  # ~0.3 s
    await asyncio.sleep(0.05)
    second = asyncio.create_task(post(client, "k-b", "slow", "a b c d"))  # waits for the key's one place
    await asyncio.sleep(0.05)
    resp = await post(client, "k-b", "slow", "a b")
    assert resp.status == 429 and int(resp.headers["Retry-After"]) >= 1
    assert (await detail(resp))["code"] == "tenant_concurrency_limited"
    assert (await post(client, "k-o", "echo")).status == 200, "another key is not limited"
    resp = await post(client, "k-b", "slow", "a b", path="/openai/v1/chat/completions")
    assert resp.status == 429 and (await resp.json())["error"]["code"] == "tenant_concurrency_limited"
    assert (await first).status == 200 and (await second).status == 200
    assert (await post(client, "k-b", "echo")).status == 200, "the places came back"


async def test_per_key_rate_limits_are_429_with_retry_after(make_client: Any) -> None:
    client = await make_client(settings({"name": "rpm", "key": "k-r", "requests_per_minute": 2},
                                        {"name": "tpm", "key": "k-t", "output_tokens_per_minute": 3}))
    assert (await post(client, "k-r")).status == 200
    assert (await post(client, "k-r")).status == 200
    resp = await post(client, "k-r")
    assert resp.status == 429 and (await detail(resp))["code"] == "tenant_rate_limited"
    assert 20 <= int(resp.headers["Retry-After"]) <= 30  # one request every 30 s
    assert (await post(client, "k-t", text="a b c d")).status == 200  # 4 output tokens: over the minute's 3
    resp = await post(client, "k-t", text="a")
    assert resp.status == 429 and (await detail(resp))["code"] == "tenant_rate_limited"
    assert 1 <= int(resp.headers["Retry-After"]) <= 21  # a token every 20 s


async def test_usage_and_metrics_per_key_name(make_client: Any) -> None:
    client = await make_client(settings({"name": "app", "key": "k-secret-app", "models": ["echo"]},
                                        {"name": "idle", "key": "k-idle"}, "k-plain"))
    with structlog.testing.capture_logs() as logs:
        assert (await post(client, "k-secret-app", text="one two three")).status == 200
        assert (await post(client, "k-secret-app", text="four five", stream=True)).status == 200
        assert (await post(client, "k-secret-app", "slow")).status == 403
        assert (await post(client, "k-plain")).status == 200
    lines = [line for line in logs if line["event"] == "inference"]
    assert [line["key_name"] for line in lines] == ["app", "app", "app", None]
    assert "k-secret-app" not in json.dumps(logs, default=str)
    usage = await (await client.get("/v1/admin/usage", headers=ADMIN)).json()
    app = usage["keys"]["app"]
    assert app["requests"] == {"ok": 2, "error": 0, "rejected": 1, "cancelled": 0}
    assert app["prompt_tokens"] == 5 and app["output_tokens"] == 5
    assert app["run_seconds"] > 0 and app["configured"] is True
    assert usage["keys"]["idle"]["requests"]["ok"] == 0
    assert set(usage["keys"]) == {"app", "idle"}
    text = await (await client.get("/metrics")).text()
    assert 'llmpool_key_output_tokens_total{key="app"} 5.0' in text
    assert 'llmpool_key_prompt_tokens_total{key="app"} 5.0' in text
    assert 'llmpool_key_requests_total{key="app",outcome="rejected"} 1.0' in text
    assert 'llmpool_key_requests_total{key="idle",outcome="ok"} 0.0' in text
    assert set(re.findall(r'key="([^"]*)"', text)) == {"app", "idle"}
    assert "k-secret" not in text and "k-plain" not in text


async def test_admin_keys_and_the_admin_api(make_client: Any) -> None:
    client = await make_client(settings({"name": "ops", "key": "k-ops", "admin": True}, {"name": "app", "key": "k-a"}))
    assert (await client.get("/v1/admin/usage", headers=auth("k-ops"))).status == 200
    assert (await client.get("/v1/admin/models", headers=ADMIN)).status == 200
    assert (await client.get("/v1/admin/usage", headers=auth("k-a"))).status == 401
    assert (await client.get("/v1/admin/usage")).status == 401
    assert (await post(client, "k-ops")).status == 200, "an admin key object is an inference key too"


async def test_settings_errors_name_the_key_never_its_value(make_client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from llmpoold.config import SettingsError

    monkeypatch.delenv("LLMPOOL_KEY_NOPE", raising=False)
    with pytest.raises(SettingsError, match="LLMPOOL_KEY_NOPE") as err:
        settings_from(settings({"name": "a", "key_env": "LLMPOOL_KEY_NOPE"}))
    for bad, words in (({"name": "a"}, "exactly one"), ({"name": "a b", "key": "v-secret"}, "name"),
                       ({"name": "a", "key": "v-secret", "weight": 0}, "greater than 0")):
        with pytest.raises(SettingsError, match=words) as err:
            settings_from(settings(bad))
        assert "v-secret" not in str(err.value)
    with pytest.raises(SettingsError, match="named 'a'"):
        settings_from(settings({"name": "a", "key": "x1"}, {"name": "a", "key": "x2"}))
    with pytest.raises(SettingsError, match="'b' has the same key as 'a'") as err:
        create_app(settings_from(settings({"name": "a", "key": "v-same"}, {"name": "b", "key": "v-same"})),
                   make_registry(echo_backend))
    assert "v-same" not in str(err.value)


async def test_a_reload_that_removes_a_key_refuses_its_next_request(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMPOOL_KEY_B", "k-b-from-env")
    path = tmp_path / "settings.json"
    data = settings({"name": "a", "key": "k-a"}, {"name": "b", "key_env": "LLMPOOL_KEY_B", "max_inflight": 2})
    path.write_text(json.dumps(data))
    app = create_app(settings_from(data), make_registry(echo_backend), settings_paths=(str(path), None))
    async with TestClient(TestServer(app)) as client:
        await app[POOL].startup_done.wait()
        assert (await post(client, "k-b-from-env")).status == 200
        data["service"]["api_keys"] = [{"name": "a", "key": "k-a", "models": ["slow"]}]
        path.write_text(json.dumps(data))
        body = await (await client.post("/v1/admin/settings/reload", headers=ADMIN)).json()
        assert body["service_restart_required"] is False, "keys take effect without a restart"
        assert (await post(client, "k-b-from-env")).status == 401
        assert (await post(client, "k-a")).status == 403, "the changed rules apply too"
        # An unset key variable in the new file is a 400 and the keys stay as they were.
        data["service"]["api_keys"].append({"name": "c", "key_env": "LLMPOOL_KEY_UNSET"})
        path.write_text(json.dumps(data))
        resp = await client.post("/v1/admin/settings/reload", headers=ADMIN)
        assert resp.status == 400 and "LLMPOOL_KEY_UNSET" in (await detail(resp))["message"]
        assert (await post(client, "k-a", "slow")).status == 200


async def test_a_request_waiting_for_a_place_of_its_key_times_out_or_leaves(make_client: Any) -> None:
    client = await make_client(settings({"name": "batch", "key": "k-b", "max_inflight": 1, "max_queued": 5}))
    first = asyncio.create_task(post(client, "k-b", "slow", "a b c d e f"))  # ~0.3 s
    await asyncio.sleep(0.05)
    resp = await post(client, "k-b", "echo", queue_timeout_s=0.1)
    assert resp.status == 503 and (await detail(resp))["code"] == "queue_timeout"
    leaving = asyncio.create_task(post(client, "k-b", "echo"))
    await asyncio.sleep(0.05)
    leaving.cancel()  # a client gone while waiting for a place takes none
    assert (await first).status == 200
    assert (await post(client, "k-b", "echo")).status == 200
    usage = await (await client.get("/v1/admin/usage", headers=ADMIN)).json()
    assert usage["keys"]["batch"]["requests"] == {"ok": 2, "error": 0, "rejected": 1, "cancelled": 1}
    state = client.server.app[TENANTS].ring.tenants[0].state
    assert state.inflight == 0 and not state.waiters
