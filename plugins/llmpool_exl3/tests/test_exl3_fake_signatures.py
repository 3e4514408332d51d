"""The FAKE exllamav3 must keep the real signatures: compare them with the installed
exllamav3's source, read with ``ast`` (importing exllamav3 would build its CUDA
extension). Skipped where exllamav3 is not installed."""

from __future__ import annotations

import ast
import importlib.util
import inspect
from pathlib import Path
from types import ModuleType

import pytest

# (file under exllamav3/, class, method in the real source, method in the fake)
CALLED = [
    ("model/config.py", "Config", "from_directory", "from_directory"),
    ("model/model.py", "Model", "from_config", "from_config"),
    ("model/model.py", "Model", "load_gen", "load"),  # Model.load(*args, **kwargs) calls load_gen
    ("model/model.py", "Model", "unload", "unload"),
    ("cache/cache.py", "Cache", "__init__", "__init__"),
    ("cache/cache.py", "Cache", "detach_from_model", "detach_from_model"),
    ("cache/quant.py", "CacheLayer_quant", "__init__", "__init__"),
    ("tokenizer/tokenizer.py", "Tokenizer", "from_config", "from_config"),
    ("tokenizer/tokenizer.py", "Tokenizer", "encode", "encode"),
    ("tokenizer/tokenizer.py", "Tokenizer", "decode", "decode"),
    ("tokenizer/tokenizer.py", "Tokenizer", "hf_render_chat_template", "hf_render_chat_template"),
    ("tokenizer/tokenizer.py", "Tokenizer", "single_id", "single_id"),
    ("generator/generator.py", "Generator", "__init__", "__init__"),
    ("generator/generator.py", "Generator", "enqueue", "enqueue"),
    ("generator/generator.py", "Generator", "cancel", "cancel"),
    ("generator/generator.py", "Generator", "iterate", "iterate"),
    ("generator/generator.py", "Generator", "num_remaining_jobs", "num_remaining_jobs"),
    ("generator/generator.py", "Generator", "clear_queue", "clear_queue"),
    ("generator/generator.py", "Generator", "close", "close"),
    ("generator/job.py", "Job", "__init__", "__init__"),
    ("generator/sampler/presets.py", "ComboSampler", "__init__", "__init__"),
]


def _source_root() -> Path:
    spec = importlib.util.find_spec("exllamav3")
    if spec is None or spec.origin is None:
        pytest.skip("exllamav3 is not installed")
    return Path(spec.origin).parent


def _real_params(path: Path, cls: str, method: str) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == cls:
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == method:
                    args = item.args
                    names = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs]
                    return [n for n in names if n not in ("self", "cls")]
    raise AssertionError(f"{cls}.{method} not found in {path}")


@pytest.mark.parametrize(("file", "cls", "real", "fake"), CALLED, ids=[f"{c}.{m}" for _, c, m, _ in CALLED])
def test_fake_parameters_are_the_real_ones(fake_exl3_module: ModuleType, file: str, cls: str, real: str,
                                           fake: str) -> None:
    real_names = _real_params(_source_root() / file, cls, real)
    fake_fn = getattr(getattr(fake_exl3_module, cls), fake)
    fake_names = [name for name, p in inspect.signature(fake_fn).parameters.items()
                  if name not in ("self", "cls") and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    # every parameter of the fake exists in the real call, in the same order
    assert [n for n in real_names if n in fake_names] == fake_names, (real_names, fake_names)


def test_the_plugin_only_passes_real_keywords(fake_exl3_module: ModuleType) -> None:
    """The keywords llmpool_exl3 passes, by call, are parameters of the real functions."""
    root = _source_root()
    passed = {
        ("cache/cache.py", "Cache", "__init__"): {"max_num_tokens", "layer_type"},
        ("cache/quant.py", "CacheLayer_quant", "__init__"): {"k_bits", "v_bits"},
        ("model/model.py", "Model", "load_gen"): {"progressbar", "tensor_p", "tp_backend", "use_per_device", "device",
                                                     "max_chunk_size"},
        ("tokenizer/tokenizer.py", "Tokenizer", "encode"): {"add_bos", "encode_special_tokens"},
        ("tokenizer/tokenizer.py", "Tokenizer", "decode"): {"decode_special_tokens"},
        ("tokenizer/tokenizer.py", "Tokenizer", "hf_render_chat_template"): {"add_generation_prompt"},
        ("generator/generator.py", "Generator", "__init__"): {"model", "cache", "tokenizer", "max_batch_size",
                                                               "max_chunk_size", "max_q_size"},
        ("generator/job.py", "Job", "__init__"): {"input_ids", "max_new_tokens", "sampler", "stop_conditions",
                                                  "identifier", "max_rq_tokens"},
        ("generator/sampler/presets.py", "ComboSampler", "__init__"): {"rep_p", "top_k", "top_p", "temperature",
                                                                        "min_p"},
    }
    for (file, cls, method), keywords in passed.items():
        missing = keywords - set(_real_params(root / file, cls, method))
        assert not missing, f"{cls}.{method} has no parameter(s) {sorted(missing)}"
