"""``llmpoold``: read the settings, load the plugins, serve.

Exit status: 0 after a clean shutdown (SIGTERM/SIGINT), 2 for an invalid settings
file or command line (the message names the file, field and value, never the value of a
secret or unknown key; no traceback): among them a ``*_env`` key variable that is unset
or empty, and a non-loopback bind with no key (unless ``service.allow_unauthenticated``).
One model never stops the daemon (:mod:`llmpoold.model_settings`): it is skipped or
``failed``, and a key nobody knows is a warning. ``--check`` prints the warnings and the
models that will be ``failed``; with ``--strict`` it exits 1 when there are any.
"""

from __future__ import annotations

import argparse
import sys

from aiohttp import web

from llmpoold import __version__
from llmpoold.config import SettingsError, load_settings, settings_paths, with_service_overrides


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="llmpoold", description="Serve local and remote LLMs behind one HTTP API.")
    parser.add_argument("--settings", help="settings.json (default: $LLM_POOL_SETTINGS_PATH or "
                                           "/etc/llmpool/settings.json)")
    parser.add_argument("--local", help="local.json merged over the settings (default: $LLM_POOL_LOCAL_SETTINGS_PATH "
                                        "or local.json beside the settings file)")
    parser.add_argument("--host", help="bind address (default: service.host, 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default: service.port, 8010)")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                        help="log level (default: service.log_level)")
    parser.add_argument("--check", action="store_true", help="validate the settings and plugins, then exit")
    parser.add_argument("--strict", action="store_true",
                        help="with --check: exit 1 on any warning (unknown key, skipped or failed model)")
    parser.add_argument("--version", action="version", version=f"llmpoold {__version__}")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        file_settings = load_settings(args.settings, args.local)
    except SettingsError as exc:
        print(f"llmpoold: invalid settings: {exc}", file=sys.stderr)
        return 2
    settings = file_settings
    service_updates = {k: v for k, v in {"host": args.host, "port": args.port, "log_level": args.log_level}.items()
                       if v is not None}
    try:
        settings = with_service_overrides(settings, **service_updates)
    except SettingsError as exc:
        print(f"llmpoold: invalid settings: command line: {exc}", file=sys.stderr)
        return 2

    from llmpoold.http.app import create_app
    from llmpoold.http.keys import POOL, RELOAD
    from llmpoold.logs import configure_logging
    from llmpoold.plugins import PluginRegistry

    configure_logging(settings.service.log_level)
    registry = PluginRegistry()
    registry.load_entry_points()
    try:
        app = create_app(settings, registry, settings_paths=(args.settings, args.local))
    except SettingsError as exc:  # defensive: one model's keys only fail that model (llmpoold.model_settings)
        source = settings_paths(args.settings, args.local)[0]
        print(f"llmpoold: invalid settings: {source}: {exc}", file=sys.stderr)
        return 2
    # A reload compares the service block with the files, not with --host/--port.
    app[RELOAD].service = file_settings.service
    if args.check:
        catalog = app[POOL].catalog
        problems = [f"warning: {w}" for w in catalog.warnings]
        problems += [f"failed: model {name!r}: {item.error}" for name, item in catalog.models.items()
                     if item.error is not None]
        for line in problems:
            print(f"llmpoold: {line}")
        print(f"llmpoold: settings OK; backends: {registry.describe_installed()}"
              + (f"; {len(problems)} warning(s)" if problems else ""))
        return 1 if args.strict and problems else 0
    import structlog

    structlog.get_logger("llmpoold").info(
        "starting", version=__version__, host=settings.service.host, port=settings.service.port,
        backends=sorted(registry.backends), models=sorted(settings.engine.models))
    web.run_app(app, host=settings.service.host, port=settings.service.port, print=None,
                shutdown_timeout=settings.service.shutdown_timeout_s, handler_cancellation=True,
                access_log=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
