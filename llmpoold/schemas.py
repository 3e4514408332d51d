"""Request bodies of the HTTP API, validated as the seed validates them."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from llmpoold.config import (
    MAX_FAIRNESS_KEY_LENGTH,
    BeamSize,
    MaxTokens,
    RepetitionPenalty,
    Temperature,
    TopK,
    TopP,
)
from llmpoold.prompts import check_lang_code


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
    stop: list[str] | None = None


class TextItem(_Body):
    type: Literal["text"]
    text: str


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
    filename: str = Field(min_length=1)
    file_data: str = Field(min_length=1)


class FileItem(_Body):
    type: Literal["file"]
    file: FileData


ContentItem = Annotated[TextItem | ImageItem | AudioItem | FileItem, Field(discriminator="type")]


class ChatTurn(_Body):
    role: Literal["user", "assistant"]
    content: str | list[ContentItem]


class ResponseRequest(_Body):
    """``POST /v1/responses``."""

    model: str = Field(min_length=1)
    input: str | list[ContentItem] | None = None
    messages: list[ChatTurn] | None = None
    instructions: str | None = None
    fairness_key: str | None = Field(None, max_length=MAX_FAIRNESS_KEY_LENGTH)
    source_lang_code: str | None = None
    target_lang_code: str | None = None
    allow_remote: bool = False
    prompt_cache_key: str | None = Field(None, min_length=1)
    stream: bool = False
    thinking: Literal["default", "enabled", "disabled"] = "default"
    reasoning_effort: str | None = Field(None, min_length=1, max_length=32)
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
        if self.messages is not None:
            if not self.messages:
                raise ValueError("messages must not be empty")
            if self.messages[-1].role != "user":
                raise ValueError("the last message must have role 'user'")
        elif self.input is None:
            raise ValueError("provide either 'input' or 'messages'")
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
