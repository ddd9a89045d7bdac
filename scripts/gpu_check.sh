#!/usr/bin/env bash
# The GPU checks (paraflow/tools/gpu_check.py) on a machine with one CUDA GPU, in under 8 minutes:
#   bash scripts/gpu_check.sh [OUT]      (default OUT: gpu-check; figures in OUT/gpu_check.md)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu-check}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
timeout 470 python -m paraflow.tools.gpu_check --device cuda --out "$out"
