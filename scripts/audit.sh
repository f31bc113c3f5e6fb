#!/usr/bin/env bash
# Audits the locked dependencies (requirements.lock) for published vulnerabilities with pip-audit. --strict: a
# package that could not be audited (the vulnerability service unreachable, say) fails the audit instead of passing
# silently. Known findings that are accepted are listed, with the reason, in the README ("Dependency audit").
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$ROOT"
exec python -m pip_audit --requirement requirements.lock --no-deps --disable-pip --strict --progress-spinner off "$@"
