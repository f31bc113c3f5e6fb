#!/usr/bin/env bash
# Type-checks the whole project with mypy (configured in pyproject.toml); scripts/test.sh runs it before the tests.
# TensorRT cannot be installed here, so the TensorRT code is checked against the published `tensorrt-stubs`,
# installed once into .venv/typing: a folder only mypy looks at (pyproject's mypy_path). Installed into the
# environment itself they would make `import tensorrt` succeed without TensorRT. The few generated signatures that
# are not valid Python are repaired by scripts/repair_trt_stubs.py. Extra arguments go to mypy.
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$ROOT"
STUBS="tensorrt-stubs==10.13.0.35.1"  # TensorRT Python API 10.13
TYPING="$VENV/typing"
if [ "$(cat "$TYPING/.installed" 2>/dev/null)" != "$STUBS" ]; then
  echo "installing $STUBS into $TYPING (for mypy only)" >&2
  rm -rf "$TYPING"
  python -m pip install --quiet --no-deps --target "$TYPING" "$STUBS"
  python scripts/repair_trt_stubs.py "$TYPING"
  echo "$STUBS" > "$TYPING/.installed"
fi
exec python -m mypy "$@"
