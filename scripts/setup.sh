#!/usr/bin/env bash
# Create .venv if missing and install snapstore with its test tools into it.
# Fast when already set up: reinstalls only when pyproject.toml or setup.cfg
# changed since the last install.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV="${SNAPSTORE_VENV:-.venv}"

if [ ! -x "$VENV/bin/python" ]; then
    echo "setup: creating $VENV" >&2
    "$PYTHON" -m venv "$VENV"
fi

stamp="$VENV/.snapstore-installed"
want="$(cat pyproject.toml setup.cfg | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
    echo "setup: installing into $VENV (torch CPU build first, then the project)" >&2
    # torch first and pinned: the project's torch==2.13.0 is then already
    # satisfied, so pip never reaches for a multi-GB CUDA build.
    "$VENV/bin/python" -m pip install --quiet torch==2.13.0
    "$VENV/bin/python" -m pip install --quiet -e '.[test]'
    echo "$want" > "$stamp"
fi
