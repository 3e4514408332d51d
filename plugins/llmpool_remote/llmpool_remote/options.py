"""The backend's own model keys (:class:`RemoteOptions`), validated by the daemon with
this model once the plugin is known; see the plugin README for each key."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

BACKEND = "openai_compatible"
ALIASES = ("openai_remote", "remote")
MAX_BACKOFF_S = 30.0
REQUIRED = ("remote_api_kind", "remote_base_url", "remote_api_key_env", "remote_model")
FILE_MODES = ("chat_completions_inline", "files_extract")
MIB = 1024 * 1024


class RemoteOptions(BaseModel):
    """The backend's own model keys (see the README).

    Limits on what an upstream may send: ``remote_max_response_bytes`` caps a JSON (or
    text) body, ``remote_max_event_bytes`` one server-sent event, ``remote_total_timeout_s``
    the whole call (retries and file uploads included); ``remote_timeout_s`` is the
    connect and read-inactivity timeout.

    ``remote_price_per_million_input`` / ``_output``: what a million prompt / output
    tokens cost (any currency, the unit of the API keys' ``remote_budget``); the daemon
    charges each named key's usage with them (llmpoold.usage).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    remote_api_kind: Literal["chat_completions"]
    remote_base_url: str
    remote_api_key_env: str
    remote_model: str
    remote_timeout_s: float = Field(60.0, gt=0, allow_inf_nan=False)
    remote_total_timeout_s: float = Field(600.0, gt=0, allow_inf_nan=False)
    remote_max_response_bytes: int = Field(16 * MIB, ge=1024)
    remote_max_event_bytes: int = Field(1 * MIB, ge=1024)
    remote_health_check: Literal["config_only", "models"] = "config_only"
    remote_max_retries: int = Field(0, ge=0, le=10)
    remote_retry_backoff_s: float = Field(0.5, ge=0, le=MAX_BACKOFF_S)
    remote_thinking: Literal["enabled", "disabled"] | None = None
    remote_prompt_cache_key_enabled: bool = False
    remote_file_mode: Literal["chat_completions_inline", "files_extract"] | None = None
    remote_file_purpose: str | None = None
    remote_price_per_million_input: float | None = Field(None, ge=0, allow_inf_nan=False)
    remote_price_per_million_output: float | None = Field(None, ge=0, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _required(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            data = dict(data)
            for name in REQUIRED:
                value = data.get(name)
                if value is None or (isinstance(value, str) and not value.strip()):
                    raise ValueError(f"{name} is required for {BACKEND} models")
                if isinstance(value, str):
                    data[name] = value.strip()
        return data

    @field_validator("remote_base_url")
    @classmethod
    def _base_url(cls, value: str) -> str:
        value = value.rstrip("/")
        if not value.startswith(("http://", "https://")):
            raise ValueError("remote_base_url must start with http:// or https://")
        return value

    @field_validator("remote_thinking", mode="before")
    @classmethod
    def _thinking(cls, value: Any) -> Any:
        if value is not None and value not in ("enabled", "disabled"):
            raise ValueError("remote_thinking must be 'enabled', 'disabled', or omitted")
        return value

    @field_validator("remote_file_mode", mode="before")
    @classmethod
    def _file_mode(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.strip().lower() or None
        if value is not None and value not in FILE_MODES:
            raise ValueError("remote_file_mode must be one of 'chat_completions_inline', 'files_extract'")
        return value

    @model_validator(mode="after")
    def _file_purpose(self) -> RemoteOptions:
        if self.remote_file_mode == "files_extract" and not (self.remote_file_purpose or "").strip():
            raise ValueError("remote_file_purpose is required when remote_file_mode is 'files_extract'")
        return self
