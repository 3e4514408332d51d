"""Every key the HTTP layer stores on the application or a request."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from llmpoold.config import AppSettings, ServiceSettings, WorkerSettings
from llmpoold.http.security import Door
from llmpoold.plugins import PluginRegistry
from llmpoold.pool import Pool
from llmpoold.tenants import Tenant, Tenants


@dataclass
class ReloadState:
    """What ``POST /v1/admin/settings/reload`` compares against: the settings files, and
    the service block and worker policy the process started with (read once at start, so
    a change to them needs a restart and stays reported until then)."""

    paths: tuple[str | None, str | None]
    service: ServiceSettings
    workers: WorkerSettings
    restart_required: bool = False


POOL = web.AppKey("pool", Pool)
REGISTRY = web.AppKey("registry", PluginRegistry)
SETTINGS = web.AppKey("settings", AppSettings)
RELOAD = web.AppKey("reload", ReloadState)
STARTED_AT = web.AppKey("started_at", int)  # unix time the app was built (OpenAI's ``created``)
DOOR = web.AppKey("door", Door)  # the browser/admin rules (llmpoold.http.security)
TENANTS = web.AppKey("tenants", Tenants)  # the API keys (reloaded with the settings), usage, spend
REQUEST_ID = web.RequestKey("request_id", str)
TENANT = web.RequestKey("tenant", Tenant)  # set for a named API key only (llmpoold.http.security.authorize)
