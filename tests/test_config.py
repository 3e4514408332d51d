"""Settings: file discovery, deep merge, validation messages, the CLI's exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from llmpoold.config import (
    ServiceSettings,
    SettingsError,
    deep_merge,
    is_loopback_host,
    key_matches,
    load_settings,
    parse_settings,
    resolve_model_options,
    settings_paths,
)

EXAMPLE_KEYS = {"LLMPOOL_API_KEY": "example-inference-key", "LLMPOOL_ADMIN_KEY": "example-admin-key"}


def write(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data) if not isinstance(data, str) else data, encoding="utf-8")
    return path


def test_deep_merge_overrides_leaves_and_keeps_siblings() -> None:
    base = {"engine": {"models": {"a": {"enabled": True, "replicas": 1}}, "backend": "gguf"}}
    local = {"engine": {"models": {"a": {"replicas": 2}, "b": {"enabled": False}}}}
    merged = deep_merge(base, local)
    assert merged == {"engine": {"backend": "gguf", "models": {
        "a": {"enabled": True, "replicas": 2}, "b": {"enabled": False}}}}
    assert base["engine"]["models"]["a"]["replicas"] == 1, "inputs are not mutated"


def test_local_json_next_to_settings_is_merged(tmp_path: Path) -> None:
    settings = write(tmp_path / "settings.json", {"service": {"port": 9000},
                                                  "engine": {"backend": "echo", "models": {"m": {}}}})
    write(tmp_path / "local.json", {"service": {"port": 9100}})
    loaded = load_settings(settings)
    assert loaded.service.port == 9100
    assert loaded.service.host == "127.0.0.1"


def test_env_vars_name_the_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = write(tmp_path / "s.json", {"service": {"port": 9001}})
    local = write(tmp_path / "l.json", {"service": {"log_level": "DEBUG"}})
    monkeypatch.setenv("LLM_POOL_SETTINGS_PATH", str(settings))
    monkeypatch.setenv("LLM_POOL_LOCAL_SETTINGS_PATH", str(local))
    assert settings_paths() == (settings, local, False)  # only --settings must exist (the seed)
    loaded = load_settings()
    assert (loaded.service.port, loaded.service.log_level) == (9001, "debug")


def test_named_settings_file_must_exist(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="settings file not found"):
        load_settings(tmp_path / "missing.json")


def test_invalid_json_names_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path / "settings.json", '{"service": {"port": 80,}}')
    with pytest.raises(SettingsError, match=r"invalid JSON at line 1 column"):
        load_settings(path)


@pytest.mark.parametrize(("data", "expected"), [
    ({"service": {"port": "eighty"}}, "service.port: "),
    ({"service": {"port": 0}}, "service.port: Input should be greater than or equal to 1 (got 0)"),
    ({"servce": {}}, "servce: unknown key"),
    ({"engine": {"fairness": {"max_pending_per_key": 0}}},
     "settings.json: engine.fairness.max_pending_per_key must be an integer greater than 0 (got 0)"),
    ({"engine": {"fairness": {"default_weight": -2}}},
     "settings.json: engine.fairness.default_weight must be a finite number greater than 0 (got -2)"),
    ({"engine": {"fairness": {"weights": {"team-a": "heavy"}}}},
     "engine.fairness.weights['team-a'] must be a finite number greater than 0 (got \"heavy\")"),
    ({"engine": {"fairness": {"soft_max_inflight_per_key": 1.5}}}, "(got 1.5)"),
    ({"engine": {"fairness": 3}}, "settings.json: engine.fairness must be an object (got 3)"),
    ({"service": {"log_level": "loud"}}, "service.log_level: "),
])
def test_validation_errors_name_field_path_and_value(data: dict, expected: str) -> None:
    with pytest.raises(SettingsError) as info:
        parse_settings(data, source="settings.json")
    assert expected in str(info.value)
    assert str(info.value).startswith("settings.json: ")


def test_example_config_in_repo_is_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in EXAMPLE_KEYS.items():
        monkeypatch.setenv(name, value)
    root = Path(__file__).parent.parent
    settings = load_settings(root / "etc/llmpool/settings.json", root / "etc/llmpool/local.json")
    assert settings.engine.models


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "llmpoold", *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


@pytest.mark.parametrize("service", [{"api_keys": "sk-secret-1"}, {"api_keys": ["ok", 7]},
                                     {"admin_api_key": ["sk-secret-1"]}])
def test_validation_errors_never_echo_api_keys(service: dict[str, Any]) -> None:
    with pytest.raises(SettingsError) as exc:
        parse_settings({"service": service})
    assert "service." in str(exc.value) and "sk-secret-1" not in str(exc.value) and "got" not in str(exc.value)


def test_cli_invalid_settings_exits_2_without_traceback(tmp_path: Path) -> None:
    path = write(tmp_path / "settings.json", {"service": {"port": -1}})
    result = run_cli("--settings", str(path), "--check")
    assert result.returncode == 2
    assert f"{path}: service.port" in result.stderr and "(got -1)" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_unknown_backend_key_is_a_warning_and_strict_exits_1(tmp_path: Path) -> None:
    """A key nobody knows is ignored with a warning naming it (never its value) and a
    suggestion; ``--check --strict`` makes the warning an exit status of 1."""
    path = write(tmp_path / "settings.json", {"engine": {"models": {"m": {
        "backend": "gguf", "model_path": str(tmp_path / "x.gguf"), "gguf_n_ctxx": "sk-literal-512"}}}})
    result = run_cli("--settings", str(path), "--check")
    assert result.returncode == 0, result.stderr
    assert ("warning: engine.models.m.gguf_n_ctxx: unknown key, ignored; did you mean 'gguf_n_ctx'?"
            in result.stdout)
    assert "settings OK" in result.stdout and "1 warning(s)" in result.stdout
    strict = run_cli("--settings", str(path), "--check", "--strict")
    assert strict.returncode == 1, strict.stderr
    assert "sk-literal-512" not in result.stdout + result.stderr + strict.stdout + strict.stderr
    assert "Traceback" not in result.stderr + strict.stderr


def test_cli_check_accepts_the_example_config() -> None:
    root = Path(__file__).parent.parent
    result = run_cli("--settings", str(root / "etc/llmpool/settings.json"),
                     "--local", str(root / "etc/llmpool/local.json"), "--check", env=EXAMPLE_KEYS)
    assert result.returncode == 0, result.stderr
    assert "settings OK" in result.stdout


# ----- keys and exposure ----------------------------------------------------------------


@pytest.mark.parametrize("field", ["api_key_envs", "admin_api_key_env"])
@pytest.mark.parametrize("value", [None, ""])
def test_a_key_variable_unset_or_empty_is_an_error(monkeypatch: pytest.MonkeyPatch, field: str,
                                                   value: str | None) -> None:
    """Not dropped silently: a missing key file would otherwise run the daemon open."""
    if value is None:
        monkeypatch.delenv("TEST_LLMPOOL_KEY_VAR", raising=False)
    else:
        monkeypatch.setenv("TEST_LLMPOOL_KEY_VAR", value)
    monkeypatch.setenv("TEST_LLMPOOL_OTHER_VAR", "sk-other-value")
    names = ["TEST_LLMPOOL_OTHER_VAR", "TEST_LLMPOOL_KEY_VAR"] if field == "api_key_envs" else "TEST_LLMPOOL_KEY_VAR"
    with pytest.raises(SettingsError) as exc:
        parse_settings({"service": {field: names}}, source="settings.json")
    message = str(exc.value)
    assert f"settings.json: service.{field}: environment variable 'TEST_LLMPOOL_KEY_VAR' is unset or empty" in message
    assert "sk-other-value" not in message


def test_key_variables_resolve_and_fail_closed_when_they_vanish(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_LLMPOOL_API", "sk-api")
    monkeypatch.setenv("TEST_LLMPOOL_ADMIN", "sk-admin")
    service = parse_settings({"service": {"api_keys": ["lit"], "api_key_envs": ["TEST_LLMPOOL_API"],
                                          "admin_api_key_env": "TEST_LLMPOOL_ADMIN"}}).service
    assert service.resolved_api_keys() == {"lit", "sk-api"} and service.resolved_admin_key() == "sk-admin"
    monkeypatch.setenv("TEST_LLMPOOL_ADMIN", "")
    with pytest.raises(SettingsError, match="'TEST_LLMPOOL_ADMIN' is unset or empty"):
        service.resolved_admin_key()
    monkeypatch.delenv("TEST_LLMPOOL_API")
    with pytest.raises(SettingsError, match="'TEST_LLMPOOL_API' is unset or empty"):
        service.resolved_api_keys()


def test_cli_check_exits_2_naming_an_unset_key_variable(tmp_path: Path) -> None:
    path = write(tmp_path / "settings.json", {"service": {"admin_api_key_env": "TEST_LLMPOOL_UNSET_ADMIN"}})
    env = {k: v for k, v in os.environ.items() if k != "TEST_LLMPOOL_UNSET_ADMIN"}
    result = subprocess.run([sys.executable, "-m", "llmpoold", "--settings", str(path), "--check"],
                            capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 2, result.stderr
    assert "service.admin_api_key_env: environment variable 'TEST_LLMPOOL_UNSET_ADMIN' is unset or empty" \
        in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(("service", "expected"), [
    ({"api_keys": ["k", " "]}, "service.api_keys: API keys must not be blank"),
    ({"admin_api_key": ""}, "service.admin_api_key: the admin key must not be blank (omit it or use null)"),
    ({"host": "0.0.0.0", "api_keys": [""]}, "service.api_keys: API keys must not be blank"),
])
def test_blank_keys_are_errors_not_silently_dropped(service: dict[str, Any], expected: str) -> None:
    with pytest.raises(SettingsError) as exc:
        parse_settings({"service": service})
    assert expected in str(exc.value) and "got" not in str(exc.value)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "", "192.168.1.10", "example.com"])
def test_non_loopback_bind_without_keys_is_refused(host: str) -> None:
    with pytest.raises(SettingsError) as exc:
        parse_settings({"service": {"host": host}}, source="settings.json")
    assert f"settings.json: service.host: binding '{host}' (not loopback) with no API or admin key" in str(exc.value)
    assert "service.allow_unauthenticated: true" in str(exc.value)
    assert parse_settings({"service": {"host": host, "allow_unauthenticated": True}}).service.host == host
    assert parse_settings({"service": {"host": host, "api_keys": ["k"]}}).service.host == host
    assert parse_settings({"service": {"host": host, "admin_api_key": "k"}}).service.host == host


def test_cli_host_override_is_checked_too(tmp_path: Path) -> None:
    path = write(tmp_path / "settings.json", {})
    result = run_cli("--settings", str(path), "--host", "0.0.0.0", "--check")
    assert result.returncode == 2, result.stderr
    assert "command line: service.host: binding '0.0.0.0' (not loopback)" in result.stderr
    assert run_cli("--settings", str(path), "--host", "127.0.0.1", "--check").returncode == 0


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("127.1.2.3", True), ("::1", True), ("[::1]", True), ("localhost", True),
    ("LOCALHOST.", True), ("app.localhost", True), ("0.0.0.0", False), ("::", False), ("", False),
    ("10.0.0.1", False), ("localhost.example.com", False), ("127.0.0.1.nip.io", False)])
def test_is_loopback_host(host: str, loopback: bool) -> None:
    assert is_loopback_host(host) is loopback


def test_key_matches_compares_every_key_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    import hmac

    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    assert key_matches("k1", ["k1", "k2", "k3"]) and len(calls) == 3  # no early exit on a match
    assert not key_matches("k", ["k1", "k2"]) and not key_matches("K1", ["k1"])
    assert key_matches("clé-ü", ["clé-ü"]) and not key_matches("\ud800", ["x"])  # any str, no TypeError
    assert not key_matches(None, ["k1"]) and not key_matches("", ["", "k1"]) and not key_matches("k1", [])


# ----- HTTP hardening settings ------------------------------------------------------------


def test_hardening_settings_defaults_and_normalisation() -> None:
    service = ServiceSettings()
    assert (service.admin_open, service.allow_unauthenticated, service.allowed_origins, service.allowed_hosts,
            service.stream_write_timeout_s) == (False, False, (), (), 30.0)
    service = parse_settings({"service": {
        "admin_open": True, "allowed_origins": ["HTTPS://App.Example.com/", "http://localhost:3000",
                                               "https://app.example.com"],
        "allowed_hosts": ["LLM.internal.", "10.0.0.5", "[::1]"], "stream_write_timeout_s": 2.5}}).service
    assert service.admin_open is True
    assert service.allowed_origins == ("https://app.example.com", "http://localhost:3000")
    assert service.allowed_hosts == ("llm.internal", "10.0.0.5", "[::1]")
    assert service.stream_write_timeout_s == 2.5


@pytest.mark.parametrize(("service", "expected"), [
    ({"allowed_origins": ["app.example.com"]}, "service.allowed_origins: allowed_origins entries must be origins"),
    ({"allowed_origins": ["https://app.example.com/path"]}, "scheme://host[:port]"),
    ({"allowed_origins": ["ftp://x"]}, "scheme http or https"),
    ({"allowed_origins": "https://a.example"}, "service.allowed_origins: Input should be a valid tuple"),
    ({"allowed_hosts": ["llm.internal:8010"]}, "service.allowed_hosts: allowed_hosts entries must be host names"),
    ({"allowed_hosts": ["http://llm.internal"]}, "without scheme, port or path"),
    ({"allowed_hosts": [" "]}, "allowed_hosts entries"),
    ({"stream_write_timeout_s": 0}, "service.stream_write_timeout_s: Input should be greater than 0 (got 0)"),
    ({"stream_write_timeout_s": "inf"}, "service.stream_write_timeout_s: Input should be a finite number"),
    ({"admin_open": "sometimes"}, "service.admin_open: Input should be a valid boolean"),
    ({"allow_unauthenticated": 2}, "service.allow_unauthenticated: Input should be a valid boolean"),
])
def test_hardening_settings_are_validated(service: dict[str, Any], expected: str) -> None:
    with pytest.raises(SettingsError) as exc:
        parse_settings({"service": service})
    assert expected in str(exc.value)


# ----- prompt_format ----------------------------------------------------------------------


def test_unknown_prompt_format_fails_the_model_with_a_suggestion() -> None:
    models = parse_settings({"engine": {"models": {
        "m": {"backend": "gguf", "prompt_format": "gemma3"}, "n": {"prompt_format": "zzz"}}}}).engine.models
    message = models["m"].error or ""
    assert message.startswith("engine.models.m.prompt_format: unknown prompt format; "
                              "did you mean 'gemma3_template'? known: chat_template, ")
    assert message.endswith('(got "gemma3")')
    assert "did you mean" not in (models["n"].error or "") and "known: " in (models["n"].error or "")
    for name in ("generic", "gemma3_template", "raw", "chat_template"):
        assert parse_settings({"engine": {"models": {"m": {"prompt_format": name}}}}).engine.models["m"].error is None


def test_cli_check_lists_a_model_with_an_unknown_prompt_format_as_failed(tmp_path: Path) -> None:
    path = write(tmp_path / "settings.json", {"engine": {"models": {"m": {
        "backend": "gguf", "model_path": str(tmp_path / "x.gguf"), "prompt_format": "gemma3"}}}})
    result = run_cli("--settings", str(path), "--check")
    assert result.returncode == 0, result.stderr
    assert ("failed: model 'm': engine.models.m.prompt_format: unknown prompt format; "
            "did you mean 'gemma3_template'?") in result.stdout
    assert run_cli("--settings", str(path), "--check", "--strict").returncode == 1


# ----- no values of unknown or secret keys --------------------------------------------------


@pytest.mark.parametrize("data", [
    {"service": {"api_kyes": ["sk-literal-123"]}},
    {"service": {"admin_key": "sk-literal-123"}},
    {"engine": {"decoding": {"stopp": "sk-literal-123"}}},
])
def test_unknown_keys_never_echo_their_value(data: dict[str, Any]) -> None:
    with pytest.raises(SettingsError) as exc:
        parse_settings(data)
    assert "unknown key" in str(exc.value)
    assert "sk-literal-123" not in str(exc.value) and "got" not in str(exc.value)


def test_backend_keys_unknown_or_secret_never_echo_their_value() -> None:
    from pydantic import BaseModel, ConfigDict

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid")
        remote_api_key_env: str = "X"
        client_secret: int = 0
        n: int = 0

    model = parse_settings({"engine": {"models": {"my-key-model": {
        "backend": "x", "openai_api_key": "sk-literal-123", "client_secret": "sk-literal-456", "n": "many"}}}}
    ).engine.models["my-key-model"]
    with pytest.raises(SettingsError) as exc:
        resolve_model_options(model, Options, backend="x", requires_model_path=False)
    message = str(exc.value)
    assert "engine.models.my-key-model.openai_api_key: unknown key" in message
    assert "engine.models.my-key-model.client_secret: " in message
    assert "sk-literal" not in message
    assert 'engine.models.my-key-model.n: Input should be a valid integer, unable to parse string as an integer ' \
           '(got "many")' in message  # other values are still shown (a model name is not a field)


# ----- the seed's per-model tolerance (parse level) -------------------------------------------


def test_replica_counts_below_one_are_clamped_to_one() -> None:
    model = parse_settings({"engine": {"models": {"m": {"replicas": 0, "replica_max": -3,
                                                        "target_inflight": 0}}}}).engine.models["m"]
    assert (model.replicas, model.replica_max, model.target_inflight, model.error) == (1, 1, 1, None)


def test_seed_remote_string_keys_are_lowercased() -> None:
    models = parse_settings({"engine": {"models": {
        "a": {"remote_thinking": "Disabled", "remote_api_kind": " CHAT_COMPLETIONS ",
              "remote_health_check": "CONFIG_ONLY"},
        "b": {"remote_health_check": "  "}}}}).engine.models
    assert models["a"].backend_keys == {"remote_thinking": "disabled", "remote_api_kind": "chat_completions",
                                        "remote_health_check": "config_only"}
    assert models["b"].backend_keys == {"remote_health_check": "config_only"}  # blank: the default


def test_non_object_model_entries_are_skipped() -> None:
    engine = parse_settings({"engine": {"models": {"a": "gguf", "b": [], "c": None, "d": {}}}}).engine
    assert list(engine.models) == ["d"]
    assert engine.skipped_models == ("a", "b", "c")


@pytest.mark.parametrize(("entry", "expected"), [
    ({"replicas": 2, "replica_max": 1}, "engine.models.m: model 'm' has replicas=2 greater than replica_max=1"),
    ({"enabled": "maybe"}, "engine.models.m.enabled: Input should be a valid boolean"),
    ({"thinking_token_budget_max": 4097}, "engine.models.m.thinking_token_budget_max: "
                                          "thinking_token_budget_max must be at most 4096"),
    ({"modalities": ["smell"]}, "engine.models.m.modalities: modality must be one of: text, image, audio"),
])
def test_invalid_common_keys_fail_only_that_model(entry: dict[str, Any], expected: str) -> None:
    models = parse_settings({"engine": {"models": {"m": {"backend": "gguf", **entry}, "ok": {}}}}).engine.models
    assert models["m"].error is not None and models["m"].error.startswith(expected), models["m"].error
    assert models["m"].backend == "gguf"
    assert models["ok"].error is None


def test_thinking_token_budget_max_is_recorded_in_the_definition() -> None:
    models = parse_settings({"engine": {"models": {"m": {"thinking_token_budget_max": 4096}, "n": {}}}}).engine.models
    assert models["m"].thinking_token_budget_max == 4096 and models["m"].error is None
    assert models["m"].definition()["thinking_token_budget_max"] == 4096
    assert "thinking_token_budget_max" not in models["n"].definition()
    unset = parse_settings({"engine": {"models": {"m": {"thinking_token_budget_max": 0}}}}).engine.models["m"]
    assert (unset.thinking_token_budget_max, unset.error) == (None, None)  # the seed: <= 0 means unset


@pytest.mark.parametrize("data", [
    {"engine": {"models": ["m"]}},
    {"engine": {"backend": 3}},
    {"engine": "gguf"},
    {"engine": {"decoding": {"max_tokens": "lots"}}},
    {"engine": {"skipped_models": []}},  # the daemon's own record, not a settings key
])
def test_global_structure_errors_stay_fatal(data: dict[str, Any]) -> None:
    with pytest.raises(SettingsError):
        parse_settings(data)


def test_legacy_settings_env_is_read_after_the_new_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    legacy = write(tmp_path / "legacy.json", {"service": {"port": 9002}})
    monkeypatch.delenv("LLM_POOL_SETTINGS_PATH", raising=False)
    monkeypatch.setenv("LLM_RESPONSES_API_SETTINGS_PATH", str(legacy))
    assert settings_paths()[0] == legacy
    assert load_settings().service.port == 9002
    current = write(tmp_path / "current.json", {"service": {"port": 9003}})
    monkeypatch.setenv("LLM_POOL_SETTINGS_PATH", str(current))
    assert load_settings().service.port == 9003


def test_missing_files_from_the_environment_read_as_empty(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLM_POOL_SETTINGS_PATH", str(tmp_path / "missing.json"))
    monkeypatch.setenv("LLM_POOL_LOCAL_SETTINGS_PATH", str(tmp_path / "missing-local.json"))
    settings = load_settings()
    assert settings.engine.models == {} and settings.service.port == 8010
    with pytest.raises(SettingsError, match="settings file not found"):
        load_settings(tmp_path / "missing.json")  # named on the command line: must exist
