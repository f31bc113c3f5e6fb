#!/usr/bin/env bash
# Type-checks the project (scripts/typecheck.sh: mypy, TensorRT against its stubs), then runs the whole test suite;
# creates .venv first when it is missing. Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$ROOT"
scripts/typecheck.sh
exec python -m pytest "$@"
