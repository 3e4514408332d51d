"""API keys and remote models (issue 15): ``allow_remote: false`` on a key, prices and a
key's monthly ``remote_budget`` kept in SQLite across a restart. Against the fake
upstream, whose every answer reports 7 prompt and 3 completion tokens."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from remote_test_support import remote_entry

from llmpoold.http.app import create_app
from llmpoold.http.keys import POOL
from llmpoold.testing import make_registry, settings_from

pytestmark = pytest.mark.timeout(60)

ADMIN = {"Authorization": "Bearer root-key"}


def ask(key: str, **extra: Any) -> dict[str, Any]:
    return {"json": {"model": "r", "input": "Say hello.", "allow_remote": True, **extra},
            "headers": {"Authorization": f"Bearer {key}"}}


def app_for(base_url: str, state_dir: Path) -> Any:
    # 0.1 per thousand tokens both ways: each answer (7 + 3 tokens) costs 1.0.
    model = remote_entry(base_url, "fake-model", remote_price_per_million_input=100_000,
                         remote_price_per_million_output=100_000)
    data = {"service": {"admin_api_key": "root-key", "api_keys": [
                {"name": "capped", "key": "k-capped", "remote_budget": 2.0},
                {"name": "local-only", "key": "k-local", "allow_remote": False},
                {"name": "free", "key": "k-free"}]},
            "engine": {"state_dir": str(state_dir), "models": {"r": model}}}
    return create_app(settings_from(data), make_registry("openai_compatible"))


async def started(app: Any) -> TestClient:
    client = TestClient(TestServer(app))
    await client.start_server()
    await app[POOL].startup_done.wait()
    return client


async def test_a_spent_budget_stops_remote_calls_and_survives_a_restart(fake_upstream: Any, remote_key: str,
                                                                        tmp_path: Path) -> None:
    client = await started(app_for(fake_upstream.base_url, tmp_path))
    try:
        for _ in range(2):
            assert (await client.post("/v1/responses", **ask("k-capped"))).status == 200
        resp = await client.post("/v1/responses", **ask("k-capped"))
        assert resp.status == 429
        assert (await resp.json())["detail"] == {"code": "tenant_budget_exhausted", "model": "r",
                                                 "message": "this API key's remote budget for the month is spent"}
        assert int(resp.headers["Retry-After"]) >= 1  # the next calendar month
        assert len(fake_upstream.calls) == 2, "a refused call never reaches the upstream"
        chat = {"json": {"model": "r", "messages": [{"role": "user", "content": "hi"}], "allow_remote": True},
                "headers": {"Authorization": "Bearer k-capped"}}
        resp = await client.post("/openai/v1/chat/completions", **chat)
        assert resp.status == 429 and (await resp.json())["error"]["code"] == "tenant_budget_exhausted"
        assert (await client.post("/v1/responses", **ask("k-free"))).status == 200, "other keys are not capped"
        usage = (await (await client.get("/v1/admin/usage", headers=ADMIN)).json())["keys"]
        assert usage["capped"]["remote_cost"] == pytest.approx(2.0)
        assert usage["capped"]["remote_budget"]["spent"] == pytest.approx(2.0)
        assert usage["capped"]["remote_budget"]["remaining"] == 0
        assert usage["free"]["remote_cost"] == pytest.approx(1.0) and "remote_budget" not in usage["free"]
        metrics = await (await client.get("/metrics")).text()
        assert 'llmpool_key_remote_cost_total{key="capped"} 2.0' in metrics
    finally:
        await client.close()
    assert (tmp_path / "usage.sqlite3").exists()
    client = await started(app_for(fake_upstream.base_url, tmp_path))  # the daemon restarted
    try:
        resp = await client.post("/v1/responses", **ask("k-capped"))
        assert resp.status == 429 and (await resp.json())["detail"]["code"] == "tenant_budget_exhausted"
        assert len(fake_upstream.calls) == 3
        usage = (await (await client.get("/v1/admin/usage", headers=ADMIN)).json())["keys"]
        assert usage["capped"]["remote_budget"]["spent"] == pytest.approx(2.0)
    finally:
        await client.close()


async def test_a_key_without_allow_remote_is_refused_whatever_the_body_says(fake_upstream: Any, remote_key: str,
                                                                            tmp_path: Path) -> None:
    client = await started(app_for(fake_upstream.base_url, tmp_path))
    try:
        resp = await client.post("/v1/responses", **ask("k-local"))
        assert resp.status == 403
        assert (await resp.json())["detail"] == {"code": "remote_execution_disallowed", "model": "r",
                                                 "message": "remote execution is not allowed for this API key"}
        resp = await client.post("/v1/responses", **ask("k-free", allow_remote=False))
        assert resp.status == 403, "a key that allows remote still needs the body's opt-in"
        assert fake_upstream.calls == []
    finally:
        await client.close()


def test_an_unwritable_state_dir_is_a_settings_error(tmp_path: Path, remote_key: str) -> None:
    from llmpoold.config import SettingsError

    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(SettingsError, match="engine.state_dir"):
        app_for("http://127.0.0.1:9/v1", blocker / "state")
