"""A real ``llmpoold`` process for tests that talk to it over HTTP (CLI, console, schemathesis).

It runs ``tests/echo_daemon.py`` (the real CLI, with every installed plugin plus the echo
test backend) on a free port, logs to a file (never a pipe nobody reads), and is stopped
with SIGTERM at the end of the ``with`` block.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class Daemon:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path
    settings: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def running_daemon(tmp_path: Path, settings: dict[str, Any], *, ready_timeout: float = 90.0,
                   env: dict[str, str] | None = None) -> Iterator[Daemon]:
    """Start the daemon with ``settings`` and wait until ``/readyz`` says ready."""
    port = free_port()
    path = tmp_path / "settings.json"
    path.write_text(json.dumps(settings))
    log = tmp_path / "daemon.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, str(Path(__file__).parent / "echo_daemon.py"), "--settings",
                                 str(path), "--port", str(port)], stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})})
    daemon = Daemon(f"http://127.0.0.1:{port}", proc, log, path)
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"daemon exited {proc.returncode}: {log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{daemon.url}/readyz", timeout=2) as resp:
                    if json.load(resp)["ready"]:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"daemon not ready after {ready_timeout}s: {log.read_text()[-3000:]}")
            time.sleep(0.1)
        yield daemon
    finally:
        daemon.stop()
