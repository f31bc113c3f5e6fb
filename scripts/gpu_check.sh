#!/usr/bin/env bash
# On any CUDA machine with PyTorch: the PyTorch runtime on the miniature and on random weights of the real 3B shape,
# per-forward latency against the bandwidth floor, tokens per forward and tokens/s of each mode, the TensorRT path
# when TensorRT imports; figures as JSON (--json PATH, default $OUT/gpu_check.json when OUT is set, else
# artifacts/gpu_check.json). Installs nothing: it runs with the Python given by $PYTHON (default python3), whose
# torch must see a GPU. Options: see scripts/gpu_check.py --help. About 1–3 minutes on an H100.
set -euo pipefail
exec "${PYTHON:-python3}" "$(dirname "$0")/gpu_check.py" "$@"
