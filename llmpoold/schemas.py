"""Request bodies of the HTTP API, validated as the seed validates them.

The door's bounds are declared here, once, as field constraints (so ``/openapi.json``
carries them): :data:`MAX_MODEL_CHARS`, :data:`MAX_TEXT_CHARS` (one string, and all the
text of a request together), :data:`MAX_INSTRUCTIONS_CHARS`, :data:`MAX_MESSAGES`,
:data:`MAX_CONTENT_ITEMS`; the decoding bounds (stop strings included) are
:mod:`llmpoold.config`'s table. The OpenAI bodies (:mod:`llmpoold.http.openai_requests`)
use the same constants.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationInfo, field_validator, model_validator

from llmpoold.config import (
    MAX_FAIRNESS_KEY_LENGTH,
    MAX_OUTPUT_TOKENS,
    BeamSize,
    MaxTokens,
    RepetitionPenalty,
    Stop,
    Temperature,
    TopK,
    TopP,
)
from llmpoold.prompts import check_lang_code
from llmpoold.types import Message

MAX_MODEL_CHARS = 256
MAX_TEXT_CHARS = 1_000_000  # one text, and the sum over input, messages and instructions
MAX_INSTRUCTIONS_CHARS = 100_000
MAX_MESSAGES = 1_000
MAX_CONTENT_ITEMS = 256  # content parts of one input or message
MAX_NAME_CHARS = 256  # file names, cache keys

Text = Annotated[str, Field(max_length=MAX_TEXT_CHARS)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class DecodingParams(_Body):
    """A request's decoding: each field overrides the engine default when set."""

    beam_size: BeamSize | None = None
    top_k: TopK | None = None
    top_p: TopP | None = None
    temperature: Temperature | None = None
    repetition_penalty: RepetitionPenalty | None = None
    max_tokens: MaxTokens | None = None
    stop: Stop | None = None


class TextItem(_Body):
    type: Literal["text"]
    text: Text


class ImageUrl(_Body):
    url: str
    detail: Literal["low", "high", "auto"] = "auto"


class ImageItem(_Body):
    type: Literal["image_url"]
    image_url: ImageUrl


class AudioUrl(_Body):
    url: str


class AudioItem(_Body):
    type: Literal["audio_url"]
    audio_url: AudioUrl


class FileData(_Body):
    filename: str = Field(min_length=1, max_length=MAX_NAME_CHARS)
    file_data: str = Field(min_length=1)


class FileItem(_Body):
    type: Literal["file"]
    file: FileData


ContentItem = Annotated[TextItem | ImageItem | AudioItem | FileItem, Field(discriminator="type")]
Content = Text | Annotated[list[ContentItem], Field(max_length=MAX_CONTENT_ITEMS)]


def _text_chars(content: Content | None) -> int:
    if isinstance(content, str):
        return len(content)
    return sum(len(item.text) for item in content or () if isinstance(item, TextItem))


class ChatTurn(_Body):
    role: Literal["user", "assistant"]
    content: Content


class JsonSchemaSpec(BaseModel):
    """The seed's ``json_schema`` object (extra keys refused, as the seed does); the JSON
    key is ``schema``."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(min_length=1, max_length=MAX_NAME_CHARS)
    description: str | None = Field(None, max_length=MAX_INSTRUCTIONS_CHARS)
    schema_definition: dict[str, Any] = Field(alias="schema")
    strict: bool = True


class JsonSchemaFormat(BaseModel):
    """``{"type": "json_schema", "json_schema": {...}}``: the seed's ``response_format``."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


class JsonObjectFormat(BaseModel):
    """``{"type": "json_object"}`` (any JSON object): llmpool's addition, the OpenAI
    surfaces map their ``json_object`` onto it."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["json_object"]


ResponseFormat = Annotated[JsonSchemaFormat | JsonObjectFormat, Field(discriminator="type")]


def response_format_json(value: JsonSchemaFormat | JsonObjectFormat | None) -> dict[str, Any] | None:
    """The format as backends get it (``GenerationRequest.response_format``): the JSON
    the client sent, ``schema`` under its own key."""
    return None if value is None else value.model_dump(mode="json", by_alias=True, exclude_none=True)


@dataclass(frozen=True)
class AgentFields:
    """What an OpenAI request carries beyond the seed's fields (never read from a
    ``/v1/responses`` body): function ``tools``, ``tool_choice``, and, when the
    conversation has tool turns (assistant calls, ``tool`` results) that the seed's
    ``messages`` cannot hold, the whole conversation as backends get it."""

    tools: tuple[dict[str, Any], ...] = ()
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    messages: tuple[Message, ...] | None = None
    # A response_format on a streamed OpenAI request (the seed refuses the pair; the
    # OpenAI APIs allow it).
    response_format: JsonSchemaFormat | JsonObjectFormat | None = None
    # Legacy text completions: the input is the whole prompt (the ``raw`` format, no
    # template, no instructions) and the output is not stripped.
    raw_prompt: bool = False
    # Token log probabilities: None off, else the number of top alternatives per token
    # (Chat's ``top_logprobs``, the legacy completions' ``logprobs``).
    logprobs: int | None = None

    @property
    def uses_tools(self) -> bool:
        return bool(self.tools) or any(m.role == "tool" or m.tool_calls for m in self.messages or ())


class ResponseRequest(_Body):
    """``POST /v1/responses``. ``agent`` (not a body field) holds what an OpenAI
    surface adds (:class:`AgentFields`)."""

    _agent: AgentFields | None = PrivateAttr(default=None)

    @property
    def agent(self) -> AgentFields | None:
        return self._agent

    def with_agent(self, agent: AgentFields) -> ResponseRequest:
        self._agent = agent
        return self

    @property
    def effective_response_format(self) -> JsonSchemaFormat | JsonObjectFormat | None:
        if self.response_format is not None:
            return self.response_format
        return self._agent.response_format if self._agent is not None else None

    model: str = Field(min_length=1, max_length=MAX_MODEL_CHARS)
    input: Content | None = None
    messages: list[ChatTurn] | None = Field(None, max_length=MAX_MESSAGES)
    instructions: str | None = Field(None, max_length=MAX_INSTRUCTIONS_CHARS)
    fairness_key: str | None = Field(None, max_length=MAX_FAIRNESS_KEY_LENGTH)
    source_lang_code: str | None = None
    target_lang_code: str | None = None
    allow_remote: bool = False
    prompt_cache_key: str | None = Field(None, min_length=1, max_length=MAX_NAME_CHARS)
    stream: bool = False
    thinking: Literal["default", "enabled", "disabled"] = "default"
    reasoning_effort: str | None = Field(None, min_length=1, max_length=32)
    thinking_token_budget: int | None = Field(None, ge=1, le=MAX_OUTPUT_TOKENS)
    response_format: ResponseFormat | None = None
    queue_timeout_s: float | None = Field(None, gt=0, le=3600)
    decoding: DecodingParams = Field(default_factory=lambda: DecodingParams())

    @field_validator("fairness_key", mode="before")
    @classmethod
    def _fairness_key(cls, value: Any) -> Any:
        if value is None:
            return None
        if not isinstance(value, str):
            raise ValueError("fairness_key must be a string")
        value = value.strip()
        if not value:
            raise ValueError("fairness_key must not be blank")
        return value

    @field_validator("source_lang_code", "target_lang_code", mode="before")
    @classmethod
    def _lang_code(cls, value: Any, info: ValidationInfo) -> Any:
        return check_lang_code(value, str(info.field_name))

    @field_validator("reasoning_effort", mode="before")
    @classmethod
    def _effort(cls, value: Any) -> Any:
        if value is None:
            return None
        if not isinstance(value, str):
            raise ValueError("reasoning_effort must be a string")
        value = value.strip().lower()
        if not value:
            raise ValueError("reasoning_effort must not be blank")
        return value

    @model_validator(mode="after")
    def _shape(self) -> ResponseRequest:
        if self.response_format is not None and self.stream:
            raise ValueError("response_format is not supported with stream=true")
        if self.messages is not None:
            if not self.messages:
                raise ValueError("messages must not be empty")
            if self.messages[-1].role != "user":
                raise ValueError("the last message must have role 'user'")
        elif self.input is None:
            raise ValueError("provide either 'input' or 'messages'")
        total = (_text_chars(self.input) + len(self.instructions or "")
                 + sum(_text_chars(turn.content) for turn in self.messages or ()))
        if total > MAX_TEXT_CHARS:
            raise ValueError(f"the request's text (input, messages and instructions) is {total} characters; "
                             f"at most {MAX_TEXT_CHARS} are accepted")
        return self


class AdminLoadRequest(BaseModel):
    """``POST /v1/admin/models/{name}/load``: only explicitly set fields count.

    The daemon's own keys are typed here (422); the backend's keys pass through and are
    typed once by its ``BackendSpec.load_override_model`` (also a 422), then checked by
    the plugin (a 400 with its message); a backend accepts only its declared
    ``load_override_keys``."""

    model_config = ConfigDict(extra="allow")

    replicas: int | None = Field(None, ge=1)
    target_inflight: int | None = Field(None, ge=1)
