#!/usr/bin/env bash
# Puts what model_repository/dlm/config.pbtxt names into its version folder, from the shipped miniature:
# 1/engine (the ONNX artifact, exported once) and 1/tokenizer (the checkpoint's config.json and tokenizer).
# serve.sh runs it for the default repository; a deployment puts its own engine and tokenizer there instead.
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$ROOT"
version_dir="$ROOT/model_repository/dlm/1"
# an artifact this code cannot serve (none yet, one built for an older engine contract) or one built from other
# weights or another draft adapter than the shipped miniature's is rebuilt
if ! python - "$version_dir/engine" 2>/dev/null <<'PY'
import sys
from export.adapter import adapter_sha256, find_adapter
from export.manifest import check
entry = check(sys.argv[1], "onnx", "export/miniature").entry
built = (entry.get("draft_adapter") or {}).get("sha256")
sys.exit(0 if built == adapter_sha256(find_adapter("export/miniature")) else 1)
PY
then
  rm -rf "$version_dir/engine"
  echo "prepare_repository.sh: exporting the miniature to $version_dir/engine (once, about 30 s)" >&2
  python -m export onnx --checkpoint export/miniature --out "$version_dir/engine" --max-batch 16 >&2
fi
mkdir -p "$version_dir/tokenizer"
cp export/miniature/{config.json,tokenizer.json,tokenizer_config.json,special_tokens_map.json} "$version_dir/tokenizer/"
