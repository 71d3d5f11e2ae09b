#!/usr/bin/env bash
# The optional PyTorch extra (`.[torch]`: torch + timm) for the weight-port tests, CPU only, into the
# active virtual environment. Called by .ci/run after the core install.
#
# Why not `pip install -e ".[torch]"`: on this machine that resolves to a CUDA build of torch and
# torchvision (several GB). Instead:
#   1. torch==2.13.0 is the CPU build whose wheel lies on the machine's local disk (pip's find-links);
#   2. timm is installed without its dependencies, so pip cannot replace that torch with a CUDA one;
#      its pure-Python dependencies are installed by name;
#   3. timm imports torchvision at import time (only for FrozenBatchNorm2d and the data transforms).
#      No CPU torchvision wheel exists on PyPI for Linux x86_64; its CUDA wheel, installed without
#      dependencies, imports beside the CPU torch once the two operator schemas its Python side
#      registers unconditionally (torchvision::nms, torchvision::qnms) are defined — which
#      tests/test_port.py does. Its compiled operators stay unavailable; ViTs never call them.
set -euo pipefail

TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
TORCHVISION_VERSION="${TORCHVISION_VERSION:-0.28.0}"  # the release paired with torch 2.13
TIMM_SPEC="${TIMM_SPEC:-timm>=1.0,<2}"

python -m pip install --quiet "torch==${TORCH_VERSION}"
python -m pip install --quiet --no-deps "torchvision==${TORCHVISION_VERSION}" "${TIMM_SPEC}"
python -m pip install --quiet pyyaml huggingface_hub "safetensors>=0.4"

# Fail here, not in the tests, if a later install swapped the CPU torch for another build.
TORCH_VERSION="${TORCH_VERSION}" python - <<'PY'
import importlib.metadata as md
import os
import torch
expected = os.environ["TORCH_VERSION"]
assert torch.__version__.split("+")[0] == expected, f"torch {expected} was replaced by {torch.__version__}"
print(f"torch {torch.__version__}, torchvision {md.version('torchvision')}, timm {md.version('timm')}")
PY
