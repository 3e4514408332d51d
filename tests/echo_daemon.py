"""Run the real ``llmpoold`` CLI with the echo test backend registered as well.

Used by tests that need a daemon process (signals, shutdown) without a real runtime:
``python tests/echo_daemon.py --settings s.json --port N``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import echo_backend  # noqa: E402

from llmpoold import cli  # noqa: E402
from llmpoold.plugins import PluginRegistry  # noqa: E402

_load_entry_points = PluginRegistry.load_entry_points


def _with_echo(self: PluginRegistry, **kwargs: object) -> None:
    _load_entry_points(self, **kwargs)  # type: ignore[arg-type]
    self.register(echo_backend, name="echo", distribution="tests", version="0")


PluginRegistry.load_entry_points = _with_echo  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.exit(cli.main())
