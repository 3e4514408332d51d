"""llmpool backend plugin ``openai_compatible``: an upstream OpenAI-compatible Chat
Completions API (aliases ``openai_remote``, ``remote``). ``response_format``, ``tools``,
``tool_choice`` and tool turns pass through to the upstream; its ``tool_calls`` come back
as :class:`~llmpoold.types.ToolCallDelta` items.

Nothing is loaded: a replica is a :class:`RemoteRuntime` holding the validated config
and an aiohttp ``ClientSession``, created lazily on the event loop the streams run on.
Every request calls ``POST <remote_base_url>/chat/completions`` with streaming and
relays each upstream delta at once; usage from the final chunk fills the metrics.

The API key is read from the environment variable named by ``remote_api_key_env`` at
call time. It is never logged, never put in an error message (upstream error text is
scrubbed of it) and never shown by admin (only the variable's name is config).

Modules, one job each: :mod:`~llmpool_remote.options` (the model keys),
:mod:`~llmpool_remote.runtime` (a replica and its session),
:mod:`~llmpool_remote.request` (the upstream request body),
:mod:`~llmpool_remote.files` (``files_extract``), :mod:`~llmpool_remote.transport`
(sending, retries, bounded reads, the call's deadline), :mod:`~llmpool_remote.errors`
(the error mapping), :mod:`~llmpool_remote.relay` (reading answers),
:mod:`~llmpool_remote.calls` (stream and generate), :mod:`~llmpool_remote.health`
(the load-time check); the hooks are here.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from llmpool_remote.calls import remote_generate, remote_stream
from llmpool_remote.health import health_check
from llmpool_remote.options import ALIASES, BACKEND, RemoteOptions
from llmpool_remote.request import build_body
from llmpool_remote.runtime import RemoteRuntime
from llmpoold import hookimpl
from llmpoold.errors import LoadError
from llmpoold.hookspecs import BackendSpec
from llmpoold.types import Capabilities, GenerationRequest, MemoryEstimate, ModelTraits, StreamItem

if TYPE_CHECKING:
    from llmpoold.config import ModelConfig

__all__ = ["ALIASES", "BACKEND", "RemoteOptions", "RemoteRuntime", "build_body", "remote_generate", "remote_stream"]


@hookimpl
def llmpool_backends() -> list[BackendSpec]:
    # As the seed: target_inflight (the concurrent upstream calls) is the one load override.
    return [BackendSpec(name=BACKEND, aliases=ALIASES, options_model=RemoteOptions, remote=True,
                        requires_model_path=False, load_override_keys=frozenset({"target_inflight"}),
                        load_constraints={"target_inflight": {"kind": "integer", "minimum": 1, "step": 1}},
                        description="an upstream OpenAI-compatible Chat Completions API (remote execution)")]


@hookimpl
def llmpool_model_traits(backend: str, model: ModelConfig) -> ModelTraits | None:
    if backend != BACKEND:
        return None
    options: RemoteOptions = model.options
    # Thinking switches only where remote_thinking is configured (the seed's rule);
    # response_format is relayed upstream, which enforces it.
    thinking = ("default", "enabled", "disabled") if options.remote_thinking is not None else ("default",)
    return ModelTraits(capabilities=Capabilities(modalities=model.modalities, multi_turn=True,
                                                 thinking_modes=thinking,
                                                 reasoning_efforts=model.reasoning_efforts,
                                                 response_formats=("text", "json_schema", "json_object"),
                                                 tools=True, raw_prompt=False,
                                                 file_inputs=options.remote_file_mode is not None),
                       concurrency=model.target_inflight)


@hookimpl
def llmpool_estimate_memory(backend: str, model: ModelConfig) -> MemoryEstimate | None:
    if backend != BACKEND:
        return None
    return MemoryEstimate(total_mib=0.0, device="cpu", source="remote_api")


@hookimpl
def llmpool_load(backend: str, replica_id: str, model: ModelConfig) -> RemoteRuntime | None:
    if backend != BACKEND:
        return None
    options: RemoteOptions = model.options
    if not os.environ.get(options.remote_api_key_env):
        raise LoadError(f"missing API key environment variable: {options.remote_api_key_env}")
    try:
        import aiohttp  # noqa: F401
    except ImportError as exc:  # pragma: no cover - aiohttp is the daemon's own dependency
        raise LoadError(f"the {BACKEND} backend needs aiohttp: {exc}") from None
    if options.remote_health_check == "models":
        health_check(RemoteRuntime(replica_id, model.name, options))
    return RemoteRuntime(replica_id, model.name, options)


@hookimpl
def llmpool_stream(backend: str, runtime: RemoteRuntime,
                   request: GenerationRequest) -> AsyncIterator[StreamItem] | None:
    if backend != BACKEND:
        return None
    return remote_stream(runtime, request)


@hookimpl
def llmpool_generate(backend: str, runtime: RemoteRuntime, request: GenerationRequest) -> Any:
    if backend != BACKEND:
        return None
    if request.tools or any(m.tool_calls for m in request.messages):
        return None  # tool calls are relayed from the stream (llmpool_generate answers text only)
    return remote_generate(runtime, request)


@hookimpl
def llmpool_unload(backend: str, runtime: RemoteRuntime) -> bool | None:
    if backend != BACKEND:
        return None
    runtime.close()
    return True
