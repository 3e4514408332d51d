"""CTranslate2 through llmpoold against CTranslate2 itself, Gemma 3 270M int8.

At concurrency 1, 4 and 8 (64 greedy output tokens each): aggregate tokens/s of N
concurrent requests through the daemon (``llmpoold`` CLI, dynamic batching, worker
process) against ``Generator.generate_batch`` on a batch of N in this process. Rounds
alternate between the two. Prints figures and ratios; nothing is asserted. The model is
converted by CTranslate2's own converter (cached by the ct2 tests' helper).

    python bench/bench_ct2.py [--rounds 3] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "plugins" / "llmpool_ct2" / "tests"))

from ct2_test_model import ct2_gemma3_270m  # noqa: E402

PROMPTS = ["The capital of France is", "Once upon a time", "My favourite food is", "The sea is",
           "In the morning I", "The best way to learn is", "Music is", "Yesterday we went"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def daemon_round(url: str, n: int, max_tokens: int) -> float:
    """Aggregate tokens/s of n concurrent requests through the daemon."""
    async def one(session: aiohttp.ClientSession, prompt: str) -> int:
        body = {"model": "c", "input": prompt, "decoding": {"max_tokens": max_tokens, "temperature": 0, "top_k": 1}}
        async with session.post(url, json=body) as resp:
            data = await resp.json()
            assert resp.status == 200, data
            return int(data["metrics"]["engine_output_tokens"])

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        started = time.perf_counter()
        tokens = await asyncio.gather(*(one(session, PROMPTS[i % len(PROMPTS)]) for i in range(n)))
        return sum(tokens) / (time.perf_counter() - started)


def raw_round(generator: object, tokenizer: object, n: int, max_tokens: int) -> float:
    batch = [tokenizer.convert_ids_to_tokens(tokenizer(PROMPTS[i % len(PROMPTS)]).input_ids)  # type: ignore[attr-defined]
             for i in range(n)]
    started = time.perf_counter()
    results = generator.generate_batch(batch, max_length=max_tokens, sampling_topk=1,  # type: ignore[attr-defined]
                                       include_prompt_in_result=False, end_token=[tokenizer.eos_token])  # type: ignore[attr-defined]
    return sum(len(r.sequences_ids[0]) for r in results) / (time.perf_counter() - started)


async def wait_ready(url: str, proc: subprocess.Popen[bytes]) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(600):
            if proc.poll() is not None:
                raise SystemExit(f"llmpoold exited ({proc.returncode})")
            try:
                async with session.get(url) as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
    raise SystemExit("llmpoold not ready")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    import ctranslate2
    from transformers import AutoTokenizer

    path = ct2_gemma3_270m()
    port = free_port()
    settings = Path(tempfile.mkdtemp(prefix="bench-ct2-")) / "settings.json"
    settings.write_text(json.dumps({"service": {"port": port, "log_level": "warning"}, "engine": {"models": {"c": {
        "backend": "ct2", "model_path": path, "prompt_format": "raw", "device": "cpu", "compute_type": "int8",
        "ct2_max_batch_size": 8, "ct2_batch_wait_ms": 5}}}}))
    proc = subprocess.Popen([sys.executable, "-m", "llmpoold", "--settings", str(settings)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        asyncio.run(wait_ready(f"http://127.0.0.1:{port}/readyz", proc))
        tokenizer = AutoTokenizer.from_pretrained(path)
        generator = ctranslate2.Generator(path, device="cpu", compute_type="int8")
        url = f"http://127.0.0.1:{port}/v1/responses"
        raw_round(generator, tokenizer, 2, 4)
        asyncio.run(daemon_round(url, 2, 4))
        print(f"Gemma 3 270M CTranslate2 int8, {args.max_tokens} greedy tokens per request, {args.rounds} rounds "
              "(median aggregate tokens/s), ct2_batch_wait_ms 5 (the default), ct2_max_batch_size 8")
        print(f"{'concurrency':>11}{'llmpoold':>10}{'raw':>8}{'ratio':>8}")
        for n in (1, 4, 8):
            ours, raw = [], []
            for _ in range(args.rounds):
                raw.append(raw_round(generator, tokenizer, n, args.max_tokens))
                ours.append(asyncio.run(daemon_round(url, n, args.max_tokens)))
            a, b = statistics.median(ours), statistics.median(raw)
            print(f"{n:>11}{a:>10.1f}{b:>8.1f}{a / b:>8.2f}")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


if __name__ == "__main__":
    main()
