"""Response bodies of every route, as pydantic models, for the OpenAPI document.

The handlers build their answers as dicts (``app.py``, ``openai_api.py``,
``openai_shapes.py``); these models describe them for ``GET /openapi.json`` and are
checked against the live daemon by the schemathesis test (``tests/test_openapi.py``),
so a handler that changes its answer without its model here fails that test. Fields a
client relies on are typed; open-ended maps (metrics, definitions, backend details)
are ``dict[str, Any]``. Every model allows extra keys: an answer may grow.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

State = Literal["unloaded", "loading", "loaded", "unloading", "failed"]


class _Answer(BaseModel):
    model_config = ConfigDict(extra="allow")


# ----- errors ---------------------------------------------------------------------------


class ErrorDetail(_Answer):
    code: str
    model: str | None = None
    message: str | None = None


class ValidationIssue(_Answer):
    loc: list[str | int]
    msg: str
    type: str


class ErrorEnvelope(_Answer):
    """The seed's error body; a request body that fails validation gets FastAPI's list."""

    detail: ErrorDetail | list[ValidationIssue]


class OpenAIErrorObject(_Answer):
    message: str
    type: str
    code: str | None
    param: str | None = None


class OpenAIError(_Answer):
    error: OpenAIErrorObject


# ----- seed inference and listing -------------------------------------------------------


class OutputItem(_Answer):
    type: Literal["output_text"]
    text: str


class SeedResponse(_Answer):
    """``POST /v1/responses`` without ``stream``; with it, SSE events ``response.created``,
    ``response.output_text.delta``/``response.reasoning_text.delta``, ``response.metrics``,
    ``response.completed`` (or ``error``)."""

    id: str
    object: Literal["response"]
    model: str
    output: list[OutputItem]
    output_text: str
    reasoning_text: str | None
    metrics: dict[str, Any]
    metadata: dict[str, Any] | None


class ModelNames(_Answer):
    models: list[str]


class FairnessKey(_Answer):
    fairness_key: str | None
    pending: int
    active: int


class Fairness(_Answer):
    rejected_per_key_limit: int
    rejected_executor_limit: int
    keys: list[FairnessKey]


class ReplicaInfo(_Answer):
    replica_id: str
    isolation: str
    pid: int | None
    rss_mib: float | None = None
    concurrency: int | None = None


class AdminModel(_Answer):
    name: str
    resolved_backend: str | None
    configured_enabled: bool
    runtime_state: State
    is_loaded: bool
    replicas: int
    replica_max: int
    loaded_replicas: int
    inflight_requests: int
    queue_depth: int
    runtime_inflight: int
    configured_target_inflight: int | None
    effective_target_inflight: int
    fairness: Fairness
    last_error: str | None
    vram_estimate_mib: float | None
    vram_estimate_replica_count: int | None
    vram_estimate_source: Literal["observed_load_delta", "model_artifact_size", "unavailable"]
    memory_estimate: dict[str, Any] | None
    load_constraints: dict[str, Any]
    load_recommendations: dict[str, Any]
    load_override: dict[str, Any]
    capabilities: dict[str, Any]
    definition: dict[str, Any]
    replica_info: list[ReplicaInfo]
    on_demand: bool
    pinned: bool
    idle_ttl_s: float | None
    loading_since: str | None
    last_used_at: str | None
    idle_unload_at: str | None
    memory_held: dict[str, Any] | None


class AdminModels(_Answer):
    models: list[AdminModel]


class BackendInfo(_Answer):
    aliases: list[str]
    remote: bool
    description: str | None


class Plugins(_Answer):
    plugins: list[dict[str, Any]]
    backends: dict[str, BackendInfo]


class GpuModel(_Answer):
    name: str
    runtime_state: State
    is_loaded: bool
    replica_info: list[ReplicaInfo]


class GpuMemory(_Answer):
    gpus: list[dict[str, Any]]
    models: list[GpuModel]
    error: str | None


class MemoryHolding(_Answer):
    model: str
    device: str
    mib: float
    source: str
    state: State


class MemoryDevice(_Answer):
    device: str
    budget_mib: float | None
    held_mib: float
    held_by: list[MemoryHolding]


class MemoryModel(_Answer):
    name: str
    runtime_state: State
    pinned: bool
    held: dict[str, Any] | None
    estimate: dict[str, Any] | None
    observed_per_replica: dict[str, Any] | None


class Memory(_Answer):
    """``GET /v1/admin/memory``: each device's budget and who holds what (MiB)."""

    devices: list[MemoryDevice]
    models: list[MemoryModel]
    evict_busy: bool
    drain_timeout_s: float
    min_residency_s: float


class Reload(_Answer):
    added_models: list[str]
    removed_models: list[str]
    updated_models: list[str]


class RemoteBudget(_Answer):
    month: str
    budget: float
    spent: float
    remaining: float


class KeyUsage(_Answer):
    """One named API key's use since start (llmpoold.usage)."""

    requests: dict[str, int]
    prompt_tokens: int
    output_tokens: int
    queue_seconds: float
    run_seconds: float
    remote_cost: float
    configured: bool
    remote_budget: RemoteBudget | None = None


class Usage(_Answer):
    since: str
    keys: dict[str, KeyUsage]


class Health(_Answer):
    status: Literal["ok"]


class Ready(_Answer):
    ready: bool
    loaded_models: list[str]
    failed_models: list[str]


# ----- OpenAI shapes ----------------------------------------------------------------------


class OpenAIModel(_Answer):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class OpenAIModelList(_Answer):
    object: Literal["list"]
    data: list[OpenAIModel]


class ChatMessage(_Answer):
    role: Literal["assistant"]
    content: str | None  # None when the model only calls tools
    refusal: None = None
    reasoning_content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class ChatChoice(_Answer):
    index: int
    message: ChatMessage
    finish_reason: Literal["stop", "length", "tool_calls"]
    # with ``logprobs: true``: {"content": [{"token", "logprob", "bytes", "top_logprobs"}], "refusal": null}
    logprobs: dict[str, Any] | None = None


class ChatUsage(_Answer):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(_Answer):
    """Without ``stream``; with it, ``chat.completion.chunk`` events ending in ``[DONE]``."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice] = Field(min_length=1, max_length=1)
    usage: ChatUsage
    metrics: dict[str, Any]


class TextChoice(_Answer):
    index: int
    text: str
    finish_reason: Literal["stop", "length"]
    # with ``logprobs: N``: {"tokens", "token_logprobs", "top_logprobs": [{token: logprob}], "text_offset"}
    logprobs: dict[str, Any] | None = None


class TextCompletion(_Answer):
    """``text_completion``: one choice per prompt; streamed as ``text_completion`` chunks
    ending in ``[DONE]``."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[TextChoice] = Field(min_length=1, max_length=16)
    usage: ChatUsage


class EmbeddingItem(_Answer):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str  # str: base64 of little-endian float32 (encoding_format: base64)


class EmbeddingUsage(_Answer):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(_Answer):
    """One unit-length vector per input, in input order."""

    object: Literal["list"]
    model: str
    data: list[EmbeddingItem] = Field(min_length=1)
    usage: EmbeddingUsage
    metrics: dict[str, Any]


class OpenAIResponse(_Answer):
    """The Responses API object; streamed as typed events ending in ``response.completed``."""

    id: str
    object: Literal["response"]
    created_at: float
    status: Literal["completed", "incomplete", "in_progress"]
    model: str
    output: list[dict[str, Any]]
    usage: dict[str, Any] | None
