"""One ``engine.models`` entry (:class:`ModelConfig`): the keys every backend shares,
with the seed's rules (``replicas`` / ``replica_max`` / ``target_inflight`` below 1 are
clamped to 1, ``thinking_token_budget_max`` at most 4096, ``remote_thinking`` /
``remote_api_kind`` / ``remote_health_check`` lowercased), plus the backend's own keys
as configured (``backend_keys``) and as its plugin validated them (``options``).

Re-exported by :mod:`llmpoold.config`; how an entry that fails validation is kept (as a
``failed`` model) is :func:`llmpoold.config.model_entry`.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from llmpoold.prompts import FORMATS

COMMON_MODEL_KEYS = frozenset({
    "model_path", "backend", "prompt_format", "enable_thinking", "enabled", "replicas", "replica_max",
    "target_inflight", "modalities", "reasoning_efforts", "isolation", "queue_timeout_s",
    "thinking_token_budget_max",
    "on_demand", "idle_ttl_s", "pinned",  # lifecycle (issue 14)
})
MAX_THINKING_TOKEN_BUDGET = 4096
# The seed lowercases these remote keys (``"Disabled"`` means ``"disabled"``); a blank
# ``remote_health_check`` means its default.
LOWERCASED_KEYS = ("remote_thinking", "remote_api_kind", "remote_health_check")


SECRET_FIELDS = frozenset({"api_keys", "admin_api_key"})
# Words that make a field's value secret wherever it sits (``api_key``, ``client_secret``,
# ``token``...); fields ending in ``_env`` / ``_envs`` hold variable names, not secrets.
SECRET_WORDS = frozenset({"key", "keys", "apikey", "secret", "secrets", "password", "passwd", "token", "credential",
                          "credentials", "auth", "authorization", "bearer"})


def secret_field(part: str) -> bool:
    """Whether a field named ``part`` holds a secret (its value is never shown)."""
    name = part.lower()
    if name in SECRET_FIELDS:
        return True
    if name.endswith(("_env", "_envs")):
        return False
    return any(word in SECRET_WORDS for word in name.replace("-", "_").split("_"))


def seed_backend_keys(entry: Mapping[str, Any]) -> dict[str, Any]:
    """The entry's backend keys with the seed's lowercasing applied."""
    keys = {k: v for k, v in entry.items() if k not in COMMON_MODEL_KEYS}
    for name in LOWERCASED_KEYS:
        if isinstance(keys.get(name), str):
            keys[name] = keys[name].strip().lower()
    if keys.get("remote_health_check") == "":
        keys["remote_health_check"] = "config_only"
    return keys


class ModelConfig(BaseModel):
    """One entry of ``engine.models``: the keys every backend shares, plus ``options``
    (the backend's own keys, validated by its plugin's ``options_model``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    backend: str | None = None
    model_path: str | None = None
    prompt_format: str = "generic"
    enable_thinking: bool | None = None
    enabled: bool = True
    replicas: int = Field(1, ge=1)
    replica_max: int = Field(1, ge=1)
    target_inflight: int = Field(1, ge=1)
    modalities: tuple[str, ...] = ("text",)
    reasoning_efforts: tuple[str, ...] = ()
    isolation: Literal["process", "inline"] | None = None
    queue_timeout_s: float | None = Field(None, gt=0)
    # Lifecycle (issue 14): None takes engine.on_demand / engine.idle_ttl_s.
    on_demand: bool | None = None
    idle_ttl_s: float | None = Field(None, gt=0, allow_inf_nan=False)
    pinned: bool = False
    # Recorded and shown; the per-request ``thinking_token_budget`` admission uses it.
    thinking_token_budget_max: int | None = Field(None, ge=1)
    # Why this entry could not be validated (the pool lists the model as ``failed``).
    error: str | None = None
    # Raw backend keys as configured; ``options`` holds them validated by the plugin.
    backend_keys: dict[str, Any] = Field(default_factory=dict)
    options: Any = None

    @field_validator("backend", mode="before")
    @classmethod
    def _backend(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.strip().lower()
            return value or None
        return value

    @field_validator("replicas", "replica_max", "target_inflight", mode="before")
    @classmethod
    def _at_least_one(cls, value: Any) -> Any:
        """The seed clamps these to 1 (``replicas: 0`` means one replica)."""
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 1:
            return 1
        return value

    @field_validator("thinking_token_budget_max", mode="before")
    @classmethod
    def _budget_unset(cls, value: Any) -> Any:
        """The seed's optional positive integer: 0 or less means unset."""
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value <= 0:
            return None
        return value

    @field_validator("thinking_token_budget_max", mode="after")
    @classmethod
    def _budget_max(cls, value: int | None) -> int | None:
        if value is not None and value > MAX_THINKING_TOKEN_BUDGET:
            raise ValueError(f"thinking_token_budget_max must be at most {MAX_THINKING_TOKEN_BUDGET}")
        return value

    @field_validator("prompt_format", mode="after")
    @classmethod
    def _prompt_format(cls, value: str) -> str:
        """One of :data:`llmpoold.prompts.FORMATS` (a typo would only fail at load)."""
        if value not in FORMATS:
            close = difflib.get_close_matches(value, FORMATS, n=1, cutoff=0.5)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise ValueError(f"unknown prompt format; {hint}known: {', '.join(sorted(FORMATS))}")
        return value

    @field_validator("model_path", mode="before")
    @classmethod
    def _path(cls, value: Any) -> Any:
        if isinstance(value, str):
            return value.strip() or None
        return value

    @field_validator("modalities", mode="before")
    @classmethod
    def _modalities(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ValueError("modalities must be a list of strings")
        seen: list[str] = []
        for item in value:
            norm = item.strip().lower()
            if norm not in {"text", "image", "audio"}:
                raise ValueError("modality must be one of: text, image, audio")
            if norm not in seen:
                seen.append(norm)
        if "text" not in seen:
            seen.insert(0, "text")
        return tuple(seen)

    @field_validator("reasoning_efforts", mode="before")
    @classmethod
    def _efforts(cls, value: Any) -> Any:
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ValueError("reasoning_efforts must be a list of strings")
        out: list[str] = []
        for item in value:
            norm = item.strip().lower()
            if not norm:
                raise ValueError("reasoning_efforts must not contain blank values")
            if norm not in out:
                out.append(norm)
        return tuple(out)

    @model_validator(mode="after")
    def _replicas(self) -> ModelConfig:
        if self.replicas > self.replica_max:
            raise ValueError(
                f"model '{self.name}' has replicas={self.replicas} greater than replica_max={self.replica_max}")
        return self

    def key_envs(self) -> frozenset[str]:
        """The environment variables this model's backend keys name as holding secrets
        (``*_env``: ``remote_api_key_env``)."""
        return frozenset(v for k, v in self.backend_keys.items() if k.endswith("_env") and isinstance(v, str))

    def definition(self) -> dict[str, Any]:
        """The admin ``definition``: common keys plus the backend's own (no secrets:
        plugins keep secrets in env vars and only their names in config). Keys no plugin
        validated (a backend without one, a failed entry) are shown as configured, except
        secret-looking ones (:func:`secret_field`: the seed's ``llama_server_api_key``...)."""
        common = self.model_dump(include={
            "model_path", "backend", "prompt_format", "enable_thinking", "enabled", "replicas",
            "replica_max", "target_inflight", "reasoning_efforts", "isolation", "queue_timeout_s",
            "on_demand", "idle_ttl_s", "pinned"})
        common["reasoning_efforts"] = list(self.reasoning_efforts)
        if self.thinking_token_budget_max is not None:
            common["thinking_token_budget_max"] = self.thinking_token_budget_max
        options = (self.options.model_dump(mode="json") if isinstance(self.options, BaseModel)
                   else {k: v for k, v in self.backend_keys.items() if not secret_field(k)})
        return {**common, **options}
