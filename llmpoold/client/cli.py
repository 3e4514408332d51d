"""``llmpool``: the operator's command line for a running ``llmpoold``.

Talks HTTP to ``--url`` (default ``$LLMPOOL_URL`` or http://127.0.0.1:8010) with the keys
in ``$LLMPOOL_API_KEY`` (inference) and ``$LLMPOOL_ADMIN_KEY`` (admin). Exit status: 0
success; 1 the daemon answered an error (its status, code and message are printed) or a
load ended ``failed``; 2 bad command line; 3 no daemon answers at the URL (one line).
Needs ``rich`` (``pip install 'llmpoold[cli]'``).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from llmpoold.client.api import Client, DaemonError, NotRunning

EXIT_ERROR, EXIT_USAGE, EXIT_NOT_RUNNING = 1, 2, 3


def _value(text: str) -> Any:
    """A ``--set`` value: JSON when it parses (numbers, true, null), else the string."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _setting(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got '{text}'")
    return key.strip(), _value(value)


def _decoding_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--system", help="instructions (system prompt)")
    parser.add_argument("--max-tokens", type=int, help="decoding.max_tokens")
    parser.add_argument("--temperature", type=float, help="decoding.temperature (0: greedy)")
    parser.add_argument("--top-k", type=int, help="decoding.top_k")
    parser.add_argument("--top-p", type=float, help="decoding.top_p")
    parser.add_argument("--stop", action="append", help="stop string (repeatable)")
    parser.add_argument("--fairness-key", help="the fairness key to queue under")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmpool", description=__doc__.split("\n\n")[0].strip(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Exit status: 0 ok, 1 daemon error or failed load, 2 usage, 3 no daemon.")
    parser.add_argument("--url", help="daemon URL (default: $LLMPOOL_URL or http://127.0.0.1:8010)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for an answer (default 600)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("ps", help="models: state, replicas, memory, queue, running, tokens/s")
    p.add_argument("--json", action="store_true", help="print the admin API's model entries")
    p.add_argument("--sample", type=float, default=0.5, help="seconds over which tokens/s is measured (default 0.5)")

    p = sub.add_parser("load", help="load a model and show progress until loaded or failed")
    p.add_argument("name")
    p.add_argument("--set", dest="settings", action="append", type=_setting, default=[], metavar="KEY=VALUE",
                   help="load override, e.g. --set gguf_n_ctx=4096 --set replicas=2 (repeatable)")

    p = sub.add_parser("unload", help="unload a model (running requests finish)")
    p.add_argument("name")

    p = sub.add_parser("run", help="generate from a prompt (streams; reads stdin without PROMPT)")
    p.add_argument("name")
    p.add_argument("prompt", nargs="?")
    p.add_argument("--json", action="store_true", help="no streaming: print the response object with its metrics")
    _decoding_options(p)

    p = sub.add_parser("chat", help="interactive multi-turn chat (/reset, /exit)")
    p.add_argument("name")
    _decoding_options(p)

    p = sub.add_parser("top", help="live queues, running requests, tokens/s and memory per model and key")
    p.add_argument("--interval", type=float, default=1.0, help="refresh interval in seconds (default 1)")
    p.add_argument("--once", action="store_true", help="render one frame and exit (for scripts and tests)")

    sub.add_parser("reload", help="re-read settings.json and local.json in the daemon")

    p = sub.add_parser("usage", help="each named API key's requests, tokens, time and remote spend since start")
    p.add_argument("--json", action="store_true", help="print the admin API's usage object")

    p = sub.add_parser("check", help="validate a settings file and the installed plugins (llmpoold --check)")
    p.add_argument("settings", nargs="?", help="settings.json (default: as llmpoold finds it)")
    p.add_argument("--local", help="local.json merged over it")
    return parser


def _console(stderr: bool = False) -> Any:
    try:
        from rich.console import Console
    except ModuleNotFoundError:
        print("llmpool: needs the 'rich' package: pip install 'llmpoold[cli]'", file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None
    return Console(stderr=stderr, highlight=False, soft_wrap=False)


# ----- commands ---------------------------------------------------------------------------


def cmd_ps(client: Client, args: argparse.Namespace) -> int:
    from llmpoold.client.views import models_table, parse_metrics, rates

    before = parse_metrics(client.text("/metrics"))
    models = client.admin_models()
    if args.json:
        print(json.dumps(models, indent=2))
        return 0
    time.sleep(max(0.0, args.sample - (time.monotonic() - before.at)))
    tps = rates(before, parse_metrics(client.text("/metrics")))
    _console().print(models_table(models, tps))
    return 0


def cmd_load(client: Client, args: argparse.Namespace) -> int:
    fields = dict(args.settings)
    out, err = _console(), _console(stderr=True)
    result: dict[str, Any] = {}

    def call() -> None:
        try:
            result["entry"] = client.load(args.name, fields)
        except (DaemonError, NotRunning) as exc:
            result["error"] = exc

    started = time.monotonic()
    worker = threading.Thread(target=call, daemon=True)
    worker.start()
    with err.status(f"loading {args.name}…", spinner="dots") as status:
        while worker.is_alive():
            worker.join(0.5)
            try:
                state = client.admin_model(args.name)["runtime_state"]
            except (DaemonError, NotRunning):
                state = "?"
            status.update(f"loading {args.name}: {state}, {time.monotonic() - started:.0f}s")
    if "error" in result:
        raise result["error"]
    entry = result["entry"]
    elapsed = time.monotonic() - started
    if entry["runtime_state"] != "loaded":
        err.print(f"llmpool: {args.name} is {entry['runtime_state']}: {entry.get('last_error') or 'no reason given'}",
                  markup=False)
        return EXIT_ERROR
    memory = entry.get("vram_estimate_mib")
    out.print(f"[green]{args.name} loaded[/] in {elapsed:.1f}s: {entry['loaded_replicas']} replica(s)"
              + (f", ~{memory} MiB" if memory else ""))
    return 0


def cmd_unload(client: Client, args: argparse.Namespace) -> int:
    entry = client.unload(args.name)
    _console().print(f"{args.name} {entry['runtime_state']}")
    return 0


def _body(args: argparse.Namespace, conversation: dict[str, Any]) -> dict[str, Any]:
    decoding = {key: value for key, value in (("max_tokens", args.max_tokens), ("temperature", args.temperature),
                                              ("top_k", args.top_k), ("top_p", args.top_p), ("stop", args.stop))
                if value is not None}
    body: dict[str, Any] = {"model": args.name, **conversation, "decoding": decoding}
    if args.system:
        body["instructions"] = args.system
    if args.fairness_key:
        body["fairness_key"] = args.fairness_key
    return body


def _stream(client: Client, body: dict[str, Any], write: Callable[[str], None]) -> tuple[str, dict[str, Any]]:
    """Stream one request, writing output text as it comes; returns (text, metrics)."""
    text, metrics = "", {}
    err = _console(stderr=True)
    for event in client.stream("/v1/responses", body):
        if event.event == "response.output_text.delta":
            text += event.data["delta"]
            write(event.data["delta"])
        elif event.event == "response.reasoning_text.delta":
            err.print(event.data["delta"], style="dim italic", end="", markup=False)
        elif event.event == "response.metrics":
            metrics = event.data["metrics"]
        elif event.event == "error":
            error = event.data["error"]
            raise DaemonError(event.data.get("status", 500), error.get("code", "error"), error.get("message", ""))
    return text, metrics


def _metrics_line(metrics: dict[str, Any]) -> str:
    return (f"{metrics.get('engine_output_tokens')} tokens, {metrics.get('engine_tokens_per_second') or 0:.1f} tok/s, "
            f"first token {metrics.get('gpu_time_to_first_token_ms') or 0:.0f} ms, "
            f"total {metrics.get('pool_total_wall_ms') or 0:.0f} ms, finish {metrics.get('engine_finish_reason')}")


def cmd_run(client: Client, args: argparse.Namespace) -> int:
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    body = _body(args, {"input": prompt})
    if args.json:
        print(json.dumps(client.json("POST", "/v1/responses", body), indent=2, ensure_ascii=False))
        return 0

    def write(delta: str) -> None:
        sys.stdout.write(delta)
        sys.stdout.flush()

    _, metrics = _stream(client, body, write)
    sys.stdout.write("\n")
    if sys.stderr.isatty():
        _console(stderr=True).print(_metrics_line(metrics), style="dim", markup=False)
    return 0


def cmd_chat(client: Client, args: argparse.Namespace) -> int:
    console = _console()
    console.print(f"[bold]{args.name}[/]: chat; /reset starts over, /exit or Ctrl-D quits")
    messages: list[dict[str, str]] = []
    while True:
        try:
            line = console.input("[bold cyan]you>[/] ")
        except (EOFError, KeyboardInterrupt):
            console.print()
            return 0
        if line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/reset":
            messages = []
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        console.print("[bold green]model>[/] ", end="")
        try:
            text, metrics = _stream(client, _body(args, {"messages": messages}),
                                    lambda d: console.print(d, end="", markup=False, highlight=False))
        except DaemonError:
            messages.pop()
            raise
        except KeyboardInterrupt:
            messages.pop()
            console.print("\n[dim](interrupted)[/]")
            continue
        console.print()
        console.print(_metrics_line(metrics), style="dim", markup=False)
        messages.append({"role": "assistant", "content": text})


def cmd_top(client: Client, args: argparse.Namespace) -> int:
    from rich.live import Live

    from llmpoold.client.views import parse_metrics, rates, top_view

    def gpus() -> list[dict[str, Any]]:
        return list(client.json("GET", "/v1/admin/gpu-memory", admin=True).get("gpus") or [])

    console = _console()
    before = parse_metrics(client.text("/metrics"))
    if args.once:
        time.sleep(min(args.interval, 0.5))
        models, sample = client.admin_models(), parse_metrics(client.text("/metrics"))
        console.print(top_view(client.url, models, rates(before, sample), gpus()))
        return 0
    gpu_list = gpus()
    with Live(console=console, refresh_per_second=4, screen=False) as live:
        try:
            while True:
                time.sleep(args.interval)
                models, sample = client.admin_models(), parse_metrics(client.text("/metrics"))
                live.update(top_view(client.url, models, rates(before, sample), gpu_list))
                before = sample
        except KeyboardInterrupt:
            return 0


def cmd_reload(client: Client, args: argparse.Namespace) -> int:
    result = client.reload()
    console = _console()
    for key in ("added_models", "removed_models", "updated_models"):
        console.print(f"{key.replace('_', ' ')}: {', '.join(result.get(key) or []) or '-'}")
    for key, value in result.items():
        if key not in ("added_models", "removed_models", "updated_models"):
            console.print(f"{key.replace('_', ' ')}: {value}", markup=False)
    return 0


def cmd_usage(client: Client, args: argparse.Namespace) -> int:
    usage = client.json("GET", "/v1/admin/usage", admin=True)
    if args.json:
        print(json.dumps(usage, indent=2))
        return 0
    from llmpoold.client.views import usage_table

    console = _console()
    if not usage.get("keys"):
        console.print("no named API keys (service.api_keys objects)")
        return 0
    console.print(usage_table(usage))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from llmpoold import cli as daemon_cli

    argv = ["--check"] + (["--settings", args.settings] if args.settings else []) + (
        ["--local", args.local] if args.local else [])
    return daemon_cli.main(argv)


COMMANDS: dict[str, Callable[[Client, argparse.Namespace], int]] = {
    "ps": cmd_ps, "load": cmd_load, "unload": cmd_unload, "run": cmd_run, "chat": cmd_chat, "top": cmd_top,
    "reload": cmd_reload, "usage": cmd_usage,
}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "run" and args.prompt is None and len(extra) == 1 and not extra[0].startswith("-"):
        # `llmpool run NAME --json PROMPT`: argparse settles the optional PROMPT before it
        # sees the option, and would call the prompt an unrecognized argument.
        args.prompt, extra = extra[0], []
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "check":
        return cmd_check(args)
    client = Client(args.url, timeout=args.timeout)
    try:
        return COMMANDS[args.command](client, args)
    except NotRunning as exc:
        print(f"llmpool: {exc}", file=sys.stderr)
        return EXIT_NOT_RUNNING
    except DaemonError as exc:
        hint = " (set LLMPOOL_ADMIN_KEY / LLMPOOL_API_KEY)" if exc.status == 401 else ""
        print(f"llmpool: {exc}{hint}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `llmpool run ... | head`
        return 0


if __name__ == "__main__":
    sys.exit(main())
