#!/usr/bin/env bash
# The offline digits demo, from a fresh checkout: sets up .venv if needed, then trains a small ViT, turns it into
# EViT, fine-tunes it with the keep-rate warm-up and writes the EViT folder, the table and the figures.
#   bash examples/demo.sh [--output_dir outputs/digits_demo] [--seed 0]
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c "import evit_hf, sklearn, matplotlib" 2>/dev/null; then
    echo "Setting up .venv (torch 2.13.0 CPU, evit_hf, scikit-learn, matplotlib)..."
    # pip's and setuptools' notes go to a log, shown only when the set-up fails.
    setup_log=$(mktemp)
    if ! { bash scripts/setup.sh && .venv/bin/python -m pip install --quiet -e ".[examples]"; } >"$setup_log" 2>&1; then
        tail -n 30 "$setup_log" >&2
        echo "demo.sh: setting up .venv failed (the lines above are the end of its log, $setup_log)." >&2
        exit 1
    fi
    rm -f "$setup_log"
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1  # nothing in the demo needs the network
exec .venv/bin/python examples/digits_demo.py "$@"
