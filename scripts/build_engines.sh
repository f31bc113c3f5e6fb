#!/usr/bin/env bash
# The GPU CI job: checkpoint → fp16 ONNX → FP8 Q/DQ ONNX (ModelOpt) → TensorRT plans (fp16, fp8) → each plan replays
# the ONNX Runtime comparison saved beside its source graph (`polygraphy run model.plan --trt --load-inputs ...
# --load-outputs ...`). Exits non-zero when a step fails or any plan disagrees with its graph.
#
# Runs in NVIDIA's TensorRT container nvcr.io/nvidia/tensorrt:25.10-py3 (TensorRT 10.13.3, the version the
# `tensorrt` extra pins; CUDA 13.0; Python 3.12), on any GPU with FP8 (compute capability 8.9 or newer: Ada, Hopper,
# Blackwell); older GPUs build the fp16 plan only (--precisions fp16):
#
#   docker run --rm --gpus all -v "$PWD:/workspace/dlm" -w /workspace/dlm nvcr.io/nvidia/tensorrt:25.10-py3 \
#       scripts/build_engines.sh [--checkpoint DIR] [--out DIR] [--max-batch N] [--max-context N] [--opt-level N]
#
# The container's TensorRT is used as installed (the venv sees the system site-packages); pip installs the rest of
# the project (torch, ONNX Runtime, polygraphy, ModelOpt) into .venv-gpu. Artifacts land in OUT (default
# artifacts/engines): onnx-fp16/, onnx-fp8/, plan-fp16/, plan-fp8/, each with its manifest.json.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

checkpoint=export/miniature
out=artifacts/engines
precisions="fp16 fp8"
limits=()
opt_level=3
while [ $# -gt 0 ]; do
  case "$1" in
    --checkpoint) checkpoint="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --precisions) precisions="$2"; shift 2 ;;
    --max-batch|--max-context|--max-tokens) limits+=("$1" "$2"); shift 2 ;;
    --opt-level) opt_level="$2"; shift 2 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

VENV="${VENV:-$ROOT/.venv-gpu}"
if [ ! -x "$VENV/bin/python" ]; then
  if python3 -m venv --system-site-packages "$VENV"; then
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet -e ".[modelopt]"
  else  # an image without python3-venv: the container is disposable, install into its Python
    echo "python3 -m venv failed; installing into the container's Python instead" >&2
    rm -rf "$VENV"
    PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --quiet -e ".[modelopt]"
  fi
fi
[ -x "$VENV/bin/python" ] && export PATH="$VENV/bin:$PATH"
python -c "import tensorrt, torch; assert torch.cuda.is_available(), 'torch sees no CUDA GPU'; \
print(f'TensorRT {tensorrt.__version__}, torch {torch.__version__} on {torch.cuda.get_device_name()}')"

step() { echo; echo "== $*"; }
step "export: $checkpoint → $out/onnx-fp16"
python -m export onnx --checkpoint "$checkpoint" --out "$out/onnx-fp16" --precision fp16 "${limits[@]}"
if [[ " $precisions " == *" fp8 "* ]]; then
  step "quantize: fp8 Q/DQ graph → $out/onnx-fp8"
  python -m export quantize --onnx "$out/onnx-fp16/model.onnx" --precision fp8 --out "$out/onnx-fp8" \
    --checkpoint "$checkpoint"
fi

failed=()
for precision in $precisions; do
  source_dir="$out/onnx-fp16"
  [ "$precision" = fp8 ] && source_dir="$out/onnx-fp8"
  step "engine: $precision plan from $source_dir"
  python -m export engine --onnx "$source_dir/model.onnx" --precision "$precision" --out "$out/plan-$precision" \
    --opt-level "$opt_level" --timing-cache "$out/timing.cache"
  # the replay command the build recorded in the plan's manifest (saved inputs/outputs, tolerances of engine.py)
  replay="$(python -c 'import json, sys; print(json.load(open(sys.argv[1]))["artifacts"]["model.plan"]["replay"])' \
    "$out/plan-$precision/manifest.json")"
  step "replay: $replay"
  if ! $replay; then
    failed+=("$precision")
  fi
done

echo
if [ ${#failed[@]} -gt 0 ]; then
  echo "FAILED: the ${failed[*]} plan(s) disagree with the ONNX Runtime outputs saved beside their graphs" >&2
  exit 1
fi
echo "PASSED: every plan ($precisions) matches its graph's saved ONNX Runtime outputs; artifacts in $out"
