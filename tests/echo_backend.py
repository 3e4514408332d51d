"""A test backend ("echo"): echoes the last user message word by word.

A fake runtime, named so: the daemon's own behaviour (HTTP, queueing, lifecycle,
cancellation) is tested against it; real runtimes are tested in each plugin's tests.
Options let a test make it slow, fail at load, fail mid-stream (a BackendError, or with
``echo_raise`` an exception of no known meaning: fault injection), batch, or produce many
large deltas (``echo_repeat``: the words are echoed that many times over). In a worker
process, ``echo_raw_frame`` is written as is (one length-prefixed frame) to the daemon's
socket by a request whose text contains the word ``inject``: a worker that breaks the
protocol.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel, ConfigDict

from llmpoold import hookimpl
from llmpoold.errors import BackendError, LoadError
from llmpoold.hookspecs import BackendSpec
from llmpoold.prompts import content_text
from llmpoold.types import BackendMetrics, Capabilities, Completion, ModelTraits, TextDelta


class EchoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    echo_delay_s: float = 0.0
    echo_fail_load: str | None = None
    echo_load_delay_s: float = 0.0
    echo_fail_after: int | None = None
    echo_raise: str | None = None  # raise RuntimeError(echo_raise) before the first word
    echo_concurrency: int = 1
    echo_ctx: int = 128
    echo_repeat: int = 1
    echo_raw_frame: str | None = None
    echo_fail_traits: bool = False  # fault injection: the traits hook raises (a plugin bug)
    # Capabilities a test gives the model: the response_format types it "enforces" and
    # whether it honours thinking_token_budget (up to the model's thinking_token_budget_max).
    echo_response_formats: tuple[str, ...] = ("text",)
    echo_thinking_budget: bool = False


class EchoRuntime:
    def __init__(self, replica_id: str, options: EchoOptions) -> None:
        self.replica_id = replica_id
        self.options = options
        self.cancelled: list[str] = []
        self.served: list[str] = []
        self.requests: list[Any] = []  # every GenerationRequest that reached the runtime
        self.active = 0
        self.max_active = 0
        self.lock = threading.Lock()
        self.unloaded = False


RUNTIMES: list[EchoRuntime] = []


class EchoLoadOverride(BaseModel):
    """The override's types (a 422); the range rule is llmpool_check_load_override's (a 400)."""

    echo_ctx: int | None = None


@hookimpl
def llmpool_backends() -> list[BackendSpec]:
    return [BackendSpec(name="echo", aliases=("echo_alias",), options_model=EchoOptions,
                        load_override_keys=frozenset({"echo_ctx", "target_inflight"}),
                        load_override_model=EchoLoadOverride,
                        load_constraints={"echo_ctx": {"kind": "integer", "minimum": 1, "step": 1}},
                        requires_model_path=False)]


@hookimpl
def llmpool_model_traits(backend: str, model: Any) -> ModelTraits | None:
    if backend != "echo":
        return None
    options: EchoOptions = model.options
    if options.echo_fail_traits:
        raise RuntimeError("echo traits exploded")
    return ModelTraits(capabilities=Capabilities(
        modalities=model.modalities, multi_turn=True, thinking_modes=("default", "enabled", "disabled"),
        reasoning_efforts=model.reasoning_efforts, response_formats=options.echo_response_formats,
        thinking_token_budget=model.thinking_token_budget_max if options.echo_thinking_budget else None),
        concurrency=options.echo_concurrency)


@hookimpl
def llmpool_check_load_override(backend: str, override: dict[str, Any]) -> dict[str, Any] | None:
    if backend != "echo":
        return None
    if "echo_ctx" in override and (not isinstance(override["echo_ctx"], int) or override["echo_ctx"] < 1):
        raise ValueError("echo_ctx load override must be a positive integer")
    return dict(override)


@hookimpl
def llmpool_load(backend: str, replica_id: str, model: Any) -> EchoRuntime | None:
    if backend != "echo":
        return None
    if model.options.echo_load_delay_s:
        time.sleep(model.options.echo_load_delay_s)
    if model.options.echo_fail_load is not None:  # "" too: a load error without a message
        raise LoadError(model.options.echo_fail_load)
    runtime = EchoRuntime(replica_id, model.options)
    RUNTIMES.append(runtime)
    return runtime


@hookimpl
def llmpool_stream(backend: str, runtime: EchoRuntime, request: Any) -> Iterator[Any] | None:
    if backend != "echo":
        return None

    def generate() -> Iterator[Any]:
        with runtime.lock:
            runtime.active += 1
            runtime.max_active = max(runtime.max_active, runtime.active)
        start = time.perf_counter()
        runtime.requests.append(request)
        words = content_text(request.messages[-1].content).split() * runtime.options.echo_repeat
        if runtime.options.echo_raw_frame is not None and "inject" in words:
            _write_raw_frame(runtime.options.echo_raw_frame.encode())
        produced = 0
        finish = "stop"
        try:
            if runtime.options.echo_raise is not None:
                raise RuntimeError(runtime.options.echo_raise)
            for i, word in enumerate(words):
                if request.cancel.is_set():
                    finish = "cancelled"
                    break
                if produced >= request.decoding.max_tokens:
                    finish = "length"
                    break
                if runtime.options.echo_fail_after is not None and i >= runtime.options.echo_fail_after:
                    raise BackendError(502, "echo_failed", "echo failed mid-stream")
                if runtime.options.echo_delay_s and request.cancel.wait(runtime.options.echo_delay_s):
                    finish = "cancelled"  # a runtime that sees a cancel within its step, as the real ones do
                    break
                produced += 1
                yield TextDelta(word if i == 0 else " " + word)
            total = (time.perf_counter() - start) * 1000
            runtime.served.append(request.request_id)
            yield Completion(finish_reason=finish, metrics=BackendMetrics(
                prompt_tokens=len(words), output_tokens=produced, generate_total_ms=total))
        except GeneratorExit:
            runtime.cancelled.append(request.request_id)
            raise
        finally:
            with runtime.lock:
                runtime.active -= 1

    return generate()


def _write_raw_frame(payload: bytes) -> None:
    """Fault injection (worker only): write a frame behind the worker's back."""
    fd = int(sys.argv[sys.argv.index("--fd") + 1])
    with os.fdopen(os.dup(fd), "wb", buffering=0) as sock:
        sock.write(len(payload).to_bytes(4, "big") + payload)


@hookimpl
def llmpool_unload(backend: str, runtime: EchoRuntime) -> bool | None:
    if backend != "echo":
        return None
    runtime.unloaded = True
    return True
