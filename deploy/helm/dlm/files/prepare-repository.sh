#!/bin/sh
# The Triton pods' init container (model repository on a PVC): lays out the repository Triton reads,
# $DLM_REPOSITORY (an emptyDir), as symbolic links into the read-only volume $DLM_REPOSITORY_SOURCE, and writes
# dlm/configs/$DLM_MODEL_CONFIG_NAME.pbtxt from the volume's own dlm/config.pbtxt with this deployment's instance
# group (model-config.sh beside this file). Nothing is copied: the engine stays on the volume.
set -eu
src=${DLM_REPOSITORY_SOURCE:?} dst=${DLM_REPOSITORY:?} name=${DLM_MODEL_CONFIG_NAME:?}
kind=${DLM_INSTANCE_KIND:-KIND_GPU} count=${DLM_INSTANCE_COUNT:-1}
if [ ! -f "$src/dlm/config.pbtxt" ]; then
  echo "prepare-repository.sh: $src/dlm/config.pbtxt is missing: the volume must hold a model repository" \
       "(dlm/config.pbtxt, dlm/1/...); is modelRepository.pvc.subPath right?" >&2
  ls -la "$src" >&2 || true
  exit 1
fi
for model in "$src"/*/; do
  model=${model%/}
  model_name=${model##*/}
  mkdir -p "$dst/$model_name"
  for entry in "$model"/*; do
    [ -e "$entry" ] || continue
    if [ "$model_name" = dlm ] && [ "${entry##*/}" = configs ]; then
      continue  # a real folder below, since a file is added to it
    fi
    ln -sfn "$entry" "$dst/$model_name/${entry##*/}"
  done
done
mkdir -p "$dst/dlm/configs"
for entry in "$src/dlm/configs"/*; do
  if [ -e "$entry" ]; then
    ln -sfn "$entry" "$dst/dlm/configs/${entry##*/}"
  fi
done
rm -f "$dst/dlm/configs/$name.pbtxt"
sh "$(dirname "$0")/model-config.sh" "$src/dlm/config.pbtxt" "$kind" "$count" > "$dst/dlm/configs/$name.pbtxt"
echo "prepare-repository.sh: $dst links to $src; dlm/configs/$name.pbtxt has" \
     "$(grep '^[[:space:]]*instance_group' "$dst/dlm/configs/$name.pbtxt")"
