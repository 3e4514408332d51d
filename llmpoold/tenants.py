"""API keys as tenants: who is calling, and what that caller may do.

- :class:`KeyRing`: the keys of one settings version, resolved once (at app build and
  at each settings reload, so a removed key is refused from its next request). A
  presented key is compared with every configured one in constant time.
- The HTTP middleware (:func:`llmpoold.http.security.authorize`) finds the caller in
  the ring: the :class:`Tenant` for a named key (an object entry of
  ``service.api_keys``), None for a plain key, the admin key or an open daemon.
- :class:`Admission`: one request's passage through its key's rules, used by
  :class:`llmpoold.inference.Inference` at two points: :meth:`Admission.enter` before
  the model's own admission (models, remote gate, budget, rates, the key's places) and
  :meth:`Admission.finish` when the request's outcome is recorded (frees the place,
  charges tokens, time and cost).

Refusals: 403 ``model_not_allowed``, 403 ``remote_execution_disallowed``, 429
``tenant_rate_limited`` / ``tenant_concurrency_limited`` / ``tenant_budget_exhausted``
(each with ``Retry-After``), 503 ``queue_timeout`` for a request that waited for one of
its key's places longer than its queue timeout.

A key's limits hold across models; its counters and token buckets live in
:class:`TenantState`, kept by name across reloads (a reload changes limits, not use).
"""

from __future__ import annotations

import asyncio
import hmac
import math
import sqlite3
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog

from llmpoold.errors import ApiError, SettingsError
from llmpoold.service_settings import ServiceSettings, key_matches
from llmpoold.tenant_settings import ApiKeySettings
from llmpoold.usage import Charge, SpendStore, UsageBook, model_prices, month_of, seconds_to_next_month

log = structlog.get_logger("llmpoold.tenants")

if TYPE_CHECKING:
    from llmpoold.pool import Pool
    from llmpoold.scheduler import Lease
    from llmpoold.schemas import ResponseRequest


class Allowance:
    """A token bucket: ``per_minute`` tokens, refilled continuously. A charge may take
    it below zero (output tokens are known only afterwards); it then refuses until the
    refill brings it above zero again."""

    def __init__(self, per_minute: int, *, clock: Any = time.monotonic) -> None:
        self.per_minute = per_minute
        self._clock = clock
        self._level = float(per_minute)
        self._at = clock()

    def level(self) -> float:
        now = self._clock()
        self._level = min(float(self.per_minute), self._level + (now - self._at) * self.per_minute / 60)
        self._at = now
        return self._level

    def wait_s(self, need: float) -> int:
        """Whole seconds until ``need`` tokens are available (0: now)."""
        missing = need - self.level()
        return 0 if missing <= 0 else max(1, math.ceil(missing * 60 / self.per_minute))

    def take(self, amount: float) -> None:
        self.level()
        self._level -= amount


@dataclass
class TenantState:
    """A key's use right now: its places in models, its waiters, its token buckets."""

    inflight: int = 0
    places: int | None = None  # max_inflight of the current settings
    waiters: deque[asyncio.Future[None]] = field(default_factory=deque)
    requests: Allowance | None = None
    output_tokens: Allowance | None = None
    recent_s: deque[float] = field(default_factory=lambda: deque(maxlen=32))

    def configure(self, settings: ApiKeySettings) -> None:
        """Take (reloaded) limits; a bucket whose rate did not change keeps its level."""
        self.places = settings.max_inflight
        for attr, rate in (("requests", settings.requests_per_minute),
                           ("output_tokens", settings.output_tokens_per_minute)):
            current = getattr(self, attr)
            if rate is None:
                setattr(self, attr, None)
            elif current is None or current.per_minute != rate:
                setattr(self, attr, Allowance(rate))

    def retry_after_s(self, ahead: int, places: int) -> int:
        mean = sum(self.recent_s) / len(self.recent_s) if self.recent_s else 1.0
        return max(1, min(3600, math.ceil(mean * (ahead + 1) / max(1, places))))

    def leave(self) -> None:
        """Give a place back and hand free places to the waiters, oldest first."""
        self.inflight -= 1
        while self.waiters and (self.places is None or self.inflight < self.places):
            waiter = self.waiters.popleft()
            if not waiter.done():
                self.inflight += 1
                waiter.set_result(None)


@dataclass(eq=False)
class Tenant:
    """A named key: its settings and the shared :class:`Tenants` it reports to."""

    settings: ApiKeySettings
    state: TenantState
    tenants: Tenants

    @property
    def name(self) -> str:
        return self.settings.name


class KeyRing:
    """The keys of one settings version, resolved (SettingsError naming an unset
    variable, or two entries with one key value, never a value)."""

    def __init__(self, service: ServiceSettings, tenants: Tenants) -> None:
        self.admin_key = service.resolved_admin_key()
        entries: list[tuple[bytes, Tenant | None]] = []
        owners: dict[str, str] = {}
        for item in service.api_keys:
            value = item if isinstance(item, str) else item.resolved_key()
            owner = "a plain key" if isinstance(item, str) else f"'{item.name}'"
            if isinstance(item, ApiKeySettings) and value in owners:
                raise SettingsError(f"service.api_keys: {owner} has the same key as {owners[value]}")
            owners.setdefault(value, owner)
            entries.append((_raw(value), tenants.tenant(item) if isinstance(item, ApiKeySettings) else None))
        entries += [(_raw(value), None) for value in service.resolved_api_keys() - set(owners)]
        self.entries = tuple(entries)
        self.tenants = tuple(t for _, t in entries if t is not None)

    def find(self, token: str | None) -> tuple[bool, Tenant | None]:
        """(whether ``token`` is an inference key, its tenant), comparing with every key
        without an early exit."""
        if not token:
            return False, None
        given = _raw(token)
        found, tenant = False, None
        for value, owner in self.entries:
            if hmac.compare_digest(given, value):
                found, tenant = True, owner
        return found, tenant

    def is_admin_key(self, token: str | None) -> bool:
        return self.admin_key is not None and key_matches(token, (self.admin_key,))


def _raw(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


class Tenants:
    """The app's tenants: the current :class:`KeyRing`, each name's state, usage and
    the remote spend store (opened at build when a key has a ``remote_budget``, else
    on the first priced charge)."""

    def __init__(self, service: ServiceSettings, *, state_dir: str, usage: UsageBook) -> None:
        self.state_dir = state_dir
        self.usage = usage
        self._states: dict[str, TenantState] = {}
        self._store: SpendStore | None = None
        self.install(self.prepare(service))

    def tenant(self, settings: ApiKeySettings) -> Tenant:
        state = self._states.setdefault(settings.name, TenantState())
        return Tenant(settings=settings, state=state, tenants=self)

    def prepare(self, service: ServiceSettings) -> KeyRing:
        """The keys of (reloaded) settings, resolved but not yet in use: SettingsError
        for an unset key variable, a shared key value or a store that cannot open."""
        ring = KeyRing(service, self)
        if any(t.settings.remote_budget is not None for t in ring.tenants):
            self.store()
        return ring

    def install(self, ring: KeyRing) -> None:
        """Use ``ring`` from the next request on; its keys' limits apply at once."""
        for tenant in ring.tenants:
            tenant.state.configure(tenant.settings)
        self.usage.touch(t.name for t in ring.tenants)
        self.ring = ring

    def store(self) -> SpendStore:
        if self._store is None:
            self._store = SpendStore(self.state_dir)
        return self._store

    def add_spend(self, name: str, cost: float) -> None:
        """Add to this month's spend; a store that fails is logged (the request is over:
        its answer stands), and a budget check that cannot read the store fails closed."""
        try:
            self.store().add(name, month_of(), cost)
        except (SettingsError, sqlite3.Error) as exc:
            log.error("usage_store_error", key_name=name, error=str(exc))

    def close(self) -> None:
        if self._store is not None:
            self._store.close()

    def report(self) -> dict[str, Any]:
        """``GET /v1/admin/usage``: every configured key's usage since start, and this
        month's remote spend of those with a budget."""
        month = month_of()
        keys: dict[str, Any] = {}
        for name in sorted({*self.usage.keys, *(t.name for t in self.ring.tenants)}):
            entry = self.usage.keys[name].to_json()
            configured = next((t for t in self.ring.tenants if t.name == name), None)
            budget = configured.settings.remote_budget if configured else None
            if budget is not None:
                spent = self.store().spent(name, month)
                entry["remote_budget"] = {"month": month, "budget": budget, "spent": round(spent, 6),
                                          "remaining": round(max(0.0, budget - spent), 6)}
            entry["configured"] = configured is not None
            keys[name] = entry
        return {"since": self.usage.started_at.isoformat(), "keys": keys}


class Admission:
    """One request under its key's rules (see the module docstring). Without a named
    key it only passes the client's ``fairness_key`` on."""

    def __init__(self, tenant: Tenant | None, pool: Pool, body: ResponseRequest) -> None:
        self.tenant = tenant
        self.pool = pool
        self.body = body
        self.entered = False
        self.wait_s = 0.0
        self._finished = False
        if tenant is None:
            self.fairness_key, self.fairness_group, self.fairness_weight = body.fairness_key, None, None
        else:
            bucket = tenant.settings.bucket
            self.fairness_key = f"{bucket}:{body.fairness_key}" if body.fairness_key else bucket
            self.fairness_group, self.fairness_weight = bucket, tenant.settings.weight

    @property
    def key_name(self) -> str | None:
        return self.tenant.name if self.tenant else None

    async def enter(self) -> None:
        """Check the key's rules and take one of its places (waiting for one when
        ``max_queued`` allows). Raises ApiError; nothing is taken on a refusal."""
        if self.tenant is None:
            return
        settings, state, model = self.tenant.settings, self.tenant.state, self.body.model
        if not settings.allows_model(model):
            raise ApiError(403, "model_not_allowed", f"this API key may not use model '{model}'", model=model)
        entry = self.pool.entries.get(model)
        remote = entry is not None and entry.spec is not None and entry.spec.remote
        if remote and not settings.allow_remote:
            raise ApiError(403, "remote_execution_disallowed", "remote execution is not allowed for this API key",
                           model=model)
        if remote and settings.remote_budget is not None and model_prices(entry) is not None:
            spent = self.tenant.tenants.store().spent(settings.name, month_of())
            if spent >= settings.remote_budget:
                raise ApiError(429, "tenant_budget_exhausted", "this API key's remote budget for the month is spent",
                               model=model, headers={"Retry-After": str(seconds_to_next_month())})
        for allowance, need, what in ((state.requests, 1, "requests"), (state.output_tokens, 1e-9, "output tokens")):
            wait = allowance.wait_s(need) if allowance is not None else 0
            if wait:
                raise ApiError(429, "tenant_rate_limited", f"this API key's {what} per minute are used up; retry later",
                               model=model, headers={"Retry-After": str(wait)})
        places = settings.max_inflight
        waits = places is not None and (state.inflight >= places or bool(state.waiters))
        if waits and len(state.waiters) >= settings.max_queued:
            assert places is not None
            raise ApiError(429, "tenant_concurrency_limited",
                           f"this API key has {state.inflight} requests in progress (limit {places}); retry later",
                           model=model,
                           headers={"Retry-After": str(state.retry_after_s(len(state.waiters), places))})
        if state.requests is not None:
            state.requests.take(1)
        if waits:
            await self._wait_for_place(entry.current.queue_timeout_s if entry else None)
        else:
            state.inflight += 1
        self.entered = True

    async def _wait_for_place(self, model_timeout: float | None) -> None:
        assert self.tenant is not None
        state = self.tenant.state
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        state.waiters.append(waiter)
        timeout = self.body.queue_timeout_s or model_timeout
        started = time.perf_counter()
        try:
            await asyncio.wait_for(asyncio.shield(waiter), timeout)
        except (asyncio.CancelledError, TimeoutError) as exc:
            if waiter.done() and not waiter.cancelled():
                state.leave()  # granted in the same instant: give it back
            else:
                waiter.cancel()
                if waiter in state.waiters:
                    state.waiters.remove(waiter)
            if isinstance(exc, TimeoutError):
                raise ApiError(503, "queue_timeout", f"request waited longer than {timeout:g}s for a place of its "
                               "API key", model=self.body.model,
                               headers={"Retry-After": str(state.retry_after_s(len(state.waiters), 1))}) from None
            raise
        finally:
            self.wait_s = time.perf_counter() - started

    def finish(self, outcome: str, *, metrics: dict[str, Any] | None, lease: Lease | None) -> None:
        """The request ended with ``outcome``: free its place, charge what it used
        (``metrics``: the result's, when it completed). Once; a no-op without a key."""
        if self.tenant is None or self._finished:
            return
        self._finished = True
        tenant, state = self.tenant, self.tenant.state
        run_s = time.perf_counter() - lease.started_at if lease is not None else 0.0
        if self.entered:
            state.leave()
            if lease is not None:
                state.recent_s.append(run_s)
        prompt = int((metrics or {}).get("engine_prompt_tokens") or 0)
        output = int((metrics or {}).get("engine_output_tokens") or 0)
        if state.output_tokens is not None and output:
            state.output_tokens.take(output)
        cost = 0.0
        prices = model_prices(self.pool.entries.get(self.body.model))
        if prices is not None and (prompt or output):
            cost = (prompt * prices[0] + output * prices[1]) / 1e6
            if cost > 0:
                tenant.tenants.add_spend(tenant.name, cost)
        queue_s = self.wait_s + (lease.queue_wait_ms / 1000 if lease is not None else 0.0)
        tenant.tenants.usage.record(tenant.name, Charge(outcome=outcome, prompt_tokens=prompt, output_tokens=output,
                                                        queue_seconds=queue_s, run_seconds=run_s, remote_cost=cost))
