"""Admin load overrides: checked against the plugin (types, then ranges) and applied to
a model's config for one load (see the seed contract's load rules)."""

from __future__ import annotations

from typing import Any

from llmpoold.config import ModelConfig, resolve_model_options
from llmpoold.entries import ModelEntry
from llmpoold.errors import ApiError
from llmpoold.plugins import PluginRegistry


def typed_override(entry: ModelEntry, fields: dict[str, Any]) -> dict[str, Any]:
    """``fields`` with the backend's override keys checked against the plugin's
    ``load_override_model`` (types and schema bounds: a ValidationError, the seed's 422,
    before anything else); range rules are the plugin's ``llmpool_check_load_override``."""
    model = entry.spec.load_override_model if entry.spec is not None else None
    typed = {k: v for k, v in fields.items() if entry.spec is not None and k in entry.spec.load_override_keys
             and k != "target_inflight"}
    if model is None or not typed:
        return fields
    checked = model.model_validate(typed)
    return {**fields, **{k: getattr(checked, k) for k in typed}}


def check_override(registry: PluginRegistry, entry: ModelEntry, fields: dict[str, Any]) -> dict[str, Any]:
    """The override to apply, or ApiError 400 ``invalid_load_request``."""
    if not fields:
        return {}
    assert entry.spec is not None and entry.backend is not None
    allowed = set(entry.spec.load_override_keys)
    if not allowed:
        raise ApiError(400, "invalid_load_request",
                       f"load overrides are not supported for backend: '{entry.backend}'", model=entry.name)
    unknown = sorted(set(fields) - allowed)
    if unknown:
        raise ApiError(400, "invalid_load_request",
                       f"unsupported load override for {entry.backend} backend: {', '.join(unknown)}",
                       model=entry.name)
    override = dict(fields)
    if "target_inflight" in override:
        value = override["target_inflight"]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ApiError(400, "invalid_load_request", "target_inflight load override must be a positive integer",
                           model=entry.name)
    backend_part = {k: v for k, v in override.items() if k != "target_inflight"}
    if backend_part:
        try:
            checked = registry.hook.llmpool_check_load_override(backend=entry.backend, override=backend_part)
        except ValueError as exc:
            raise ApiError(400, "invalid_load_request", str(exc), model=entry.name) from None
        if checked is not None:
            override = {**({"target_inflight": override["target_inflight"]} if "target_inflight" in override
                           else {}), **checked}
    return override

def apply_override(entry: ModelEntry, override: dict[str, Any]) -> ModelConfig:
    """The model's config for this load (raises SettingsError/ValueError when invalid)."""
    assert entry.spec is not None and entry.backend is not None
    base = entry.config.model_copy(update={"enabled": True})
    if "target_inflight" in override:
        base = base.model_copy(update={"target_inflight": override["target_inflight"]})
    backend_part = {k: v for k, v in override.items() if k != "target_inflight"}
    return resolve_model_options(base, entry.spec.options_model, backend=entry.backend,
                                 requires_model_path=entry.spec.requires_model_path, override=backend_part)
