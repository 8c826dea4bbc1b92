#!/usr/bin/env bash
# Spark GPU discovery script: prints the GPUs this executor may use, as Spark expects:
#   {"name": "gpu", "addresses": ["0", "1"]}
# When a resource manager (YARN, the Kubernetes device plugin) set CUDA_VISIBLE_DEVICES, the
# ids listed there (indexes or GPU-UUIDs) are the addresses; sparkdl maps a task's address to
# its position in that list (sparkdl._gpu.cuda_ordinal). Otherwise the nvidia-smi indexes.
# Point spark.executor.resource.gpu.discoveryScript (and, on standalone Workers,
# spark.worker.resource.gpu.discoveryScript) at this file by an absolute path: docs/cluster.md.
set -euo pipefail
ids=()
if [[ -n "${CUDA_VISIBLE_DEVICES+set}" ]]; then
  IFS=',' read -r -a ids <<< "${CUDA_VISIBLE_DEVICES//[[:space:]]/}"
else
  if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "gpu-discovery.sh: nvidia-smi is not on PATH and CUDA_VISIBLE_DEVICES is unset, so no GPU can be" \
         "listed on ${HOSTNAME:-this machine}; install the NVIDIA driver on this machine or run without the gpu profile" >&2
    exit 1
  fi
  if ! out=$(nvidia-smi --query-gpu=index --format=csv,noheader 2>&1); then
    echo "gpu-discovery.sh: 'nvidia-smi --query-gpu=index' failed on ${HOSTNAME:-this machine}: ${out}" >&2
    exit 1
  fi
  mapfile -t ids <<< "$out"
fi
addresses=""
for id in "${ids[@]}"; do
  id="${id//[[:space:]]/}"
  [[ -n "$id" ]] && addresses+="${addresses:+, }\"${id}\""
done
echo "{\"name\": \"gpu\", \"addresses\": [${addresses}]}"
