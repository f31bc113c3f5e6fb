#!/usr/bin/env bash
# Runs NVIDIA's AIPerf (the `aiperf` command) from an environment of its own:
#
#   scripts/aiperf.sh profile -m dlm --url http://127.0.0.1:9000 --endpoint-type chat --streaming ...
#
# aiperf pins psutil ~= 7.0 and needs numpy 2 (and more), which the project's requirements.lock does not allow, so
# it cannot live in .venv: it gets a virtual environment in build/tools/aiperf-VERSION/ (ignored by git), created
# once from scripts/aiperf/requirements.txt, where every package is pinned (about 1.2 GB and two minutes here;
# pip's cache makes a second install faster). A failed install exits with status 3, so a caller can tell "AIPerf
# cannot be installed here" from a failed benchmark. tests/test_nvidia_clients.py runs it against the gateway and
# against Triton's generate_stream.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REQUIREMENTS="$ROOT/scripts/aiperf/requirements.txt"
VERSION="$(sed -n 's/^aiperf==//p' "$REQUIREMENTS")"
ENV="$ROOT/build/tools/aiperf-$VERSION"
want="$(sha256sum "$REQUIREMENTS" | cut -d' ' -f1)"
if [ ! -x "$ENV/bin/aiperf" ] || [ "$(cat "$ENV/.installed-from" 2>/dev/null)" != "$want" ]; then
  echo "scripts/aiperf.sh: installing aiperf $VERSION into $ENV (once, a few minutes)" >&2
  rm -rf "$ENV"
  if ! { python3 -m venv "$ENV" &&
         "$ENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$REQUIREMENTS"; }; then
    rm -rf "$ENV"
    echo "scripts/aiperf.sh: aiperf $VERSION could not be installed (above: pip's reason)" >&2
    exit 3
  fi
  echo "$want" > "$ENV/.installed-from"
fi
exec "$ENV/bin/aiperf" "$@"
