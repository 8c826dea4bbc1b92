#!/usr/bin/env bash
# Spark GPU discovery script: prints the GPUs this executor may use, as Spark expects.
# Honours CUDA_VISIBLE_DEVICES when a resource manager (YARN, k8s device plugin) set it.
set -euo pipefail
if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
  ids=$(echo "$CUDA_VISIBLE_DEVICES" | tr ',' '\n' | sed 's/.*/"&"/' | paste -sd, -)
else
  ids=$(nvidia-smi --query-gpu=index --format=csv,noheader | sed 's/.*/"&"/' | paste -sd, -)
fi
echo "{\"name\": \"gpu\", \"addresses\": [${ids}]}"
