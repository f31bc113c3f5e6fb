#!/usr/bin/env bash
# Runs the whole test suite; creates .venv first when it is missing. Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$ROOT"
exec python -m pytest "$@"
