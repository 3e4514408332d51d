"""``POST /v1/admin/settings/reload``: re-read the settings files, atomically.

The seed's rules: nothing is loaded or unloaded; a change that would alter an active
model (or the decoding/fairness defaults while any model is active) is a conflict
(409) and nothing changes; an invalid file is 400 and nothing changes.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from llmpoold.config import SettingsError, load_settings
from llmpoold.errors import ApiError
from llmpoold.pool import ModelEntry, Pool

SETTINGS_PATHS = web.AppKey("settings_paths", tuple)
# {"service": ServiceSettings and "workers": WorkerSettings the process started with,
#  "restart_required": bool}
RELOAD_STATE = web.AppKey("reload_state", dict)


def _comparable(entry_config: Any) -> dict[str, Any]:
    return entry_config.model_dump(exclude={"options", "name"})


async def reload_settings(app: web.Application) -> dict[str, Any]:
    from llmpoold.app import POOL

    pool: Pool = app[POOL]
    paths = app.get(SETTINGS_PATHS, (None, None))
    try:
        fresh = Pool(load_settings(*paths), pool.registry, replica_factory=pool.replica_factory,
                     queue_factory=pool.queue_factory)
    except (SettingsError, OSError) as exc:
        raise ApiError(400, "invalid_settings", str(exc)) from None
    new = fresh.settings  # skipped models left out, as in pool.settings

    old_models = pool.settings.engine.models
    new_models = new.engine.models
    active = {name for name, e in pool.entries.items() if e.state not in ("unloaded", "failed")}
    conflicts: list[str] = []
    if active and new.engine.decoding != pool.settings.engine.decoding:
        conflicts.append("engine.decoding")
    if active and new.engine.fairness != pool.settings.engine.fairness:
        conflicts.append("engine.fairness")
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
    # The seed's "backend cannot be empty": a new or changed model with no backend and no
    # engine.backend makes the reload 400 and nothing changes (one the daemon started
    # with, unchanged, stays `failed` as at start).
    empty = [name for name in fresh.catalog.unresolved if name not in old_models or name in runtime_changed]
    if empty:
        raise ApiError(400, "invalid_settings", "; ".join(
            f"engine.models.{name}: backend cannot be empty (no backend and no engine.backend)" for name in empty))
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
    pool.settings = new
    pool.entries = entries
    # The service block (host, port, keys) and engine.workers (the worker policy the
    # replica factory holds) are read once at start: a change needs a restart, and
    # stays reported until then.
    state = app[RELOAD_STATE]
    state["restart_required"] = (state["restart_required"] or new.service != state["service"]
                                 or new.engine.workers != state["workers"])
    return {"added_models": added, "removed_models": removed, "updated_models": updated,
            "unchanged_models": unchanged, "service_restart_required": state["restart_required"]}
