"""Settings: ``settings.json`` deep-merged with ``local.json``, validated by pydantic.

Paths: ``--settings`` / ``--local`` flags, else ``LLM_POOL_SETTINGS_PATH`` (or the
seed's ``LLM_RESPONSES_API_SETTINGS_PATH``) / ``LLM_POOL_LOCAL_SETTINGS_PATH``, else
``/etc/llmpool/settings.json`` and the ``local.json`` beside the settings file. A
missing file found through the environment or the defaults reads as empty (the seed's
rule); a missing file named on the command line is an error. Every validation error
names the field path and the offending value (:class:`SettingsError`), never the value
of an unknown or secret-looking key.

Global structure errors (invalid JSON, wrong types in ``service`` / ``engine``) are
fatal. One model never is: a non-object entry is skipped (``EngineSettings.skipped_models``),
``replicas`` / ``replica_max`` / ``target_inflight`` below 1 are clamped to 1, the seed's
string keys ``remote_thinking`` / ``remote_api_kind`` / ``remote_health_check`` are
lowercased, and a model whose common keys are invalid is kept with ``ModelConfig.error``
set (the pool lists it as ``failed``). What the installed plugins make of the rest is
decided in :mod:`llmpoold.model_settings`.

The ``service`` block and the helpers that check callers (:func:`key_matches`,
:func:`is_loopback_host`) live in :mod:`llmpoold.service_settings`, re-exported here.

Backend-specific model keys (``gguf_n_ctx``, ``remote_base_url``...) are validated
by the owning plugin's ``options_model`` in :func:`resolve_model_options`, once the
installed plugins are known.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from llmpoold.errors import SettingsError as SettingsError
from llmpoold.model_config import COMMON_MODEL_KEYS as COMMON_MODEL_KEYS
from llmpoold.model_config import ModelConfig as ModelConfig
from llmpoold.model_config import secret_field, seed_backend_keys
from llmpoold.service_settings import ServiceSettings as ServiceSettings
from llmpoold.service_settings import is_loopback_host as is_loopback_host
from llmpoold.service_settings import key_matches as key_matches
from llmpoold.types import Decoding

DEFAULT_SETTINGS_PATH = Path("/etc/llmpool/settings.json")
SETTINGS_ENV = "LLM_POOL_SETTINGS_PATH"
LEGACY_SETTINGS_ENV = "LLM_RESPONSES_API_SETTINGS_PATH"  # the seed's older name, read after SETTINGS_ENV
LOCAL_SETTINGS_ENV = "LLM_POOL_LOCAL_SETTINGS_PATH"
MAX_OUTPUT_TOKENS = 4096
MAX_FAIRNESS_KEY_LENGTH = 128
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\*?")  # engine.workers.env_passthrough


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# The decoding fields' bounds, once: settings' ``engine.decoding`` and a request's
# ``decoding`` (llmpoold.schemas) are typed with these; the defaults are
# llmpoold.types.Decoding's, and inference.resolve_decoding merges the two.
BeamSize = Annotated[int, Field(ge=1, le=16)]
TopK = Annotated[int, Field(ge=1, le=200)]
TopP = Annotated[float, Field(gt=0, le=1)]
Temperature = Annotated[float, Field(ge=0, le=2)]
RepetitionPenalty = Annotated[float, Field(gt=0, le=4)]  # > 0: logits are divided by it
MaxTokens = Annotated[int, Field(ge=1, le=MAX_OUTPUT_TOKENS)]
MAX_STOPS = 16  # a request's stop strings: each is checked against the output on every token
MAX_STOP_CHARS = 256
Stop = Annotated[list[Annotated[str, Field(max_length=MAX_STOP_CHARS)]], Field(max_length=MAX_STOPS)]
_DECODING = Decoding()


class DecodingDefaults(_Strict):
    beam_size: BeamSize = _DECODING.beam_size
    top_k: TopK = _DECODING.top_k
    top_p: TopP = _DECODING.top_p
    temperature: Temperature = _DECODING.temperature
    repetition_penalty: RepetitionPenalty = _DECODING.repetition_penalty
    max_tokens: MaxTokens = _DECODING.max_tokens
    stop: tuple[str, ...] = _DECODING.stop

    @field_validator("stop", mode="after")
    @classmethod
    def _drop_empty(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(s for s in value if s)


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or value <= 0:
        raise ValueError(f"engine.fairness.{name} must be an integer greater than 0{_got(value)}")
    return int(value)


def _positive_finite(message: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(message + _got(value))
    return float(value)


def _got(value: Any) -> str:
    """`` (got <value>)``: the seed's messages, plus the value (errors raised on a whole
    block cannot rely on :func:`format_validation_error` to show it)."""
    return f" (got {json.dumps(value, default=str)})"


class FairnessSettings(_Strict):
    """The seed's ``engine.fairness`` block, with its validation messages."""

    default_weight: float = 1.0
    weights: dict[str, float] = Field(default_factory=dict)
    soft_max_inflight_per_key: int = 1
    max_pending_per_key: int = 32
    max_pending_per_executor: int = 128
    idle_state_ttl_s: float = 300.0
    max_keys: int = 10000

    @model_validator(mode="before")
    @classmethod
    def _validate(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            raise ValueError("engine.fairness must be an object")
        data = dict(data)
        if "default_weight" in data:
            data["default_weight"] = _positive_finite(
                "engine.fairness.default_weight must be a finite number greater than 0", data["default_weight"])
        for name in ("soft_max_inflight_per_key", "max_pending_per_key", "max_pending_per_executor", "max_keys"):
            if name in data:
                data[name] = _positive_int(name, data[name])
        if "idle_state_ttl_s" in data:
            value = data["idle_state_ttl_s"]
            if isinstance(value, str):
                value = float(value) if value.strip().lower() not in {"inf", "nan", "-inf"} else math.inf
            data["idle_state_ttl_s"] = _positive_finite(
                "engine.fairness.idle_state_ttl_s must be a finite number greater than 0", value)
        if "weights" in data:
            raw = data["weights"]
            if not isinstance(raw, dict):
                raise ValueError("engine.fairness.weights must be an object of {fairness_key: weight}")
            weights: dict[str, float] = {}
            for key, weight in raw.items():
                norm = str(key).strip()
                if not norm:
                    raise ValueError("engine.fairness.weights keys must not be blank")
                if len(norm) > MAX_FAIRNESS_KEY_LENGTH:
                    raise ValueError("engine.fairness.weights keys must be at most 128 characters")
                if norm in weights:
                    raise ValueError(f"duplicate normalized fairness weight key: {norm}")
                weights[norm] = _positive_finite(
                    f"engine.fairness.weights['{norm}'] must be a finite number greater than 0", weight)
            data["weights"] = weights
        return data

    def weight_for(self, key: str | None) -> float:
        return self.weights.get(key, self.default_weight) if key is not None else self.default_weight


class WorkerSettings(_Strict):
    """``engine.workers``: process-isolated replicas (see ``llmpoold.replicas.process``).

    A crashed worker is restarted after ``restart_backoff_s`` (doubling per restart in
    the window, capped at ``restart_backoff_max_s``), at most ``restart_max`` times per
    ``restart_window_s``; then the replica stays failed. Unload waits
    ``unload_timeout_s`` for the worker to exit before SIGTERM, then SIGKILL. A worker
    that has not finished loading within ``load_timeout_s`` is killed and its replica
    fails with that reason (a load that hangs would otherwise hold the model in
    ``loading`` and the daemon un-ready for ever). Every
    ``health_interval_s`` (0: never) a ready worker must answer a health check within
    ``health_timeout_s``; one that does not (hung, stopped) is killed and handled as a
    crash. A replica that gave up tries again every ``gave_up_retry_s`` (0: never).

    A worker's environment is an allowlist (``llmpoold.replicas.supervise.worker_env``):
    the system and runtime variables plus the names in ``env_passthrough`` (exact names,
    or a prefix ending in ``*``); never the key variables the settings name.
    """

    restart_max: int = Field(3, ge=0)
    restart_window_s: float = Field(300.0, gt=0)
    restart_backoff_s: float = Field(1.0, ge=0)
    restart_backoff_max_s: float = Field(30.0, ge=0)
    unload_timeout_s: float = Field(10.0, gt=0)
    load_timeout_s: float = Field(600.0, gt=0)
    health_interval_s: float = Field(10.0, ge=0)
    health_timeout_s: float = Field(10.0, gt=0)
    gave_up_retry_s: float = Field(300.0, ge=0, allow_inf_nan=False)
    env_passthrough: tuple[str, ...] = ()

    @field_validator("env_passthrough", mode="after")
    @classmethod
    def _env_names(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for name in value:
            if not ENV_NAME.fullmatch(name):
                raise ValueError("each entry must be an environment variable name (letters, digits, _; not "
                                 "starting with a digit), optionally ending in * for a prefix")
        return value


class MemorySettings(_Strict):
    """``engine.memory``: the budget loads must fit in (see :mod:`llmpoold.memory`).

    ``ram_budget_mib`` defaults to ``ram_budget_share`` of MemTotal; ``vram_budget_mib``
    maps a GPU index to MiB, each GPU not named gets its NVML total minus
    ``vram_reserve_mib``. A load that does not fit evicts idle, unpinned models (least
    recently used first, none loaded less than ``min_residency_s`` ago); models with work
    are drained (up to ``drain_timeout_s``) only with ``evict_busy``.
    """

    ram_budget_mib: int | None = Field(None, gt=0)
    ram_budget_share: float = Field(0.8, gt=0, le=1)
    vram_budget_mib: dict[int, int] = Field(default_factory=dict)
    vram_reserve_mib: int = Field(512, ge=0)
    evict_busy: bool = False
    drain_timeout_s: float = Field(30.0, gt=0, allow_inf_nan=False)
    min_residency_s: float = Field(30.0, ge=0, allow_inf_nan=False)

    @field_validator("vram_budget_mib", mode="after")
    @classmethod
    def _vram(cls, value: dict[int, int]) -> dict[int, int]:
        for index, mib in value.items():
            if index < 0 or mib <= 0:
                raise ValueError("vram_budget_mib maps a GPU index (0, 1, ...) to a positive number of MiB")
        return value


class EngineSettings(_Strict):
    """``engine``: models and their defaults. ``state_dir`` holds what must survive a
    restart (the API keys' remote spend, :mod:`llmpoold.usage`); read at start."""

    backend: str | None = None
    state_dir: str = "/var/lib/llmpool"
    decoding: DecodingDefaults = Field(default_factory=lambda: DecodingDefaults())
    fairness: FairnessSettings = Field(default_factory=FairnessSettings)
    workers: WorkerSettings = Field(default_factory=WorkerSettings)
    models: dict[str, ModelConfig] = Field(default_factory=dict)
    # Names of ``engine.models`` entries that are not objects (skipped, as the seed does).
    skipped_models: tuple[str, ...] = ()
    # ----- lifecycle (issues 14, 18) -----
    # An unload stops admissions, lets running requests finish for this long, then
    # cancels what still runs (those clients get 503 ``model_unloaded``).
    unload_drain_timeout_s: float = Field(120.0, gt=0, allow_inf_nan=False)
    on_demand: bool = False  # default of each model's on_demand: load on the first request
    idle_ttl_s: float | None = Field(None, gt=0, allow_inf_nan=False)  # default of each model's
    memory: MemorySettings = Field(default_factory=MemorySettings)

    @field_validator("backend", mode="before")
    @classmethod
    def _backend(cls, value: Any) -> Any:
        return ModelConfig._backend(value)

    @model_validator(mode="before")
    @classmethod
    def _skip_non_objects(cls, data: Any) -> Any:
        if isinstance(data, dict) and "skipped_models" in data:
            raise ValueError("engine.skipped_models: unknown key")  # set here only, never by a file
        if isinstance(data, dict) and isinstance(data.get("models"), dict):
            models = data["models"]
            data = {**data, "models": {k: v for k, v in models.items() if isinstance(v, dict)},
                    "skipped_models": tuple(str(k) for k, v in models.items() if not isinstance(v, dict))}
        return data

    @field_validator("models", mode="before")
    @classmethod
    def _models(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            raise ValueError("engine.models must be an object of {model_name: model}")
        return {str(name): model_entry(str(name), entry) for name, entry in value.items()}


def model_entry(name: str, entry: Mapping[str, Any]) -> ModelConfig:
    """One ``engine.models`` entry; when its common keys are invalid, a stand-in with
    ``error`` set (and every configured key kept in ``backend_keys``, so that a reload
    sees any change to it)."""
    common = {k: v for k, v in entry.items() if k in COMMON_MODEL_KEYS}
    try:
        return ModelConfig.model_validate({"name": name, **common, "backend_keys": seed_backend_keys(entry)})
    except ValidationError as exc:
        error = format_validation_error(exc, prefix=f"engine.models.{name}")
    backend = entry.get("backend")
    path = entry.get("model_path")
    enabled = entry.get("enabled")
    return ModelConfig(name=name, backend=backend if isinstance(backend, str) else None,
                       model_path=path if isinstance(path, str) else None,
                       enabled=enabled if isinstance(enabled, bool) else True, error=error,
                       backend_keys={k: v for k, v in entry.items() if k not in ("backend", "model_path", "enabled")})


class AppSettings(_Strict):
    service: ServiceSettings = Field(default_factory=lambda: ServiceSettings())
    engine: EngineSettings = Field(default_factory=EngineSettings)

    def resolved_backend(self, model: ModelConfig) -> str | None:
        return model.backend or self.engine.backend


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Objects merge key by key, recursively; anything else in ``override`` replaces."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def settings_paths(settings: str | os.PathLike[str] | None = None,
                   local: str | os.PathLike[str] | None = None) -> tuple[Path, Path, bool]:
    """Resolve (settings path, local path, whether the settings path was named on the
    command line: only then must it exist)."""
    named = settings or os.environ.get(SETTINGS_ENV) or os.environ.get(LEGACY_SETTINGS_ENV)
    base = Path(named) if named else DEFAULT_SETTINGS_PATH
    local_named = local or os.environ.get(LOCAL_SETTINGS_ENV)
    local_path = Path(local_named) if local_named else base.with_name("local.json")
    return base, local_path, bool(settings)


def _read_json(path: Path, *, required: bool) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if required:
            raise SettingsError(f"{path}: settings file not found") from None
        return {}
    except OSError as exc:
        raise SettingsError(f"{path}: cannot read settings file: {exc.strerror or exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SettingsError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    if not isinstance(data, dict):
        raise SettingsError(f"{path}: the top level must be a JSON object, got {type(data).__name__}")
    return data


def format_validation_error(exc: ValidationError, *, prefix: str = "") -> str:
    """One line per error: ``<field path>: <message> (got <value>)``. The value is left
    out for unknown keys (a literal key under a wrong name must not be echoed, e.g. by
    ``/v1/admin/settings/reload``), secret-looking fields (:func:`~llmpoold.model_config.secret_field`),
    objects and missing fields."""
    lines = []
    for err in exc.errors():
        loc = [str(part) for part in err["loc"]]
        if len(loc) >= 3 and loc[:2] == ["engine", "models"] and loc[3:4] == ["backend_keys"]:
            del loc[3]
        path = ".".join(([prefix] if prefix else []) + loc)
        message = str(err["msg"]).removeprefix("Value error, ")
        if message.startswith((f"{path}.", f"{path} ", f"{path}[")):
            path = ""  # the message names the field itself (the seed's fairness messages)
        if err["type"] == "extra_forbidden":
            message = "unknown key"
        value = err.get("input")
        # A literal API key must not reach stderr or an admin reload response.
        named = [part for i, part in enumerate(loc) if not (i == 2 and loc[:2] == ["engine", "models"])]
        secret = any(secret_field(part) for part in named)  # a model's own name is not a field
        hidden = err["type"] in ("missing", "extra_forbidden") or isinstance(value, dict) or secret
        shown = "" if hidden else f" (got {json.dumps(value, default=str)})"
        lines.append(f"{path}: {message}{shown}" if path else f"{message}{shown}")
    return "; ".join(lines)


def with_service_overrides(settings: AppSettings, **updates: Any) -> AppSettings:
    """``settings`` with ``service`` fields replaced (the command line's ``--host``...),
    validated again (a non-loopback ``--host`` needs keys as ``service.host`` does).
    Raises :class:`SettingsError`."""
    if not updates:
        return settings
    try:
        service = ServiceSettings.model_validate({**settings.service.model_dump(), **updates})
    except ValidationError as exc:
        raise SettingsError(format_validation_error(exc, prefix="service")) from None
    return settings.model_copy(update={"service": service})


def parse_settings(data: Mapping[str, Any], *, source: str = "settings") -> AppSettings:
    try:
        return AppSettings.model_validate(data)
    except ValidationError as exc:
        raise SettingsError(f"{source}: {format_validation_error(exc)}") from None


def load_settings(settings: str | os.PathLike[str] | None = None,
                  local: str | os.PathLike[str] | None = None) -> AppSettings:
    """Read, merge and validate the settings files. Raises :class:`SettingsError`."""
    base_path, local_path, named = settings_paths(settings, local)
    merged = deep_merge(_read_json(base_path, required=named), _read_json(local_path, required=bool(local)))
    return parse_settings(merged, source=str(base_path))


def resolve_model_options(model: ModelConfig, options_model: type[BaseModel], *, backend: str,
                          requires_model_path: bool, override: Mapping[str, Any] | None = None) -> ModelConfig:
    """Validate ``model.backend_keys`` (plus a load override) with the plugin's options
    model and return a copy with ``options`` set. Raises :class:`SettingsError`."""
    keys = dict(model.backend_keys)
    if override:
        keys.update(override)
    if requires_model_path and not model.model_path:
        raise SettingsError(f"engine.models.{model.name}.model_path: required for backend '{backend}'")
    try:
        options = options_model.model_validate(keys)
    except ValidationError as exc:
        raise SettingsError(format_validation_error(exc, prefix=f"engine.models.{model.name}")) from None
    return model.model_copy(update={"options": options})
