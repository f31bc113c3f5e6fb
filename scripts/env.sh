# Sourced by demo.sh, test.sh and serve.sh: creates .venv when it is missing (or when pyproject.toml or
# requirements.lock changed) and activates it.
# torch is pinned to 2.13.0 in pyproject.toml: an unpinned torch would pull a multi-GB CUDA build.
# The modelopt extra (NVIDIA ModelOpt, CPU quantization; about 30 s and 215 MB) is installed so its tests run.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
STAMP="$VENV/.installed-from"
want="$(cat "$ROOT/pyproject.toml" "$ROOT/requirements.lock" 2>/dev/null | sha256sum | cut -d' ' -f1)"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
  echo "setting up $VENV (first run: a few minutes)" >&2
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  # requirements.lock (scripts/lock.sh) pins the transitive dependencies too
  "$VENV/bin/python" -m pip install --quiet -c "$ROOT/requirements.lock" -e "$ROOT[test,modelopt]"
  echo "$want" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
