#!/usr/bin/env bash
# Creates .venv with torch 2.13.0 (CPU build) and evit_hf installed in editable mode with its test extras.
# torch is installed first and explicitly: a bare `torch` requirement would pull several GB of CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
python -m pip install --quiet "torch==2.13.0"
python -m pip install --quiet -e ".[test]"
python -c "import torch, transformers, evit_hf; print('torch', torch.__version__, '| transformers', transformers.__version__, '| evit_hf', evit_hf.__version__)"
