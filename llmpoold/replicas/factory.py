"""The pool's default ``replica_factory``: inline or a worker process per model.

``inline`` models get an :class:`~llmpoold.replicas.inline.InlineReplica`, ``process``
models (the default for local backends) a
:class:`~llmpoold.replicas.process.ProcessReplica`. A plugin registered in-process rather
than installed as an entry point (the test backends) can only be hosted by a worker when
its module is named in ``plugin_modules`` (or ``$LLMPOOL_WORKER_PLUGINS``, comma-separated
import paths); otherwise it runs inline, unless the model explicitly asks for
``isolation: process``, which then fails to load with a message saying why.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import sys
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

from llmpoold.backend import Backend
from llmpoold.config import AppSettings, ModelConfig, WorkerSettings
from llmpoold.hookspecs import PROJECT
from llmpoold.plugins import PluginRegistry
from llmpoold.replicas import Replica
from llmpoold.replicas.inline import InlineReplica
from llmpoold.replicas.process import ProcessReplica
from llmpoold.replicas.supervise import WorkerPlugins

PLUGINS_ENV = "LLMPOOL_WORKER_PLUGINS"
ReplicaFactory = Callable[..., Replica]


def _module_root(module: Any) -> str | None:
    file = getattr(module, "__file__", None)
    if not file:
        return None
    root = Path(file).resolve().parent
    if Path(file).stem == "__init__":
        root = root.parent
    for _ in module.__name__.split(".")[1:]:
        root = root.parent
    return str(root)


def worker_plugins(registry: PluginRegistry, backend: str, extra_modules: Sequence[str] = ()) -> WorkerPlugins | None:
    """How a worker can load the plugin that provides ``backend``, or None when it
    cannot (a plugin registered in-process that is neither an installed entry point
    nor named in ``extra_modules``)."""
    for info in registry.plugins:
        if backend not in info.backends:
            continue
        plugin = registry.pm.get_plugin(info.name)
        module = getattr(plugin, "__name__", None)
        if module is not None and module in extra_modules:
            root = _module_root(plugin)
            return WorkerPlugins(modules=(module,), paths=(root,) if root else ())
        for ep in md.entry_points(group=PROJECT, name=info.name):
            if ep.module == module:
                return WorkerPlugins(entry_points=(info.name,))
        return None
    return None


def secret_env_names(settings: AppSettings) -> frozenset[str]:
    """The environment variables ``settings`` name as holding keys: the service's
    ``api_key_envs`` and ``admin_api_key_env``, and every model's ``*_env`` backend key
    (``remote_api_key_env``)."""
    names = set(settings.service.api_key_envs)
    if settings.service.admin_api_key_env:
        names.add(settings.service.admin_api_key_env)
    for model in settings.engine.models.values():
        names.update(model.key_envs())
    return frozenset(names)


class ProcessReplicaFactory:
    """The pool's default ``replica_factory``: inline or process per model ``isolation``."""

    def __init__(self, policy: WorkerSettings | None = None, *, plugin_modules: Sequence[str] | None = None,
                 python: str = sys.executable, secret_envs: Collection[str] = ()) -> None:
        self.policy = policy or WorkerSettings()
        if plugin_modules is None:
            plugin_modules = [m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(",") if m.strip()]
        self.plugin_modules = tuple(plugin_modules)
        self.python = python
        self.secret_envs = frozenset(secret_envs)

    @classmethod
    def from_settings(cls, settings: AppSettings) -> ProcessReplicaFactory:
        """The factory for ``settings``: its worker policy, and its key variables kept
        out of every worker's environment."""
        return cls(settings.engine.workers, secret_envs=secret_env_names(settings))

    def __call__(self, *, registry: PluginRegistry, backend: str, replica_id: str, model: ModelConfig,
                 concurrency: int, isolation: str) -> Replica:
        if isolation == "inline":
            return InlineReplica(Backend(registry, backend), replica_id, model, concurrency)
        plugins = worker_plugins(registry, backend, self.plugin_modules)
        reason = None
        if plugins is None:
            if model.isolation != "process":
                # A plugin registered in-process (tests): nothing a worker could import.
                return InlineReplica(Backend(registry, backend), replica_id, model, concurrency)
            reason = (f"backend '{backend}' comes from a plugin registered in-process, not an installed "
                      f"'{PROJECT}' entry point, so a worker process cannot load it; set isolation: inline "
                      f"or install the plugin")
        return ProcessReplica(backend=backend, replica_id=replica_id, model=model, concurrency=concurrency,
                              plugins=plugins, policy=self.policy, python=self.python, unhosted_reason=reason,
                              secret_envs=self.secret_envs)
