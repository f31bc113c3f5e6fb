#!/usr/bin/env bash
# Fills this project's model repository from the shipped miniature with the command that turns any checkpoint into
# a repository: 1/engine (the ONNX artifact, exported once and reused while its manifest matches the weights and the
# draft adapter) and 1/tokenizer (config.json, generation_config.json, the tokenizer files), then checks that it
# loads. serve.sh runs it for the default repository; for your own checkpoint run
#   python -m export repository --checkpoint DIR --out REPO
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$ROOT"
python -m export repository --checkpoint export/miniature --out model_repository --max-batch 16 >&2
