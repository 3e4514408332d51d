"""The model catalog: what the installed plugins make of ``engine.models``.

A seed (llm-pool) settings file must start unchanged, so one model never stops the
daemon. Per model, :func:`resolve_catalog` follows the seed:

- skipped, with a warning naming it: an entry that is not an object, and a model without
  ``model_path`` whose backend needs one (the seed skips both silently);
- ``failed`` with its reason (:attr:`CatalogModel.error`): invalid common keys, invalid
  backend keys (e.g. a remote model missing ``remote_model``), no backend at all, or a
  backend no installed plugin provides (``no plugin for backend 'X' (install its llmpool
  plugin)``);
- keys: the backend's own (its plugin's ``options_model``) are validated; the seed's
  common ``device`` / ``compute_type`` are passed on where the backend declares them and
  dropped silently elsewhere; a key of another backend (an installed plugin's, or the
  seed's ``llama_server_*``, ``vllm_*``, ``sglang_*``, ``trtllm_*``) is accepted on a model
  of that backend and ignored with a warning on any other; a key nobody knows is ignored
  with a warning and a "did you mean" (never its value).

Warnings are logged when the pool is built (start and reload) and printed by
``llmpoold --check`` (``--strict``: exit 1 when there are any).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass, field

from llmpoold.config import COMMON_MODEL_KEYS, AppSettings, ModelConfig, SettingsError, resolve_model_options
from llmpoold.plugins import PluginRegistry

# The seed's common keys that only some backends use (ct2 and exllamav3 here).
SEED_COMMON_KEYS = frozenset({"device", "compute_type"})
# The seed's backends llmpool ships no plugin for, by key prefix (longest first).
SEED_BACKEND_PREFIXES = (("llama_server_", "llama_server"), ("vllm_serve_", "vllm_serve"), ("vllm_", "vllm"),
                         ("sglang_", "sglang_serve"), ("trtllm_", "trtllm_serve"))
# Backends the seed runs without a model_path (a model of any other backend without one
# is skipped); used when the backend has no installed plugin to say so itself.
SEED_PATHLESS_BACKENDS = frozenset({"openai_remote", "openai_compatible", "remote", "sglang_serve", "trtllm_serve",
                                    "vllm", "vllm_serve"})


@dataclass
class CatalogModel:
    """One model as the pool starts it: ``backend`` is the installed plugin's canonical
    name (None when none provides it); ``error`` makes the model ``failed`` from the start."""

    config: ModelConfig
    backend: str | None
    error: str | None = None


@dataclass
class Catalog:
    """``settings`` with skipped models removed and each model's options resolved."""

    settings: AppSettings
    models: dict[str, CatalogModel] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    # Models whose backend is empty: no ``backend`` and no ``engine.backend`` (a reload
    # refuses such a file, as the seed's "backend cannot be empty").
    unresolved: list[str] = field(default_factory=list)


def _key_owner(key: str, registry: PluginRegistry) -> str | None:
    """The backend a key belongs to: an installed plugin's, else the seed's by prefix."""
    for name, spec in registry.backends.items():
        if key in spec.options_model.model_fields:
            return name
    return next((backend for prefix, backend in SEED_BACKEND_PREFIXES if key.startswith(prefix)), None)


def _did_you_mean(key: str, candidates: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, sorted(set(candidates)), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def _accepted_keys(model: ModelConfig, backend: str, registry: PluginRegistry,
                   warnings: list[str]) -> dict[str, object]:
    """``model.backend_keys`` that ``backend`` takes; a warning for each other key
    (named, never its value), except the seed's common keys the backend does not use."""
    own = registry.spec(backend).options_model.model_fields
    known = set(COMMON_MODEL_KEYS) | SEED_COMMON_KEYS | set(own)
    for spec in registry.backends.values():
        known |= set(spec.options_model.model_fields)
    kept: dict[str, object] = {}
    for key, value in model.backend_keys.items():
        if key in own:
            kept[key] = value
        elif key in SEED_COMMON_KEYS:
            continue
        else:
            warnings.append(_key_warning(model.name, key, backend, registry, known))
    return kept


def _key_warning(name: str, key: str, backend: str | None, registry: PluginRegistry, known: set[str]) -> str:
    owner = _key_owner(key, registry)
    where = f"engine.models.{name}.{key}"
    if owner is not None:
        return f"{where}: a key of backend '{owner}', ignored for backend '{backend}'"
    return f"{where}: unknown key, ignored{_did_you_mean(key, known)}"


def _unowned_keys(model: ModelConfig, configured: str, registry: PluginRegistry, warnings: list[str]) -> None:
    """Warnings for the keys of a model whose backend has no plugin: keys of the seed's
    backends and of installed plugins are taken as known (nothing can check them here)."""
    known = set(COMMON_MODEL_KEYS) | SEED_COMMON_KEYS
    for spec in registry.backends.values():
        known |= set(spec.options_model.model_fields)
    for key in model.backend_keys:
        if key not in known and _key_owner(key, registry) is None:
            warnings.append(f"engine.models.{model.name}.{key}: unknown key, ignored{_did_you_mean(key, known)}")


def resolve_catalog(settings: AppSettings, registry: PluginRegistry) -> Catalog:
    """Resolve every model of ``settings`` against the installed plugins (see the
    module docstring). Never raises for one model."""
    catalog = Catalog(settings=settings)
    warnings = catalog.warnings
    warnings += [f"engine.models.{name}: not an object, skipped" for name in settings.engine.skipped_models]
    for name, model in settings.engine.models.items():
        configured = settings.resolved_backend(model)
        backend = registry.canonical(configured)
        needs_path = (registry.spec(backend).requires_model_path if backend is not None
                      else configured not in SEED_PATHLESS_BACKENDS)
        if needs_path and not model.model_path:
            warnings.append(f"engine.models.{name}: no model_path, skipped (backend '{configured}' needs one)"
                            if configured else f"engine.models.{name}: no model_path and no backend, skipped")
            continue
        if model.error is not None:
            catalog.models[name] = CatalogModel(model, backend, model.error)
        elif configured is None:
            catalog.unresolved.append(name)
            catalog.models[name] = CatalogModel(model, None, (
                f"model '{name}' names no backend and engine.backend is not set "
                f"(installed backends: {registry.describe_installed()})"))
        elif backend is None:
            _unowned_keys(model, configured, registry, warnings)
            catalog.models[name] = CatalogModel(
                model, None, f"no plugin for backend '{configured}' (install its llmpool plugin); "
                             f"installed backends: {registry.describe_installed()}")
        else:
            spec = registry.spec(backend)
            accepted = model.model_copy(update={"backend_keys": _accepted_keys(model, backend, registry, warnings)})
            try:
                resolved = resolve_model_options(accepted, spec.options_model, backend=backend,
                                                 requires_model_path=spec.requires_model_path)
            except SettingsError as exc:
                catalog.models[name] = CatalogModel(accepted, backend, str(exc))
            else:
                catalog.models[name] = CatalogModel(resolved, backend)
    models = {name: item.config for name, item in catalog.models.items()}
    catalog.settings = settings.model_copy(update={"engine": settings.engine.model_copy(update={"models": models})})
    return catalog
