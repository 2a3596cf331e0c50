#!/usr/bin/env bash
# The main job: set up if needed, then run `snapstore demo` on the embedded
# default cluster. Extra arguments go to `snapstore demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
exec .venv/bin/snapstore demo "$@"
