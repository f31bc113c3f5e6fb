#!/usr/bin/env bash
# Runs checkov, the infrastructure-as-code scanner, from an environment of its own:
#
#   scripts/checkov.sh [checkov arguments]   e.g. scripts/checkov.sh --framework kubernetes --skip-download -d DIR
#
# checkov pins packaging < 24 (and more), which the project's requirements.lock does not allow, so it cannot live
# in .venv: it gets a virtual environment in build/tools/ (ignored by git), created once from
# deploy/checkov-requirements.txt, where every package is pinned. tests/test_helm.py runs it over the chart's
# rendered manifests, offline (--skip-download).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REQUIREMENTS="$ROOT/deploy/checkov-requirements.txt"
VERSION="$(sed -n 's/^checkov==//p' "$REQUIREMENTS")"
ENV="$ROOT/build/tools/checkov-$VERSION"
want="$(sha256sum "$REQUIREMENTS" | cut -d' ' -f1)"
if [ ! -x "$ENV/bin/checkov" ] || [ "$(cat "$ENV/.installed-from" 2>/dev/null)" != "$want" ]; then
  echo "scripts/checkov.sh: installing checkov $VERSION into $ENV (once, about a minute)" >&2
  rm -rf "$ENV"
  python3 -m venv "$ENV"
  "$ENV/bin/python" -m pip install --quiet --disable-pip-version-check -c "$REQUIREMENTS" "checkov==$VERSION"
  echo "$want" > "$ENV/.installed-from"
fi
exec "$ENV/bin/checkov" "$@"
