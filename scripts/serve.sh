#!/usr/bin/env bash
# Runs Triton Inference Server in the foreground over the model repository; SIGTERM (or Ctrl-C) stops it.
#
#   scripts/serve.sh [--model-repository DIR] [--address A] [--http-port N] [--grpc-port N] [--metrics-port N]
#                    [--admin-key KEY] [-- extra tritonserver flags]
#
# Binds 127.0.0.1 by default. Model control stays off (mode none): no client can load or unload models.
# With --admin-key (or DLM_ADMIN_KEY), required when binding another address, the model-repository,
# shared-memory, logging and trace endpoints answer only requests carrying the header `admin-key: KEY` (HTTP) or
# `triton-grpc-protocol-admin-key: KEY` (gRPC metadata).
# A model that fails to load leaves the server up and reporting it not ready, with the reason in the log and in
# the repository index; the server is never half-started silently.
# The server is the tritonserver inside the nvidia-pytriton wheel, or TRITONSERVER=/path/to/tritonserver (e.g.
# /opt/tritonserver/bin/tritonserver in NVIDIA's container). When the default repository has no artifact yet, the
# shipped miniature is exported to ONNX into it first.
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$ROOT"

repository="$ROOT/model_repository" address=127.0.0.1 http_port=8000 grpc_port=8001 metrics_port=8002
admin_key="${DLM_ADMIN_KEY:-}"
while [ $# -gt 0 ]; do
  case "$1" in
    --model-repository) repository="$(cd "$2" && pwd)"; shift 2 ;;
    --address) address="$2"; shift 2 ;;
    --http-port) http_port="$2"; shift 2 ;;
    --grpc-port) grpc_port="$2"; shift 2 ;;
    --metrics-port) metrics_port="$2"; shift 2 ;;
    --admin-key) admin_key="$2"; shift 2 ;;
    --) shift; break ;;
    -h|--help) sed -n 2,15p "$0"; exit 0 ;;
    *) echo "serve.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
done

restricted=()
if [ -n "$admin_key" ]; then
  restricted=(--http-restricted-api="model-repository,shared-memory,logging,trace:admin-key=$admin_key"
              --grpc-restricted-protocol="model-repository,shared-memory,logging,trace:admin-key=$admin_key")
elif [ "$address" != 127.0.0.1 ] && [ "$address" != localhost ] && [ "$address" != ::1 ]; then
  echo "serve.sh: binding $address exposes the server beyond this machine; pass --admin-key KEY (or set" \
       "DLM_ADMIN_KEY) so its model-repository, shared-memory, logging and trace endpoints need that key" >&2
  exit 2
fi

if [ "$repository" = "$ROOT/model_repository" ]; then
  "$ROOT/scripts/prepare_repository.sh"
fi

# The Python backend runs its stub with the first python on PATH (the venv's: numpy<2, tokenizers, onnxruntime).
pyver="$(python -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
export LD_LIBRARY_PATH="$(python -c 'import sysconfig; print(sysconfig.get_config_var("LIBDIR"))')${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
backend_args=()
if [ -z "${TRITONSERVER:-}" ]; then
  triton_dir="$(python -c 'import os, pytriton; print(os.path.join(os.path.dirname(pytriton.__file__), "tritonserver"))')"
  TRITONSERVER="$triton_dir/bin/tritonserver"
  stub="$triton_dir/backends/python/triton_python_backend_stub"
  if [ ! -x "$stub" ]; then  # the wheel keeps one stub per Python version; the backend looks beside itself
    cp "$triton_dir/python_backend_stubs/$pyver/triton_python_backend_stub" "$stub"
  fi
  backend_args=(--backend-directory "$triton_dir/backends")
  if [ "$address" != 127.0.0.1 ] && [ "$address" != localhost ] && [ "$address" != ::1 ]; then
    echo "serve.sh: WARNING: the embedded tritonserver is 2.51 (24.10), which has published vulnerabilities in its" \
         "HTTP front end and Python backend (CVE-2025-23310, -23311, -23319, -23320, -23334 and later; see README)." \
         "Beyond loopback, run a patched NVIDIA container's server with TRITONSERVER=." >&2
  fi
fi

exec "$TRITONSERVER" \
  --model-repository "$repository" \
  --model-control-mode none \
  --http-address "$address" --http-port "$http_port" \
  --grpc-address "$address" --grpc-port "$grpc_port" \
  --metrics-address "$address" --metrics-port "$metrics_port" \
  --allow-gpu-metrics=false --pinned-memory-pool-byte-size=0 \
  --exit-timeout-secs 20 --exit-on-error=false \
  "${restricted[@]}" "${backend_args[@]}" "$@"
