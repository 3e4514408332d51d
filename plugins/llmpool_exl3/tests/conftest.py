"""Fixtures for the exllamav3 plugin tests: the FAKE exllamav3 module (see
``fake_exllamav3.py``) injected as ``exllamav3``, with the CUDA check patched, and a
model directory shaped like an EXL3 model (config.json + a safetensors file)."""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import llmpool_exl3
import pytest


def _load_fake() -> ModuleType:
    name = "fake_exllamav3"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("fake_exllamav3.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def make_model_dir(root: Path) -> Path:
    """config.json of a small Gemma-3-like text model and 3 MiB of 'weights'."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps({
        "architectures": ["Gemma3ForCausalLM"], "num_hidden_layers": 18, "num_attention_heads": 4,
        "num_key_value_heads": 1, "head_dim": 256, "hidden_size": 640, "bos_token_id": 0, "eos_token_id": 1}))
    (root / "model.safetensors").write_bytes(b"\0" * (3 * 2**20))
    return root


@pytest.fixture(scope="session")
def fake_exl3_module() -> ModuleType:
    return _load_fake()


@pytest.fixture(scope="class")
def fake_exl3_class(fake_exl3_module: ModuleType) -> Iterator[ModuleType]:
    """The fake installed as ``exllamav3`` and CUDA reported available, for a test class."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "exllamav3", fake_exl3_module)
        mp.setattr(llmpool_exl3, "cuda_available", lambda: True)
        fake_exl3_module.reset()
        yield fake_exl3_module
        fake_exl3_module.reset()


@pytest.fixture
def fake_exl3(fake_exl3_module: ModuleType, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """The same, for one test."""
    monkeypatch.setitem(sys.modules, "exllamav3", fake_exl3_module)
    monkeypatch.setattr(llmpool_exl3, "cuda_available", lambda: True)
    fake_exl3_module.reset()
    yield fake_exl3_module
    fake_exl3_module.reset()


@pytest.fixture(scope="session")
def exl3_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("exl3") / "fake-exl3-model")
