"""Plugin discovery: entry points in group ``llmpool``, loaded one at a time.

A plugin that fails to import or to declare its backends is logged and listed with
its error; the others still load. :class:`PluginRegistry` is created by the app
factory (never a module global), so a test builds an app with exactly the plugins it
wants.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
from collections.abc import Iterable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import pluggy
import structlog

from llmpoold import hookspecs
from llmpoold.hookspecs import PROJECT, BackendSpec

log = structlog.get_logger("llmpoold.plugins")


@dataclass
class PluginInfo:
    """One entry of ``GET /v1/admin/plugins``."""

    name: str
    distribution: str | None = None
    version: str | None = None
    backends: list[str] = field(default_factory=list)
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "distribution": self.distribution, "version": self.version,
                "backends": self.backends, "error": self.error}


class PluginRegistry:
    """The plugin manager plus the backends the registered plugins declared."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.plugins: list[PluginInfo] = []
        self.backends: dict[str, BackendSpec] = {}
        self._aliases: dict[str, str] = {}

    @property
    def hook(self) -> Any:
        return self.pm.hook

    def register(self, plugin: ModuleType | object, *, name: str, distribution: str | None = None,
                 version: str | None = None) -> PluginInfo:
        """Register one plugin object; a failure is recorded, never raised."""
        info = PluginInfo(name=name, distribution=distribution, version=version)
        try:
            self.pm.register(plugin, name=name)
            self.pm.check_pending()
            impl = getattr(plugin, "llmpool_backends", None)
            specs = list(impl()) if impl is not None else []
            for spec in specs:
                clash = self.canonical(spec.name) or next((a for a in spec.aliases if self.canonical(a)), None)
                if clash:
                    raise ValueError(f"backend name '{clash}' is already provided by another plugin")
            for spec in specs:
                self.backends[spec.name] = spec
                self._aliases[spec.name] = spec.name
                for alias in spec.aliases:
                    self._aliases[alias] = spec.name
                info.backends.append(spec.name)
        except Exception as exc:  # noqa: BLE001 - isolate one broken plugin
            if self.pm.is_registered(plugin):
                self.pm.unregister(plugin)
            info.error = f"{type(exc).__name__}: {exc}"
            info.backends = []
            log.error("plugin_register_failed", plugin=name, error=info.error)
        self.plugins.append(info)
        return info

    def load_entry_points(self, *, group: str = PROJECT, names: Iterable[str] | None = None) -> None:
        """Load every installed plugin of ``group`` (or only those ``names``), one at a time."""
        wanted = None if names is None else set(names)
        for ep in sorted(md.entry_points(group=group), key=lambda e: e.name):
            if wanted is not None and ep.name not in wanted:
                continue
            dist = getattr(ep, "dist", None)
            dist_name = dist.metadata["Name"] if dist is not None else None
            version = dist.version if dist is not None else None
            try:
                plugin = ep.load()
            except Exception as exc:  # noqa: BLE001 - a broken plugin must not stop the daemon
                error = f"{type(exc).__name__}: {exc}"
                log.error("plugin_import_failed", plugin=ep.name, distribution=dist_name, error=error)
                self.plugins.append(PluginInfo(name=ep.name, distribution=dist_name, version=version, error=error))
                continue
            self.register(plugin, name=ep.name, distribution=dist_name, version=version)

    def load_modules(self, paths: Iterable[str]) -> None:
        """Import and register plugin modules by import path (plugins that are not
        installed entry points: the test backends in a worker)."""
        for path in paths:
            try:
                module = importlib.import_module(path)
            except Exception as exc:  # noqa: BLE001 - listed with its error, as an entry point would be
                error = f"{type(exc).__name__}: {exc}"
                log.error("plugin_import_failed", plugin=path, error=error)
                self.plugins.append(PluginInfo(name=path, error=error))
                continue
            self.register(module, name=path)

    def canonical(self, backend: str | None) -> str | None:
        """The canonical backend name for a name or alias, or None when not installed."""
        if backend is None:
            return None
        return self._aliases.get(backend.strip().lower())

    def spec(self, backend: str) -> BackendSpec:
        return self.backends[backend]

    def describe_installed(self) -> str:
        names = sorted(self.backends)
        return ", ".join(names) if names else "none"
