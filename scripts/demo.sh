#!/usr/bin/env bash
# Install (if needed) and run the whole pipeline on the embedded default (configs/demo.yaml):
# search -> synthesis -> per-culture adapters -> router -> one answer served through Ray Serve.
#   bash scripts/demo.sh [key=value overrides]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
VENV="${CM_RAY_VENV:-$HOME/.cache/cm_ray/venv}"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/cm_ray/torch_extensions}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
exec "$VENV/bin/python" -m cm_ray run configs/demo.yaml "$@"
