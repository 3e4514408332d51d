"""SIGTERM/SIGINT on a real daemon process: stop accepting, finish in-flight work,
unload, exit 0."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(60)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_daemon(tmp_path: Path, settings: dict) -> tuple[subprocess.Popen[str], int]:
    port = free_port()
    path = tmp_path / "settings.json"
    path.write_text(json.dumps(settings))
    proc = subprocess.Popen([sys.executable, str(Path(__file__).parent / "echo_daemon.py"), "--settings", str(path),
                             "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as resp:
                if json.load(resp)["ready"]:
                    return proc, port
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"daemon did not become ready: {proc.communicate()[0]}")


def post(port: int, body: dict, results: list) -> None:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/responses", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            results.append((resp.status, json.load(resp)))
    except Exception as exc:  # noqa: BLE001 - the test inspects it
        results.append((None, exc))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_lets_inflight_request_finish_then_exits_0(tmp_path: Path, sig: signal.Signals) -> None:
    proc, port = start_daemon(tmp_path, {"service": {"shutdown_timeout_s": 10},
                                         "engine": {"backend": "echo", "models": {"slow": {"echo_delay_s": 0.2}}}})
    try:
        results: list = []
        worker = threading.Thread(target=post, args=(port, {"model": "slow", "input": "one two three four five"},
                                                     results))
        worker.start()
        time.sleep(0.5)
        os.kill(proc.pid, sig)
        worker.join(timeout=20)
        output, _ = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output
    assert results and results[0][0] == 200, results
    assert results[0][1]["output_text"] == "one two three four five"
    assert "model_unloaded" in output and "Traceback" not in output
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1)
