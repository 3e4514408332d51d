"""CTranslate2 dynamic batching: N concurrent requests on one replica, batched
(``ct2_max_batch_size`` N) against one at a time (``ct2_max_batch_size`` 1), same model,
same process, alternating. Gemma 3 270M converted by CTranslate2's converter (cached by
the ct2 tests' helper). Prints aggregate tokens/s, per-request latency and the ratio.

    python bench/bench_ct2.py [--requests 8] [--max-tokens 32] [--rounds 3] [--compute-type int8]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "plugins" / "llmpool_ct2" / "tests"))

from ct2_test_model import ct2_gemma3_270m  # noqa: E402

from llmpoold.config import resolve_model_options  # noqa: E402
from llmpoold.testing import collect, make_registry, make_request, settings_from  # noqa: E402
from llmpoold.types import Completion  # noqa: E402

PROMPTS = ["The capital of France is", "Once upon a time", "My favourite food is", "The sea is",
           "In the morning I", "The best way to learn is", "Music is", "Yesterday we went"]


def load(registry: Any, path: str, batch: int, compute_type: str) -> Any:
    settings = settings_from({"engine": {"models": {"c": {
        "backend": "ct2", "model_path": path, "prompt_format": "raw", "device": "cpu", "compute_type": compute_type,
        "ct2_max_batch_size": batch, "ct2_batch_wait_ms": 10}}}})
    model = resolve_model_options(settings.engine.models["c"], registry.spec("ct2").options_model, backend="ct2",
                                  requires_model_path=True)
    return registry.hook.llmpool_load(backend="ct2", replica_id=f"c#{batch}", model=model)


def round_(registry: Any, runtime: Any, n: int, max_tokens: int) -> tuple[float, int, list[float]]:
    """Wall seconds, tokens produced, per-request latency (s) for n concurrent requests."""
    done: list[Completion] = []
    latencies: list[float] = []

    def one(i: int) -> None:
        started = time.perf_counter()
        items = collect(registry.hook.llmpool_stream(backend="ct2", runtime=runtime, request=make_request(
            model="c", prompt_format="raw", text=PROMPTS[i % len(PROMPTS)], max_tokens=max_tokens)))
        latencies.append(time.perf_counter() - started)
        done.append(items[-1])  # type: ignore[arg-type]

    started = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - started, sum(c.metrics.output_tokens or 0 for c in done), latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compute-type", default="int8")
    args = parser.parse_args()
    path = ct2_gemma3_270m()
    registry = make_registry("ct2")
    runtimes = {"batched": load(registry, path, args.requests, args.compute_type),
                "one at a time": load(registry, path, 1, args.compute_type)}
    figures: dict[str, list[tuple[float, int, list[float]]]] = {k: [] for k in runtimes}
    round_(registry, runtimes["batched"], 2, 4)  # warm-up
    for _ in range(args.rounds):
        for name, runtime in runtimes.items():
            figures[name].append(round_(registry, runtime, args.requests, args.max_tokens))
    print(f"Gemma 3 270M CTranslate2 {args.compute_type}, {args.requests} concurrent requests x {args.max_tokens} "
          f"tokens, {args.rounds} rounds (medians)")
    rates = {}
    for name, rounds in figures.items():
        rates[name] = statistics.median(tokens / wall for wall, tokens, _ in rounds)
        latency = statistics.median(statistics.median(lat) for _, _, lat in rounds)
        print(f"  {name:<14} {rates[name]:7.1f} tokens/s aggregate, median request latency {latency:6.2f} s")
    print(f"  batch sizes used: {sorted(set(runtimes['batched'].batch_sizes))}")
    print(f"  batched / one at a time: x{rates['batched'] / rates['one at a time']:.2f} throughput")
    for runtime in runtimes.values():
        registry.hook.llmpool_unload(backend="ct2", runtime=runtime)


if __name__ == "__main__":
    main()
