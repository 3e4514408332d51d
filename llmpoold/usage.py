"""What each named API key used (:class:`UsageBook`) and its remote spend per calendar
month (:class:`SpendStore`, SQLite under ``engine.state_dir``).

Usage is counted since start, per key name: requests by outcome, prompt and output
tokens, seconds waiting in queues and running, and the cost of priced remote models
(a remote model's ``remote_price_per_million_input`` / ``_output`` options, read by
:func:`model_prices`). The same figures are Prometheus counters labelled with the
configured key names only (never a key, never anything a client sent):

====================================================== =============================
``llmpool_key_requests_total{key,outcome}``            ``ok``, ``error``,
                                                       ``rejected``, ``cancelled``
``llmpool_key_prompt_tokens_total{key}``               as the runtimes reported
``llmpool_key_output_tokens_total{key}``
``llmpool_key_queue_seconds_total{key}``               enqueue → slot (and the key's
                                                       own wait for a place)
``llmpool_key_run_seconds_total{key}``                 slot → end
``llmpool_key_remote_cost_total{key}``                 priced remote models
====================================================== =============================

The month's spend is written through to SQLite on every charge (one small UPSERT on the
event loop), so a budget survives a restart; it is one table that could move to a
shared database. A charge happens when a request ends with the tokens its runtime
reported; requests already running when a budget runs out may overshoot it.
"""

from __future__ import annotations

import datetime as dt
import math
import sqlite3
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter

from llmpoold.entries import ModelEntry
from llmpoold.errors import SettingsError

OUTCOMES = ("ok", "error", "rejected", "cancelled")
SPEND_FILE = "usage.sqlite3"


def month_of(now: dt.datetime | None = None) -> str:
    """The calendar month (UTC) a charge counts in, ``YYYY-MM``."""
    return (now or dt.datetime.now(dt.UTC)).strftime("%Y-%m")


def seconds_to_next_month(now: dt.datetime | None = None) -> int:
    now = now or dt.datetime.now(dt.UTC)
    first = dt.datetime(now.year + (now.month == 12), now.month % 12 + 1, 1, tzinfo=dt.UTC)
    return max(1, math.ceil((first - now).total_seconds()))


def model_prices(entry: ModelEntry | None) -> tuple[float, float] | None:
    """(input, output) price per million tokens of a remote model that sets either,
    else None. Read from the model's options (the remote plugin's
    ``remote_price_per_million_input`` / ``_output``)."""
    if entry is None or entry.spec is None or not entry.spec.remote:
        return None
    options = entry.current.options
    prices = (getattr(options, "remote_price_per_million_input", None),
              getattr(options, "remote_price_per_million_output", None))
    if prices == (None, None):
        return None
    return float(prices[0] or 0.0), float(prices[1] or 0.0)


class SpendStore:
    """The remote spend of each key name per month, in ``<state_dir>/usage.sqlite3``."""

    def __init__(self, state_dir: str) -> None:
        path = Path(state_dir) / SPEND_FILE
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS remote_spend (key_name TEXT NOT NULL, month TEXT NOT NULL, "
                             "cost REAL NOT NULL, PRIMARY KEY (key_name, month))")
        except (OSError, sqlite3.Error) as exc:
            raise SettingsError(f"engine.state_dir: cannot open the usage store {path}: {exc}") from None
        self.path = path
        self._cache: dict[tuple[str, str], float] = {}

    def spent(self, name: str, month: str) -> float:
        key = (name, month)
        if key not in self._cache:
            row = self._db.execute("SELECT cost FROM remote_spend WHERE key_name = ? AND month = ?", key).fetchone()
            self._cache[key] = float(row[0]) if row else 0.0
        return self._cache[key]

    def add(self, name: str, month: str, cost: float) -> None:
        self._db.execute("INSERT INTO remote_spend (key_name, month, cost) VALUES (?, ?, ?) "
                         "ON CONFLICT (key_name, month) DO UPDATE SET cost = cost + excluded.cost",
                         (name, month, cost))
        self._cache.pop((name, month), None)

    def close(self) -> None:
        self._db.close()


@dataclass
class KeyUsage:
    """One key's totals since start."""

    requests: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))
    prompt_tokens: int = 0
    output_tokens: int = 0
    queue_seconds: float = 0.0
    run_seconds: float = 0.0
    remote_cost: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"requests": dict(self.requests), "prompt_tokens": self.prompt_tokens,
                "output_tokens": self.output_tokens, "queue_seconds": round(self.queue_seconds, 3),
                "run_seconds": round(self.run_seconds, 3), "remote_cost": round(self.remote_cost, 6)}


@dataclass(frozen=True)
class Charge:
    """What one request used, recorded once when it ends."""

    outcome: str
    prompt_tokens: int = 0
    output_tokens: int = 0
    queue_seconds: float = 0.0
    run_seconds: float = 0.0
    remote_cost: float = 0.0


class UsageBook:
    """Usage per key name since start, mirrored as Prometheus counters."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.started_at = dt.datetime.now(dt.UTC)
        self.keys: defaultdict[str, KeyUsage] = defaultdict(KeyUsage)
        self.requests = Counter("llmpool_key_requests", "Requests of each named API key by outcome",
                                ["key", "outcome"], registry=registry)
        self.prompt_tokens = Counter("llmpool_key_prompt_tokens", "Prompt tokens of each named API key", ["key"],
                                     registry=registry)
        self.output_tokens = Counter("llmpool_key_output_tokens", "Output tokens of each named API key", ["key"],
                                     registry=registry)
        self.queue_seconds = Counter("llmpool_key_queue_seconds", "Seconds the key's requests waited", ["key"],
                                     registry=registry)
        self.run_seconds = Counter("llmpool_key_run_seconds", "Seconds the key's requests ran", ["key"],
                                   registry=registry)
        self.remote_cost = Counter("llmpool_key_remote_cost", "Cost of the key's priced remote requests", ["key"],
                                   registry=registry)

    def record(self, name: str, charge: Charge) -> None:
        usage = self.keys[name]
        usage.requests[charge.outcome] = usage.requests.get(charge.outcome, 0) + 1
        usage.prompt_tokens += charge.prompt_tokens
        usage.output_tokens += charge.output_tokens
        usage.queue_seconds += charge.queue_seconds
        usage.run_seconds += charge.run_seconds
        usage.remote_cost += charge.remote_cost
        self.requests.labels(name, charge.outcome).inc()
        for counter, value in ((self.prompt_tokens, charge.prompt_tokens), (self.output_tokens, charge.output_tokens),
                               (self.queue_seconds, charge.queue_seconds), (self.run_seconds, charge.run_seconds),
                               (self.remote_cost, charge.remote_cost)):
            if value > 0:
                counter.labels(name).inc(value)

    def touch(self, names: Iterable[str]) -> None:
        """Start every configured key's series at 0 (a scrape lists every key)."""
        for name in names:
            self.keys[name]  # noqa: B018 - the defaultdict creates it
            for outcome in OUTCOMES:
                self.requests.labels(name, outcome)
            for counter in (self.prompt_tokens, self.output_tokens, self.queue_seconds, self.run_seconds,
                            self.remote_cost):
                counter.labels(name)
