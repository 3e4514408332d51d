"""llmpoold: one HTTP API in front of the LLM runtimes on a host.

Backends are plugins (entry-point group ``llmpool``); see :mod:`llmpoold.hookspecs`.
"""

from llmpoold.hookspecs import hookimpl

__version__ = "0.1.0"
__all__ = ["hookimpl", "__version__"]
