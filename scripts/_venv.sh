# Sourced by scripts/demo.sh and scripts/test.sh: create (once) and activate the
# project's virtualenv. VENV overrides its location (default: .venv in the repo).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "llmpool needs Python >= 3.11 ($PYTHON is $("$PYTHON" -V 2>&1))" >&2
    exit 1
fi
if [ ! -x "$VENV/bin/python" ]; then
    echo "==> creating virtualenv $VENV"
    "$PYTHON" -m venv "$VENV" || {
        echo "python3 -m venv failed; on Debian: apt-get install python3-venv" >&2; exit 1; }
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
pip_install() { python -m pip install --disable-pip-version-check -q "$@"; }
