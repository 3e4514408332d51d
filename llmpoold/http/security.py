"""Who may call what: the keys, and the browser rules (``Origin``, ``Host``).

:class:`Door` is built once per app from the ``service`` block and the tenants' key ring
(keys resolved at build and on reload: an unset key variable is a settings error then,
never a per-request 500), and checked for every request by :func:`check_browser` then :func:`authorize`, each a
pure function of (request, door[, ring]) that returns or raises :class:`ApiError`:

- ``Host`` (loopback binds only): a loopback name or address, or one of
  ``service.allowed_hosts``; else 421 ``misdirected_request`` (DNS rebinding).
- ``Origin`` (any request that carries one): the request's own origin, or one of
  ``service.allowed_origins``; else 403 ``origin_not_allowed`` (CSRF). Allowed foreign
  origins get CORS headers (:func:`cors_headers`) and their preflights are answered.
- Keys: see :func:`authorize` and the README's "Security model".
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from aiohttp import web

from llmpoold.errors import ApiError, clip
from llmpoold.http import public
from llmpoold.service_settings import ServiceSettings, is_loopback_host
from llmpoold.tenants import KeyRing, Tenant

HEALTH_PATHS = frozenset({"/healthz", "/readyz"})
METRICS_PATH = "/metrics"
ADMIN_PREFIX = "/v1/admin"
_CORS_HEADERS = "Authorization, Content-Type, X-Api-Key, X-Request-Id"


class Surface(StrEnum):
    """What a path is, for the key rules."""

    OPEN = "open"  # health and the public pages: never a key
    METRICS = "metrics"  # open on loopback binds; any key elsewhere (when keys exist)
    ADMIN = "admin"
    INFERENCE = "inference"


@dataclass(frozen=True)
class Door:
    """The browser and admin rules of one app, from :class:`ServiceSettings` (the keys
    themselves are the tenants' :class:`~llmpoold.tenants.KeyRing`, resolved at build
    and again on every settings reload)."""

    admin_open: bool
    loopback: bool  # the daemon binds a loopback address
    allowed_origins: frozenset[str]
    allowed_hosts: frozenset[str]

    @classmethod
    def from_settings(cls, service: ServiceSettings) -> Door:
        return cls(admin_open=service.admin_open, loopback=is_loopback_host(service.host),
                   allowed_origins=frozenset(service.allowed_origins),
                   allowed_hosts=frozenset(service.allowed_hosts))


def surface(method: str, path: str) -> Surface:
    if path in HEALTH_PATHS or public.is_public(method, path):
        return Surface.OPEN
    if path == METRICS_PATH:
        return Surface.METRICS
    if path == ADMIN_PREFIX or path.startswith(ADMIN_PREFIX + "/"):
        return Surface.ADMIN
    return Surface.INFERENCE


def presented_key(request: web.Request) -> str | None:
    """The key a client sent: ``Authorization: Bearer <key>``, else ``X-Api-Key``."""
    header = request.headers.get("Authorization", "")
    if header[:7].lower() == "bearer ":
        return header[7:].strip()
    return request.headers.get("X-Api-Key")


def _unauthorized(message: str) -> ApiError:
    return ApiError(401, "unauthorized", message, headers={"WWW-Authenticate": "Bearer"})


def authorize(request: web.Request, door: Door, ring: KeyRing) -> Tenant | None:
    """The caller of ``request`` (a named key's :class:`Tenant`, else None) when its key
    (or none) may call its path; else ApiError 401.

    - health, public pages: open; ``/metrics``: open on a loopback bind, else any
      configured key (inference or admin), open when there is none;
    - admin: the admin key or a named key with ``admin: true``; with inference keys but
      neither of those, refused unless ``service.admin_open``; open only when no key is
      configured at all;
    - inference: an inference key or the admin key; open when no inference key is set.

    Keys are compared in constant time, with every key (:meth:`KeyRing.find`).
    """
    kind = surface(request.method, request.path)
    if kind is Surface.OPEN or (kind is Surface.METRICS and door.loopback):
        return None
    key = presented_key(request)
    found, tenant = ring.find(key)
    is_admin = ring.is_admin_key(key)
    if kind is Surface.METRICS:
        if (ring.entries or ring.admin_key) and not (found or is_admin):
            raise _unauthorized("/metrics on a non-loopback bind needs an API key or the admin key")
        return None
    if kind is Surface.ADMIN:
        if is_admin or (tenant is not None and tenant.settings.admin):
            return tenant
        if ring.admin_key or any(t.settings.admin for t in ring.tenants):
            raise _unauthorized("the admin API needs the admin key")
        if ring.entries and not door.admin_open:
            raise _unauthorized("the admin API is closed: no admin key is configured (set "
                                "service.admin_api_key_env, or service.admin_open: true)")
        return None
    if found:
        return tenant
    if ring.entries and not is_admin:
        raise _unauthorized("missing or invalid API key")
    return None


def _host_name(host: str) -> str:
    """``Host`` without its port, lowercased (``[::1]:8010`` → ``[::1]``)."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[: host.find("]") + 1] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _own_origin(request: web.Request) -> str:
    return f"{request.scheme}://{request.headers.get('Host', '').strip().lower()}"


def check_browser(request: web.Request, door: Door) -> None:
    """Return when ``Host`` and ``Origin`` are acceptable; else ApiError 421 or 403."""
    if door.loopback:
        host = _host_name(request.headers.get("Host", ""))  # none: not a browser (HTTP/1.0)
        if host and not (is_loopback_host(host) or host.rstrip(".") in door.allowed_hosts):
            raise ApiError(421, "misdirected_request",
                           f"Host {clip(host)} is not this daemon's (a loopback bind answers loopback names and "
                           "service.allowed_hosts only)")
    origin = request.headers.get("Origin")
    if origin is None:
        return
    origin = origin.strip().lower().rstrip("/")
    if origin != _own_origin(request) and origin not in door.allowed_origins:
        raise ApiError(403, "origin_not_allowed",
                       f"Origin {clip(origin)} is not allowed (service.allowed_origins)")


def cors_headers(request: web.Request, door: Door) -> dict[str, str]:
    """CORS headers for a request from an allowed foreign origin (none otherwise)."""
    origin = request.headers.get("Origin", "").strip().lower().rstrip("/")
    if origin not in door.allowed_origins or origin == _own_origin(request):
        return {}
    return {"Access-Control-Allow-Origin": request.headers["Origin"].strip(), "Vary": "Origin",
            "Access-Control-Expose-Headers": "X-Request-Id, X-Llmpool-Metrics"}


def preflight(request: web.Request, door: Door) -> web.Response | None:
    """The answer to a CORS preflight (``OPTIONS`` with ``Access-Control-Request-Method``)
    from an allowed origin; None for any other request."""
    if request.method != "OPTIONS" or "Access-Control-Request-Method" not in request.headers:
        return None
    headers = cors_headers(request, door)
    if not headers:
        return None
    headers.update({"Access-Control-Allow-Methods": "GET, POST", "Access-Control-Allow-Headers": _CORS_HEADERS,
                    "Access-Control-Max-Age": "600"})
    return web.Response(status=204, headers=headers)
