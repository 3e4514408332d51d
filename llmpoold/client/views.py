"""What ``llmpool ps`` and ``llmpool top`` draw, as ``rich`` renderables.

Inputs are the admin API's model entries and two ``/metrics`` samples (tokens/s is the
growth of ``llmpool_output_tokens_total`` between them divided by the time between).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from rich.console import Group
from rich.markup import escape
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

STATE_STYLE = {"loaded": "green", "loading": "yellow", "unloading": "yellow", "failed": "red", "unloaded": "dim"}


@dataclass
class Sample:
    """One ``/metrics`` scrape: per model output tokens so far, and when it was taken."""

    at: float
    tokens: dict[str, float] = field(default_factory=dict)


def parse_metrics(text: str, at: float | None = None) -> Sample:
    sample = Sample(time.monotonic() if at is None else at)
    for family in text_string_to_metric_families(text):
        if family.name == "llmpool_output_tokens":
            for s in family.samples:
                if s.name == "llmpool_output_tokens_total":
                    sample.tokens[s.labels["model"]] = s.value
    return sample


def rates(before: Sample | None, after: Sample) -> dict[str, float]:
    """Output tokens per second per model between two samples (0 without a first one)."""
    if before is None or after.at <= before.at:
        return {}
    span = after.at - before.at
    return {m: max(0.0, n - before.tokens.get(m, 0.0)) / span for m, n in after.tokens.items()}


def mib(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value / 1024:.1f} GiB" if value >= 1024 else f"{value:.0f} MiB"


def state_text(state: str) -> Text:
    return Text(state, style=STATE_STYLE.get(state, ""))


def models_table(models: list[dict[str, Any]], tps: dict[str, float], *, keys: bool = False,
                 gpus: list[dict[str, Any]] | None = None) -> Table:
    """The models with state, replicas, memory, queue, running, tokens/s, last error;
    ``keys`` adds one row per fairness key with work."""
    budget = sum(g.get("total_mib") or 0 for g in gpus or []) or sum(m.get("vram_estimate_mib") or 0 for m in models)
    table = Table(box=None, header_style="bold", pad_edge=False)
    table.add_column("MODEL", no_wrap=True)
    if not keys:
        table.add_column("BACKEND", style="dim", no_wrap=True)
    for name in ("STATE", "REPLICAS", "MEMORY"):
        table.add_column(name, no_wrap=True, justify="left" if name == "STATE" else "right")
    if keys:
        table.add_column("", width=12, no_wrap=True)
    for name in ("QUEUED", "RUNNING", "TOK/S"):
        table.add_column(name, justify="right", no_wrap=True)
    table.add_column("LAST ERROR", style="red", no_wrap=True, overflow="ellipsis", ratio=1, min_width=10)
    for m in models:
        memory = m.get("vram_estimate_mib")
        row: list[Any] = [m["name"]] + ([] if keys else [m.get("resolved_backend") or "-"])
        row += [state_text(m["runtime_state"]), f"{m['loaded_replicas']}/{m['replicas']}", mib(memory)]
        if keys:
            row.append(ProgressBar(total=budget or 1, completed=memory or 0, width=12,
                                   complete_style="green" if m["runtime_state"] == "loaded" else "grey50"))
        row += [str(m["queue_depth"]), str(m["runtime_inflight"]), f"{tps.get(m['name'], 0.0):.1f}",
                escape(m.get("last_error") or "")]
        table.add_row(*row)
        if keys:
            for k in (m.get("fairness") or {}).get("keys", []):
                name = k["fairness_key"] if k["fairness_key"] is not None else "(anonymous)"
                table.add_row(Text(f"  ↳ {name}", style="dim"), "", "", "", "", str(k["pending"]),
                              str(k["active"]), "", "")
    return table


def top_view(url: str, models: list[dict[str, Any]], tps: dict[str, float], gpus: list[dict[str, Any]]) -> Panel:
    """One frame of ``llmpool top``."""
    loaded = sum(1 for m in models if m["runtime_state"] == "loaded")
    queued = sum(m["queue_depth"] for m in models)
    running = sum(m["runtime_inflight"] for m in models)
    memory = sum(m.get("vram_estimate_mib") or 0 for m in models if m["runtime_state"] == "loaded")
    gpu_total = sum(g.get("total_mib") or 0 for g in gpus)
    head = Text.assemble(
        ("models ", "dim"), f"{loaded}/{len(models)} loaded", ("   queued ", "dim"), str(queued),
        ("   running ", "dim"), str(running), ("   tok/s ", "dim"), f"{sum(tps.values()):.1f}",
        ("   memory ", "dim"), mib(memory), ((f" of {mib(gpu_total)} GPU" if gpu_total else " (estimates)"), "dim"))
    return Panel(Group(head, Text(""), models_table(models, tps, keys=True, gpus=gpus)),
                 title=f"llmpool top · {url}", title_align="left", subtitle="Ctrl-C quits", subtitle_align="right")


def usage_table(usage: dict[str, Any]) -> Table:
    """``llmpool usage``: one row per named API key (``GET /v1/admin/usage``)."""
    table = Table(box=None, header_style="bold", pad_edge=False, title=f"since {usage.get('since', '?')}")
    for column in ("key", "ok", "error", "rejected", "cancelled", "prompt tok", "output tok", "queue s", "run s",
                   "remote cost", "budget left"):
        table.add_column(column, justify="left" if column == "key" else "right")
    for name, key in sorted(usage["keys"].items()):
        requests = key.get("requests") or {}
        budget = key.get("remote_budget")
        table.add_row(name, *(str(requests.get(o, 0)) for o in ("ok", "error", "rejected", "cancelled")),
                      str(key["prompt_tokens"]), str(key["output_tokens"]), f"{key['queue_seconds']:.1f}",
                      f"{key['run_seconds']:.1f}", f"{key['remote_cost']:.4g}",
                      f"{budget['remaining']:.4g} of {budget['budget']:.4g}" if budget else "-")
    return table
