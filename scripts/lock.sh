#!/usr/bin/env bash
# Writes requirements.lock: every package of the project's environment at its exact version, the transitive ones
# included. env.sh installs with it as a constraint, so a fresh machine gets the environment the tests ran in, and
# scripts/audit.sh audits exactly that set. Run after changing a dependency in pyproject.toml.
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$ROOT"
{
  echo "# The project's environment, transitive dependencies included (scripts/lock.sh; python -m pip freeze)."
  python -m pip freeze --exclude-editable | grep -v '^-e ' | LC_ALL=C sort -f
} > requirements.lock
echo "wrote requirements.lock ($(grep -vc '^#' requirements.lock) packages)"
