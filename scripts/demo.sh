#!/usr/bin/env bash
# The main job on a fresh machine: the environment (.venv) if missing, the ONNX artifact if missing, a Triton
# server on free loopback ports, a client that generates in each mode with streaming (text, tokens per forward,
# latency), and the server stopped again. `scripts/demo_inprocess.py` runs the same prompts without a server.
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$ROOT"

scripts/prepare_repository.sh
read -r http_port grpc_port metrics_port < <(python - <<'PY'
import socket
sockets = [socket.socket() for _ in range(3)]
for s in sockets:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in sockets))
PY
)
log="$(mktemp -t dlm-demo-server.XXXXXX.log)"
scripts/serve.sh --http-port "$http_port" --grpc-port "$grpc_port" --metrics-port "$metrics_port" >"$log" 2>&1 &
server=$!
trap 'kill -TERM "$server" 2>/dev/null && wait "$server" 2>/dev/null; echo "server stopped (log: $log)"' EXIT

echo "starting Triton (HTTP $http_port, gRPC $grpc_port, metrics $metrics_port; log: $log)"
for _ in $(seq 300); do
  if curl -sf "http://127.0.0.1:$http_port/v2/models/dlm/ready" >/dev/null; then break; fi
  if ! kill -0 "$server" 2>/dev/null; then echo "the server exited:" >&2; tail -20 "$log" >&2; exit 1; fi
  sleep 0.2
done
curl -sf "http://127.0.0.1:$http_port/v2/models/dlm/ready" >/dev/null || { echo "not ready in 60 s" >&2; exit 1; }
echo "ready"

for prompt in "4821+377=" "upper:thequickbrownfoxjumpsoverthelazydogs="; do
  for mode in ar diffusion speculative; do
    echo
    echo "== $mode: $prompt"
    python -m client "$prompt" --mode "$mode" --stream --url "127.0.0.1:$grpc_port"
  done
done
