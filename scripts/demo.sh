#!/usr/bin/env bash
# The main job on a fresh machine: environment, then the shipped miniature generating in all three modes.
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$ROOT"
exec python scripts/demo_inprocess.py "$@"
