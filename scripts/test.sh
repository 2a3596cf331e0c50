#!/usr/bin/env bash
# The test suite: set up if needed, then lint, format check, type check and
# pytest. Extra arguments go to pytest. `--all` (first argument) adds the slow
# tier (benchmark smoke runs, the failure matrix: about 7 more minutes on 2
# cores), which CI leaves out to stay near 13 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
SELECT=()
if [ "${1:-}" = "--all" ]; then
    shift
    SELECT=(--slow)  # tests/conftest.py leaves the slow tier out without it
fi
scripts/setup.sh
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0

# The dashboard test drives Debian's headless chromium; install it when missing
# (root only; without it that one test skips and says why).
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing chromium for the dashboard test" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q chromium >/dev/null 2>&1 \
        || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1; } \
        || echo "setup: could not install chromium; the dashboard test will skip" >&2
fi
V=.venv/bin

echo "== ruff check" >&2
"$V/ruff" check .
echo "== ruff format --check" >&2
"$V/ruff" format --check .
echo "== mypy" >&2
"$V/mypy"
echo "== lint-imports (layers)" >&2
"$V/lint-imports"
echo "== pytest" >&2
set +e
"$V/pytest" ${SELECT[@]+"${SELECT[@]}"} "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "no test selected (the slow tier runs only with --all)" >&2
fi
exit "$rc"
