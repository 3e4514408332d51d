"""The daemon's own cost per request: the full HTTP + admission + scheduler path in
front of a backend that does nothing (the ``echo`` test backend, no delay).

A daemon runs in a child process (as ``llmpoold`` runs: JSON logs, one line per
request, here to /dev/null) with two echo models that differ only in their queue,
``echo-fifo`` (FifoQueue) and ``echo-fair`` (the fair queue, requests spread over 4
fairness keys). Each replica takes 64 requests at once, so nothing waits for a slot and
what is measured is overhead, not queueing. The parent drives it with aiohttp at
concurrency 1, 8 and 64, alternating the two queues round by round so that load from
other processes hits both alike.

Figures per (queue, concurrency):

- ``req/s``: completed requests per second of wall time (client and daemon share
  the machine's cores);
- ``pool-backend p50/p99``: the daemon's ``pool_total_wall_ms`` minus
  ``backend_inference_wall_ms`` from each response: handler entry to response built,
  minus the runtime's stream (admission, queue, lease, result, metrics);
- ``bridge p50``: ``backend_inference_wall_ms`` minus the runtime's own generate time:
  the hop to the runtime's thread and back (counted as backend time by the daemon);
- ``e2e-gen p50/p99``: the client's round trip minus the echo runtime's own generate
  time: everything a client pays beyond generation (HTTP both ways, JSON, thread
  bridge, scheduler, and this client itself).

Then the queue policies alone: push + pop + complete per job, in microseconds.

    python bench/bench_overhead.py                  # defaults: 3 rounds
    python bench/bench_overhead.py --rounds 1 --requests 400
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

ROOT = Path(__file__).resolve().parent.parent
KEYS = ("team-a", "team-b", "team-c", "team-d")


# ----- the daemon (child process) -----------------------------------------------------------


def serve(settings_path: str, port: int) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    import echo_backend
    from aiohttp import web

    from llmpoold.config import load_settings
    from llmpoold.fairness import fair_queue_factory
    from llmpoold.http.app import create_app
    from llmpoold.http.keys import POOL
    from llmpoold.logs import configure_logging
    from llmpoold.pool import fifo_queue_factory
    from llmpoold.testing import make_registry

    settings = load_settings(settings_path)
    configure_logging("info", json_lines=True)
    app = create_app(settings, make_registry(echo_backend))

    def by_name(model: str, s: Any) -> Any:
        return fifo_queue_factory(model, s) if model.endswith("fifo") else fair_queue_factory(model, s)

    app[POOL].queue_factory = by_name
    web.run_app(app, host="127.0.0.1", port=port, print=None, handler_cancellation=True, access_log=None)


# ----- the client ---------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


async def drive(session: Any, url: str, model: str, concurrency: int, total: int) -> dict[str, Any]:
    overhead: list[float] = []
    added: list[float] = []
    bridge: list[float] = []
    counter = iter(range(total))

    async def worker() -> None:
        for i in counter:
            body: dict[str, Any] = {"model": model, "input": "hello", "decoding": {"max_tokens": 4}}
            if model.endswith("fair"):
                body["fairness_key"] = KEYS[i % len(KEYS)]
            start = time.perf_counter()
            async with session.post(url, json=body) as resp:
                data = await resp.json()
            rtt_ms = (time.perf_counter() - start) * 1000
            assert resp.status == 200, data
            m = data["metrics"]
            overhead.append(m["pool_total_wall_ms"] - m["backend_inference_wall_ms"])
            added.append(rtt_ms - (m["gpu_generate_total_ms"] or 0.0))
            bridge.append(m["backend_inference_wall_ms"] - (m["gpu_generate_total_ms"] or 0.0))

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    return {"rps": total / wall, "overhead": overhead, "added": added, "bridge": bridge}


async def run_client(port: int, levels: list[int], requests: int, rounds: int) -> None:
    import aiohttp

    url = f"http://127.0.0.1:{port}/v1/responses"
    connector = aiohttp.TCPConnector(limit=max(levels))
    results: dict[tuple[str, int], list[dict[str, Any]]] = {}
    async with aiohttp.ClientSession(connector=connector) as session:
        for model in ("echo-fifo", "echo-fair"):  # warm up both paths
            await drive(session, url, model, 8, 200)
        for _ in range(rounds):
            for concurrency in levels:
                for model in ("echo-fifo", "echo-fair"):
                    total = max(requests, concurrency * 20)
                    results.setdefault((model, concurrency), []).append(
                        await drive(session, url, model, concurrency, total))
    print(f"{'queue':<6} {'conc':>4} {'req/s':>8} {'pool-backend p50':>17} {'p99':>7} {'bridge p50':>11} "
          f"{'e2e-gen p50':>12} {'p99':>7}   (ms; {rounds} round(s))")
    for (model, concurrency), runs in results.items():
        overhead = [v for r in runs for v in r["overhead"]]
        added = [v for r in runs for v in r["added"]]
        bridge = [v for r in runs for v in r["bridge"]]
        rps = statistics.median(r["rps"] for r in runs)
        print(f"{model.removeprefix('echo-'):<6} {concurrency:>4} {rps:>8.0f} {pct(overhead, 0.5):>17.3f} "
              f"{pct(overhead, 0.99):>7.3f} {pct(bridge, 0.5):>11.3f} {pct(added, 0.5):>12.3f} "
              f"{pct(added, 0.99):>7.3f}")


# ----- the queue policies alone -------------------------------------------------------------


def policy_cost(depth: int, jobs: int = 20000) -> None:
    from llmpoold.config import FairnessSettings
    from llmpoold.fairness import FairQueue
    from llmpoold.scheduler import FifoQueue, Job

    settings = FairnessSettings(max_pending_per_key=10**6, max_pending_per_executor=10**6)
    for name, queue in (("fifo", FifoQueue("m", max_pending=10**6)), ("fair", FairQueue("m", settings))):
        for i in range(depth):  # keep ``depth`` jobs waiting over 8 keys
            queue.push(Job(model="m", fairness_key=f"k{i % 8}"), time.perf_counter())
        start = time.perf_counter()
        for i in range(jobs):
            queue.push(Job(model="m", fairness_key=f"k{i % 8}"), time.perf_counter())
            job = queue.pop_next(time.perf_counter())
            assert job is not None
            queue.complete(job, 1.0)
        per_job = (time.perf_counter() - start) / jobs * 1e6
        print(f"policy {name:<5} depth {depth:>4}: {per_job:6.2f} us per push+pop+complete")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--levels", default="1,8,64", help="concurrency levels (default 1,8,64)")
    parser.add_argument("--requests", type=int, default=1000, help="requests per level and queue per round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port)
        return 0

    levels = [int(x) for x in args.levels.split(",")]
    model = {"echo_concurrency": 64, "target_inflight": 64, "isolation": "inline"}
    settings = {"service": {"log_level": "info"},
                "engine": {"backend": "echo", "models": {"echo-fifo": model, "echo-fair": model}}}
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "settings.json")
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(settings, fh)
        env = {**os.environ, "LLM_POOL_LOCAL_SETTINGS_PATH": os.path.join(tmp, "none.json")}
        child = subprocess.Popen([sys.executable, __file__, "--serve", path, "--port", str(port)],
                                 stderr=subprocess.DEVNULL, env=env)
        try:
            asyncio.run(wait_ready(port))
            print(f"daemon pid {child.pid}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}")
            asyncio.run(run_client(port, levels, args.requests, args.rounds))
        finally:
            child.terminate()
            child.wait(timeout=30)
    for depth in (0, 64, 1024):
        policy_cost(depth)
    return 0


async def wait_ready(port: int) -> None:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        for _ in range(300):
            try:
                async with session.get(f"http://127.0.0.1:{port}/readyz") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError("the daemon did not become ready")


if __name__ == "__main__":
    sys.exit(main())
