"""The ``service`` settings block (:class:`ServiceSettings`): bind address, keys and the
HTTP limits, and the helpers the HTTP layer uses to check a caller.

- Keys: ``api_keys`` (strings, or objects that name a tenant:
  :class:`~llmpoold.tenant_settings.ApiKeySettings`) / ``api_key_envs`` (inference), ``admin_api_key`` /
  ``admin_api_key_env`` (admin). A ``*_env`` entry names an environment variable that must
  be set and non-empty when the settings are validated (start, ``--check``, reload) and
  when they are resolved (:meth:`ServiceSettings.resolved_api_keys`,
  :meth:`ServiceSettings.resolved_admin_key`); else :class:`~llmpoold.errors.SettingsError`
  naming the variable, never a value.
- :func:`key_matches`: constant-time comparison of a presented key with the configured ones.
- :func:`is_loopback_host`: whether a bind address or ``Host`` name is loopback. A
  non-loopback ``host`` with no key at all is refused unless ``allow_unauthenticated``.
- ``admin_open``, ``allowed_origins``, ``allowed_hosts``, ``stream_write_timeout_s`` are
  declared and validated here, enforced by the HTTP layer (README, Security model).
"""

from __future__ import annotations

import hmac
import ipaddress
import os
from collections.abc import Iterable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from llmpoold.errors import SettingsError
from llmpoold.tenant_settings import ApiKeySettings

LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})


def is_loopback_host(host: str) -> bool:
    """True for a loopback address (``127.0.0.0/8``, ``::1``, also in brackets) or a
    loopback name (``localhost``...); False for anything else, wildcard binds
    (``0.0.0.0``, ``::``, ``""``) and other host names included."""
    name = host.strip().lower().removeprefix("[").removesuffix("]").rstrip(".")
    if name in LOOPBACK_NAMES or name.endswith(".localhost"):
        return True
    return _is_ip(name) and ipaddress.ip_address(name).is_loopback


def key_matches(presented: str | None, keys: Iterable[str]) -> bool:
    """Whether ``presented`` equals one of ``keys``, in time independent of where they
    differ: every key is compared with :func:`hmac.compare_digest` (no early exit), so
    neither a key's prefix nor which key matched leaks through timing. ``None`` or
    ``""`` matches nothing."""
    if not presented:
        return False
    given = presented.encode("utf-8", "surrogatepass")
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(given, key.encode("utf-8", "surrogatepass"))
    return matched


def _env_value(name: str, field: str) -> str:
    """The value of the key variable ``name`` (named by ``service.<field>``);
    :class:`SettingsError` naming the variable, never a value, when unset or empty."""
    value = os.environ.get(name, "")
    if not value:
        raise SettingsError(f"service.{field}: {_unset(name)}")
    return value


def _unset(name: str) -> str:
    return f"environment variable '{name}' is unset or empty" if name else "an empty environment variable name"


def _check_env(name: str) -> str:
    """``name`` stripped; ValueError unless it names a set, non-empty variable."""
    name = name.strip()
    if not name or not os.environ.get(name):
        raise ValueError(_unset(name))
    return name


def _bad_chars(text: str) -> bool:
    return any(c in "/?#@\\" or c.isspace() for c in text)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _origin(value: str) -> str:
    origin = value.strip().lower().rstrip("/")
    scheme, sep, rest = origin.partition("://")
    if scheme not in ("http", "https") or not sep or not rest or _bad_chars(rest):
        raise ValueError("allowed_origins entries must be origins: scheme://host[:port] with scheme http or "
                         "https, no path")
    return origin


def _host_name(value: str) -> str:
    host = value.strip().lower().rstrip(".")
    bare = host.removeprefix("[").removesuffix("]")
    if not host or _bad_chars(host) or (":" in host and not _is_ip(bare)):
        raise ValueError("allowed_hosts entries must be host names or addresses, without scheme, port or path")
    return host


class ServiceSettings(BaseModel):
    """``service``: bind address, keys and the HTTP limits.

    Keys: ``api_keys`` / ``api_key_envs`` (inference) and ``admin_api_key`` /
    ``admin_api_key_env`` (admin). A ``*_env`` entry names an environment variable that
    must be set and non-empty (else a settings error naming it): a missing key file never
    runs the daemon open. A ``host`` that is not loopback needs some key unless
    ``allow_unauthenticated``. ``admin_open`` (admin without the admin key when only
    inference keys exist), ``allowed_origins``, ``allowed_hosts`` and
    ``stream_write_timeout_s`` are enforced by the HTTP layer (see the README's security
    model).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = "127.0.0.1"
    port: int = Field(8010, ge=1, le=65535)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    api_keys: tuple[str | ApiKeySettings, ...] = ()
    api_key_envs: tuple[str, ...] = ()
    admin_api_key: str | None = None
    admin_api_key_env: str | None = None
    admin_open: bool = False
    allow_unauthenticated: bool = False
    allowed_origins: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = ()
    stream_write_timeout_s: float = Field(30.0, gt=0, allow_inf_nan=False)
    shutdown_timeout_s: float = Field(30.0, gt=0)
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024)

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("api_keys", mode="after")
    @classmethod
    def _api_keys(cls, value: tuple[str | ApiKeySettings, ...]) -> tuple[str | ApiKeySettings, ...]:
        if any(isinstance(key, str) and not key.strip() for key in value):
            raise ValueError("API keys must not be blank")
        names = [key.name for key in value if isinstance(key, ApiKeySettings)]
        duplicate = next((name for i, name in enumerate(names) if name in names[:i]), None)
        if duplicate is not None:
            raise ValueError(f"two API keys are named '{duplicate}'")
        return value

    @field_validator("admin_api_key", mode="after")
    @classmethod
    def _admin_api_key(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("the admin key must not be blank (omit it or use null)")
        return value

    @field_validator("api_key_envs", mode="after")
    @classmethod
    def _api_key_envs(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(_check_env(name) for name in value)

    @field_validator("admin_api_key_env", mode="after")
    @classmethod
    def _admin_api_key_env(cls, value: str | None) -> str | None:
        return _check_env(value) if value is not None else None

    @field_validator("allowed_origins", mode="after")
    @classmethod
    def _allowed_origins(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(dict.fromkeys(_origin(v) for v in value))

    @field_validator("allowed_hosts", mode="after")
    @classmethod
    def _allowed_hosts(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(dict.fromkeys(_host_name(v) for v in value))

    @model_validator(mode="after")
    def _exposed(self) -> ServiceSettings:
        if not self.has_keys and not self.allow_unauthenticated and not is_loopback_host(self.host):
            raise ValueError(
                f"service.host: binding '{self.host}' (not loopback) with no API or admin key would serve "
                "everyone; set service.api_keys / api_key_envs / admin_api_key(_env), or "
                "service.allow_unauthenticated: true")
        return self

    @property
    def has_keys(self) -> bool:
        """Whether any inference or admin key is configured."""
        return bool(self.api_keys or self.api_key_envs or self.admin_api_key or self.admin_api_key_env)

    def resolved_api_keys(self) -> frozenset[str]:
        """Inference keys: literal ones (of named keys too) plus the values of the named env vars.
        Raises :class:`SettingsError` naming a variable that is (now) unset or empty."""
        keys = {key if isinstance(key, str) else key.resolved_key() for key in self.api_keys}
        keys.update(_env_value(name, "api_key_envs") for name in self.api_key_envs)
        return frozenset(k for k in keys if k)

    def resolved_admin_key(self) -> str | None:
        """The admin key: the named env var's value (SettingsError when unset or empty),
        else the literal ``admin_api_key``, else None."""
        if self.admin_api_key_env:
            return _env_value(self.admin_api_key_env, "admin_api_key_env")
        return self.admin_api_key or None
