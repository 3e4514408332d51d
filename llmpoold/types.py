"""Values that cross the boundary between the daemon and a backend plugin.

Everything here is a frozen dataclass of plain values so that it can also cross a
process boundary as JSON (see :mod:`llmpoold.replicas.wire`).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

DEFAULT_INSTRUCTIONS = "You are a helpful assistant. Return only the response."


@dataclass(frozen=True, slots=True)
class Decoding:
    """Resolved decoding parameters: request value if given, else the engine default."""

    beam_size: int = 1
    top_k: int = 1
    top_p: float = 1.0
    temperature: float = 0.1
    repetition_penalty: float = 1.0
    max_tokens: int = 256
    stop: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Message:
    """One conversation turn. ``content`` is a string or the request's content items
    (JSON objects with a ``type``: text, image_url, audio_url, file)."""

    role: str
    content: str | tuple[Mapping[str, Any], ...]
    # Tool calling (OpenAI surfaces, backends with Capabilities.tools): an assistant
    # turn's calls ({"id", "type": "function", "function": {"name", "arguments"}}), and
    # on a ``tool`` turn the id of the call it answers.
    tool_calls: tuple[Mapping[str, Any], ...] = ()
    tool_call_id: str | None = None


class CancelToken:
    """Set when the request's result is no longer wanted (client gone, deadline, unload).

    A backend that generates in a loop checks ``is_set()`` once per token and stops;
    one that batches uses it to drop the request from its batch. Thread-safe.
    """

    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event = threading.Event()

    def set(self) -> None:
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._event.wait(timeout)


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """One inference request as a backend sees it.

    ``messages`` is always the conversation to answer: the request's ``messages`` or a
    single user turn made from ``input``. ``multi_turn`` says which one the client sent
    (a single-turn prompt format must refuse ``multi_turn=True``).
    ``thinking`` is the resolved switch for local templates (None: model default);
    ``thinking_mode`` is what the request asked ("default", "enabled", "disabled").
    """

    request_id: str
    model: str
    replica_id: str
    prompt_format: str
    instructions: str
    messages: tuple[Message, ...]
    decoding: Decoding
    multi_turn: bool = False
    thinking: bool | None = None
    thinking_mode: str = "default"
    reasoning_effort: str | None = None
    source_lang_code: str | None = None
    target_lang_code: str | None = None
    prompt_cache_key: str | None = None
    # The seed's ``response_format`` ({"type": "json_schema", "json_schema": {"name",
    # "schema", "strict", ...}} or {"type": "json_object"}); None: free text. Admission
    # lets it through only to a model whose Capabilities.response_formats has its type.
    response_format: Mapping[str, Any] | None = None
    # At most this many reasoning tokens (admitted only where
    # Capabilities.thinking_token_budget is set, and with thinking enabled).
    thinking_token_budget: int | None = None
    # OpenAI function tools ({"type": "function", "function": {"name", "description",
    # "parameters", "strict"}}) and ``tool_choice`` ("auto", "none", "required" or
    # {"type": "function", "function": {"name"}}); only for Capabilities.tools.
    tools: tuple[Mapping[str, Any], ...] = ()
    tool_choice: str | Mapping[str, Any] | None = None
    parallel_tool_calls: bool | None = None  # None: the runtime's default
    # Token log probabilities (OpenAI's ``logprobs``; only for Capabilities.logprobs):
    # None: off; else how many top alternatives to report per token (0..20). The
    # backend then attaches a TokenLogprob per generated token to its TextDelta items.
    logprobs: int | None = None
    cancel: CancelToken = field(default_factory=CancelToken, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """One generated token's log probability (natural log) under the model, and, for
    the token itself, the ``top`` most likely alternatives at its position (most likely
    first; alternatives have no ``top`` of their own). ``token`` is the token's text
    (a token holding part of a UTF-8 character shows U+FFFD), ``bytes`` its exact bytes."""

    token: str
    logprob: float
    bytes: tuple[int, ...] = ()
    top: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True, slots=True)
class TextDelta:
    """A piece of generated text, in order. ``channel`` separates visible output from
    reasoning ("thinking") text. Never contains a partial UTF-8 character or any part of
    a matched stop string.

    ``logprobs`` (only when the request asked for them): the tokens whose text ends in
    this delta (or that had text held back until it), in order; a delta may carry
    logprobs and no text (tokens whose text the daemon trims away)."""

    text: str
    channel: Literal["output", "reasoning"] = "output"
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True, slots=True)
class BackendMetrics:
    """What the runtime measured for one request; None where it cannot tell."""

    tokenize_ms: float | None = None
    time_to_first_token_ms: float | None = None
    generate_total_ms: float | None = None
    decode_after_first_token_ms: float | None = None
    prompt_tokens: int | None = None
    cached_prompt_tokens: int | None = None
    output_tokens: int | None = None
    tokens_per_second: float | None = None


@dataclass(frozen=True, slots=True)
class Completion:
    """The last item of every stream: why generation ended, and its metrics.

    ``finish_reason`` is "stop" (a stop string or end-of-sequence token), "length"
    (max_tokens reached), "cancelled", or what an upstream API reported.
    ``metadata`` is returned to the client as the response's ``metadata``.
    """

    finish_reason: str | None
    metrics: BackendMetrics = field(default_factory=BackendMetrics)
    metadata: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """A piece of a tool call, in order: the first piece of call ``index`` has its ``id``
    and ``name``; ``arguments`` pieces concatenate to the call's JSON arguments."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""
    channel: Literal["tool"] = "tool"


StreamItem = TextDelta | ToolCallDelta | Completion


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a configured model can do; shown in the admin API and used for admission."""

    modalities: tuple[str, ...] = ("text",)
    file_inputs: bool = False
    multi_turn: bool = False
    thinking_modes: tuple[str, ...] = ("default",)
    reasoning_efforts: tuple[str, ...] = ()
    # ``response_format`` types the backend enforces: "text" always; "json_schema" and
    # "json_object" only where the runtime constrains its output (or an upstream does).
    response_formats: tuple[str, ...] = ("text",)
    # The largest ``thinking_token_budget`` the backend honours for this model (its
    # ``thinking_token_budget_max``); None: the request field is refused.
    thinking_token_budget: int | None = None
    # Function tools: ``tools``, ``tool_choice``, tool turns and ToolCallDelta output.
    tools: bool = False
    # With ``tools``: whether the model may choose itself (``tool_choice`` "auto", the
    # default with tools). False where only a forced call works ("required" or a named
    # function, e.g. a GGUF model whose chat template has no tool-call format we parse).
    tools_auto: bool = True
    # Raw prompts (legacy text completions, rendered with the ``raw`` format): every
    # local text backend; an upstream chat API cannot continue a raw prompt.
    raw_prompt: bool = True
    # Token log probabilities (GenerationRequest.logprobs → TextDelta.logprobs).
    logprobs: bool = False
    # Embeddings (``llmpool_embed``; ``POST /openai/v1/embeddings``), and whether the model
    # generates at all: an embedding model (``gguf_embedding: true``) serves only vectors.
    embeddings: bool = False
    generation: bool = True

    def to_json(self) -> dict[str, Any]:
        return {
            "modalities": list(self.modalities),
            "file_inputs": self.file_inputs,
            "multi_turn": self.multi_turn,
            "thinking_modes": list(self.thinking_modes),
            "reasoning_efforts": list(self.reasoning_efforts),
            "thinking_token_budget": (None if self.thinking_token_budget is None
                                      else {"minimum": 1, "maximum": self.thinking_token_budget}),
            "response_formats": list(self.response_formats),
            "tools": self.tools,
            "tools_auto": self.tools and self.tools_auto,
            "raw_prompt": self.raw_prompt,
            "logprobs": self.logprobs,
            "embeddings": self.embeddings,
            "generation": self.generation,
        }


@dataclass(frozen=True, slots=True)
class ModelTraits:
    """Per configured model: its capabilities and how many requests one replica can run
    at once (1 for a runtime that generates one request at a time, the batch size for a
    batching runtime, the upstream concurrency cap for a remote API)."""

    capabilities: Capabilities
    concurrency: int = 1


@dataclass(frozen=True, slots=True)
class MemoryEstimate:
    """Memory one replica is expected to need, without loading it.

    ``device`` is "cpu" (RAM) or "cuda" (VRAM); ``source`` says how it was computed.
    """

    total_mib: float
    device: str = "cpu"
    weights_mib: float | None = None
    cache_mib: float | None = None
    source: str = "model_artifact_size"
    details: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class EmbeddingRequest:
    """One embeddings request as a backend sees it: ``inputs`` (non-empty strings, in
    order) each become one vector (``llmpool_embed``)."""

    request_id: str
    model: str
    replica_id: str
    inputs: tuple[str, ...]
    cancel: CancelToken = field(default_factory=CancelToken, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class EmbeddingResult:
    """The vectors of an :class:`EmbeddingRequest`, one per input in order, each of the
    model's dimension and L2-normalised; ``metrics.prompt_tokens`` counts every input's
    tokens."""

    vectors: tuple[tuple[float, ...], ...]
    metrics: BackendMetrics = field(default_factory=BackendMetrics)
