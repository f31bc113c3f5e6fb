#!/bin/sh
# model-config.sh CONFIG [KIND [COUNT]]
#
# Prints the Triton model configuration CONFIG (a config.pbtxt) with its instance group replaced by one group of
# COUNT instances of KIND; the default, KIND_GPU with count 1, is one instance on each GPU Triton sees. Everything
# else in CONFIG is kept as it is, so a deployment's configuration cannot drift from the repository's own.
#
# The chart's init container runs it to write dlm/configs/<name>.pbtxt (Triton's --model-config-name); for a
# repository in object storage run it yourself before uploading:
#
#   mkdir -p model_repository/dlm/configs
#   sh deploy/helm/dlm/files/model-config.sh model_repository/dlm/config.pbtxt > model_repository/dlm/configs/gpu.pbtxt
set -eu
config=${1:?usage: model-config.sh CONFIG [KIND [COUNT]]}
kind=${2:-KIND_GPU}
count=${3:-1}
case $kind in
  KIND_GPU|KIND_CPU|KIND_AUTO) ;;
  *) echo "model-config.sh: KIND must be KIND_GPU, KIND_CPU or KIND_AUTO, got '$kind'" >&2; exit 2 ;;
esac
case $count in
  ''|*[!0-9]*|0) echo "model-config.sh: COUNT must be a positive integer, got '$count'" >&2; exit 2 ;;
esac
line='^[[:space:]]*instance_group[[:space:]]*\[.*\][[:space:]]*$'
found=$(grep -c "$line" "$config" || true)
if [ "$found" != 1 ]; then
  echo "model-config.sh: $config must hold exactly one 'instance_group [ ... ]', on one line; found $found" >&2
  exit 1
fi
sed "s/$line/instance_group [ { count: $count, kind: $kind } ]/" "$config"
