"""Settings: file discovery, deep merge, validation messages, the CLI's exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from llmpoold.config import SettingsError, deep_merge, load_settings, parse_settings, settings_paths


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
    assert settings_paths() == (settings, local, True)
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
    ({"engine": {"models": {"m": {"replicas": 0}}}}, "engine.models.m.replicas"),
    ({"engine": {"fairness": {"max_pending_per_key": 0}}},
     "settings.json: engine.fairness.max_pending_per_key must be an integer greater than 0 (got 0)"),
    ({"engine": {"fairness": {"default_weight": -2}}},
     "settings.json: engine.fairness.default_weight must be a finite number greater than 0 (got -2)"),
    ({"engine": {"fairness": {"weights": {"team-a": "heavy"}}}},
     "engine.fairness.weights['team-a'] must be a finite number greater than 0 (got \"heavy\")"),
    ({"engine": {"fairness": {"soft_max_inflight_per_key": 1.5}}}, "(got 1.5)"),
    ({"engine": {"fairness": 3}}, "settings.json: engine.fairness must be an object (got 3)"),
    ({"engine": {"models": {"m": {"replicas": 2, "replica_max": 1}}}}, "engine.models.m"),
    ({"service": {"log_level": "loud"}}, "service.log_level: "),
])
def test_validation_errors_name_field_path_and_value(data: dict, expected: str) -> None:
    with pytest.raises(SettingsError) as info:
        parse_settings(data, source="settings.json")
    assert expected in str(info.value)
    assert str(info.value).startswith("settings.json: ")


def test_example_config_in_repo_is_valid() -> None:
    root = Path(__file__).parent.parent
    settings = load_settings(root / "etc/llmpool/settings.json", root / "etc/llmpool/local.json")
    assert settings.engine.models


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "llmpoold", *args], capture_output=True, text=True, timeout=60)


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


def test_cli_unknown_backend_key_exits_2(tmp_path: Path) -> None:
    """Backend keys are validated by the installed plugin's options model."""
    path = write(tmp_path / "settings.json", {"engine": {"models": {"m": {
        "backend": "gguf", "model_path": str(tmp_path / "x.gguf"), "gguf_n_ctxx": 512}}}})
    result = run_cli("--settings", str(path), "--check")
    assert result.returncode == 2, result.stderr
    assert f"{path}: engine.models.m.gguf_n_ctxx: unknown key" in result.stderr  # names the file too
    assert "Traceback" not in result.stderr


def test_cli_check_accepts_the_example_config() -> None:
    root = Path(__file__).parent.parent
    result = run_cli("--settings", str(root / "etc/llmpool/settings.json"),
                     "--local", str(root / "etc/llmpool/local.json"), "--check")
    assert result.returncode == 0, result.stderr
    assert "settings OK" in result.stdout
