"""An object entry of ``service.api_keys``: an API key that names a tenant
(:class:`ApiKeySettings`). What the daemon does with it is :mod:`llmpoold.tenants`;
a plain string entry stays a key without a name (today's behaviour).
"""

from __future__ import annotations

import os
import re
from fnmatch import fnmatchcase
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from llmpoold.errors import SettingsError

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
MAX_FAIRNESS_KEY_LENGTH = 128


class ApiKeySettings(BaseModel):
    """One API key as a tenant.

    - ``name``: how the key appears in usage, metrics, logs and errors (never the key).
    - ``key`` or ``key_env`` (exactly one): the key itself, or the environment variable
      holding it (which must be set and non-empty, like ``service.api_key_envs``).
    - ``fairness_key``: the key's bucket in the fair queue (default ``name``); a client's
      own ``fairness_key`` becomes a sub-bucket ``<fairness_key>:<client key>`` sharing
      it. ``weight``: the bucket's weight (default ``engine.fairness.weights`` for it).
    - ``models``: glob patterns (``fnmatch``, case-sensitive) of the models the key may
      call; omitted: all. ``allow_remote: false``: remote models refuse the key whatever
      the body says (true keeps the body's ``allow_remote`` opt-in).
    - ``max_inflight``: at most this many of the key's requests hold a place in a model
      (waiting in its queue or running); ``max_queued`` more wait for one of those
      places, in arrival order (default 0: refused at once). ``requests_per_minute``,
      ``output_tokens_per_minute``: token buckets refilled continuously.
    - ``remote_budget``: the most the key may spend on priced remote models per calendar
      month (UTC), in the unit of the models' ``remote_price_per_million_*``.
    - ``admin``: the key may also use the admin API.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    key: str | None = None
    key_env: str | None = None
    fairness_key: str | None = None
    weight: float | None = Field(None, gt=0, allow_inf_nan=False)
    models: tuple[str, ...] | None = None
    allow_remote: bool = True
    max_inflight: int | None = Field(None, ge=1)
    max_queued: int = Field(0, ge=0)
    requests_per_minute: int | None = Field(None, ge=1)
    output_tokens_per_minute: int | None = Field(None, ge=1)
    remote_budget: float | None = Field(None, ge=0, allow_inf_nan=False)
    admin: bool = False

    @field_validator("name", mode="after")
    @classmethod
    def _name(cls, value: str) -> str:
        if not NAME.fullmatch(value):
            raise ValueError("a key's name must be 1-64 letters, digits, '_', '.' or '-' (starting with a letter or "
                             "digit): it labels metrics and logs")
        return value

    @field_validator("fairness_key", mode="after")
    @classmethod
    def _fairness_key(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.strip()
        if not value or len(value) > MAX_FAIRNESS_KEY_LENGTH:
            raise ValueError(f"fairness_key must be 1-{MAX_FAIRNESS_KEY_LENGTH} characters")
        return value

    @field_validator("models", mode="after")
    @classmethod
    def _models(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is not None and any(not pattern.strip() for pattern in value):
            raise ValueError("models must not contain blank patterns")
        return value

    @model_validator(mode="before")
    @classmethod
    def _one_key(cls, data: Any) -> Any:
        if isinstance(data, dict):
            key, env = data.get("key"), data.get("key_env")
            if (key is None) == (env is None):
                raise ValueError("an API key object needs exactly one of 'key' and 'key_env'")
            if isinstance(key, str) and not key.strip():
                raise ValueError("'key' must not be blank")
            if isinstance(env, str):
                name = env.strip()
                if not name or not os.environ.get(name):
                    raise ValueError(f"key_env: environment variable '{name}' is unset or empty" if name
                                     else "key_env: an empty environment variable name")
                data = {**data, "key_env": name}
        return data

    @property
    def bucket(self) -> str:
        """The key's fairness bucket: ``fairness_key``, else its name."""
        return self.fairness_key or self.name

    def allows_model(self, model: str) -> bool:
        return self.models is None or any(fnmatchcase(model, pattern) for pattern in self.models)

    def resolved_key(self) -> str:
        """The key's value; :class:`SettingsError` naming the variable (never a value)
        when ``key_env`` is (now) unset or empty."""
        if self.key is not None:
            return self.key
        assert self.key_env is not None
        value = os.environ.get(self.key_env, "")
        if not value:
            raise SettingsError(f"service.api_keys[{self.name}].key_env: environment variable '{self.key_env}' is "
                                "unset or empty")
        return value
