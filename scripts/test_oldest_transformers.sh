#!/usr/bin/env bash
# Runs the model-family tests against the oldest transformers release pyproject.toml allows (5.23), in a venv of its
# own (.venv-oldest): module layouts and checkpoint key names move between minor versions (DINOv3's layers moved
# from `model.layer` to `model.model.layer`, ViT's attention from `attention.attention.query` to `attention.q_proj`).
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m venv .venv-oldest
# shellcheck disable=SC1091
. .venv-oldest/bin/activate
python -m pip install --quiet --upgrade pip
python -m pip install --quiet "torch==2.13.0"
python -m pip install --quiet -e ".[test]" "transformers>=5.23,<5.24"
python -c "import transformers; assert transformers.__version__.startswith('5.23'), transformers.__version__"
# The model families, key layouts and conversion; the Auto registration hook, which watches transformers' lazy
# mappings; and the pipelines of every family.
python -m pytest -q tests/test_modeling.py tests/test_encoders.py tests/test_loading.py tests/test_apply_evit.py \
    tests/test_macs.py tests/test_conversion.py tests/test_import_time.py tests/test_pipelines.py
