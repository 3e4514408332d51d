"""A settings reload applied to a running pool (the seed's rules): nothing is loaded
or unloaded; a change to an active model is a conflict."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from llmpoold.config import AppSettings, ModelConfig
from llmpoold.entries import ACTIVE_STATES, ModelEntry
from llmpoold.errors import ApiError, SettingsError

if TYPE_CHECKING:
    from llmpoold.pool import Pool


def reload_pool(pool: Pool, new: AppSettings) -> dict[str, list[str]]:
    """Take ``new`` settings without loading or unloading anything (the seed's rules).

    A change that would alter an active model (or the decoding/fairness defaults
    while any model is active) is a 409 ``settings_reload_conflict`` and nothing
    changes; a new or changed model with no backend at all is a SettingsError (the
    seed's "backend cannot be empty"). Returns the added, removed, updated and
    unchanged model names."""
    fresh = type(pool)(new, pool.registry, replica_factory=pool.replica_factory, queue_factory=pool.queue_factory)
    new = fresh.settings  # skipped models left out, as in pool.settings
    old_models, new_models = pool.settings.engine.models, new.engine.models
    active = {name for name, e in pool.entries.items() if e.state in ACTIVE_STATES}
    conflicts = [f"engine.{block}" for block in ("decoding", "fairness")
                 if active and getattr(new.engine, block) != getattr(pool.settings.engine, block)]
    added = sorted(set(new_models) - set(old_models))
    removed = sorted(set(old_models) - set(new_models))
    updated: list[str] = []
    unchanged: list[str] = []
    runtime_changed: set[str] = set()  # changed in more than `enabled`
    for name in sorted(set(old_models) & set(new_models)):
        same_backend = pool.settings.resolved_backend(old_models[name]) == new.resolved_backend(new_models[name])
        old_cfg, new_cfg = _comparable(old_models[name]), _comparable(new_models[name])
        (unchanged if same_backend and old_cfg == new_cfg else updated).append(name)
        old_cfg.pop("enabled"), new_cfg.pop("enabled")
        if not same_backend or old_cfg != new_cfg:
            runtime_changed.add(name)
            if name in active:
                conflicts.append(f"engine.models.{name}")
    conflicts += [f"engine.models.{name}" for name in removed if name in active]
    empty = [name for name in fresh.catalog.unresolved if name not in old_models or name in runtime_changed]
    if empty:
        raise SettingsError("; ".join(f"engine.models.{name}: backend cannot be empty (no backend and no "
                                      "engine.backend)" for name in empty))
    if conflicts:
        raise ApiError(409, "settings_reload_conflict", extra={"conflicts": sorted(set(conflicts))})
    entries: dict[str, ModelEntry] = {}
    for name, entry in fresh.entries.items():
        old = pool.entries.get(name)
        if old is not None and name not in runtime_changed:
            # The seed keeps the same state object: a loaded model its runtime, a failed
            # one its last_error and observed VRAM; only `enabled` follows the file.
            old.config = old.config.model_copy(update={"enabled": new_models[name].enabled})
            entries[name] = old
        else:
            entries[name] = entry
    pool.settings, pool.entries, pool.catalog = new, entries, fresh.catalog
    return {"added_models": added, "removed_models": removed, "updated_models": updated,
            "unchanged_models": unchanged}


def _comparable(entry_config: ModelConfig) -> dict[str, Any]:
    return entry_config.model_dump(exclude={"options", "name"})
