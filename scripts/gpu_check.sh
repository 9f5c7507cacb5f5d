#!/usr/bin/env bash
# Checks every CUDA path on a machine with a CUDA GPU, in one command of at most 8 minutes:
#     bash scripts/gpu_check.sh [OUTPUT_DIR]        (default OUTPUT_DIR: gpu_check_results)
# 1. installs evit_hf and its test extras if they are not importable, keeping the installed torch (never replaced);
# 2. runs the gpu-marked tests (tests/test_gpu.py, tests/test_llava_gpu.py);
# 3. writes the benchmark table, OUTPUT_DIR/gpu_benchmark.json and .md (scripts/gpu_benchmark.py), in the time left.
# Exits 1 when a test or a benchmark group fails. Without a CUDA device it says so in one line and exits 0.
# PYTHON selects the interpreter (default python3).
set -uo pipefail

BUDGET_SECONDS=480
started=$SECONDS
usage="usage: bash scripts/gpu_check.sh [OUTPUT_DIR]"
fail_usage() {
    echo "$usage" >&2
    echo "gpu_check.sh: error: $1" >&2
    exit 2
}
case "${1:-}" in
    -h | --help)
        echo "$usage"
        exit 0
        ;;
    -*) fail_usage "unknown option $1: the only argument is the output folder" ;;
esac
[ $# -le 1 ] || fail_usage "expected at most one argument (the output folder), got $#"
output_dir=${1:-gpu_check_results}
python=${PYTHON:-python3}
command -v "$python" >/dev/null || fail_usage "no $python on PATH: set PYTHON to the interpreter that has torch"

# The output folder must be writable (it is created only once the checks run).
existing=$output_dir
while [ ! -e "$existing" ]; do existing=$(dirname "$existing"); done
[ -d "$existing" ] || fail_usage "cannot write into $output_dir: $existing is a file, not a folder"
[ -w "$existing" ] && [ -x "$existing" ] || fail_usage "cannot write into $output_dir: no permission to write in $existing"

# Is there a CUDA device? Asked of torch (which honours CUDA_VISIBLE_DEVICES) before anything is installed.
cuda=$("$python" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0, torch.__version__, torch.version.cuda)" 2>/dev/null) || cuda=""
read -r gpus torch_version torch_cuda <<<"${cuda:-none none none}"
if [ "$gpus" = none ]; then
    if nvidia-smi -L >/dev/null 2>&1; then
        echo "gpu_check.sh: error: this machine has an NVIDIA GPU but $python cannot import torch: install a CUDA build of torch first (https://pytorch.org/get-started/locally/)" >&2
        exit 1
    fi
    echo "gpu_check.sh: no CUDA device (no torch for $python, no nvidia-smi): nothing to check"
    exit 0
fi
if [ "$gpus" = 0 ]; then
    if [ "$torch_cuda" = None ] && [ -z "${CUDA_VISIBLE_DEVICES+set}" ] && nvidia-smi -L >/dev/null 2>&1; then
        echo "gpu_check.sh: error: this machine has an NVIDIA GPU but torch $torch_version is a CPU build: install a CUDA build of torch (https://pytorch.org/get-started/locally/)" >&2
        exit 1
    fi
    echo "gpu_check.sh: no CUDA device (torch $torch_version: torch.cuda.is_available() is False): nothing to check"
    exit 0
fi

cd "$(dirname "$0")/.."
repository=$(pwd)
case "$output_dir" in /*) ;; *) output_dir="$OLDPWD/$output_dir" ;; esac
export PYTHONPATH="$repository${PYTHONPATH:+:$PYTHONPATH}"
echo "gpu_check.sh: $gpus CUDA device(s), torch $torch_version (CUDA $torch_cuda), $(date -u '+%Y-%m-%d %H:%M UTC')"

# 1. What the tests and the benchmark import. pip gets the installed torch as a constraint, so that it keeps it (or
# stops) instead of downloading another build; flash attention is used only if its package is already installed.
if ! "$python" -c "import evit_hf, pytest, transformers, datasets, evaluate" 2>/dev/null; then
    "$python" - <<'EOF' || exit 1
import re
import sys
from importlib.metadata import version

try:
    from packaging.requirements import Requirement
except ImportError:
    from pip._vendor.packaging.requirements import Requirement

dependencies = open("pyproject.toml").read()
requirement = Requirement(re.search(r'"(torch[^"]*)"', dependencies).group(1))
installed = version("torch")
if not requirement.specifier.contains(installed, prereleases=True):
    sys.exit(f"gpu_check.sh: error: evit_hf needs {requirement}, this torch is {installed}: install a CUDA build of torch that satisfies it first")
EOF
    constraint=$(mktemp)
    echo "torch==$("$python" -c 'from importlib.metadata import version; print(version("torch"))')" >"$constraint"
    echo "gpu_check.sh: installing evit_hf with its test extras (torch kept: $(cat "$constraint"))"
    "$python" -m pip install --quiet -e ".[test]" -c "$constraint" || {
        echo "gpu_check.sh: error: pip could not install evit_hf's test extras beside this torch" >&2
        exit 1
    }
    rm -f "$constraint"
fi

# 2. The gpu-marked tests.
echo "gpu_check.sh: gpu-marked tests"
timeout 240 "$python" -m pytest -q -m gpu tests/test_gpu.py tests/test_llava_gpu.py -p no:cacheprovider -rs
tests_status=$?
[ $tests_status -eq 124 ] && echo "gpu_check.sh: the gpu-marked tests ran past 240 s and were stopped" >&2

# 3. The benchmark table, in what is left of the 8 minutes (20 s kept for writing and the summary).
left=$((BUDGET_SECONDS - (SECONDS - started) - 20))
[ $left -lt 60 ] && left=60
echo "gpu_check.sh: benchmark table into $output_dir (${left} s)"
timeout $((left + 60)) "$python" scripts/gpu_benchmark.py --output-dir "$output_dir" --time-budget "$left"
benchmark_status=$?

echo "gpu_check.sh: tests $([ $tests_status -eq 0 ] && echo passed || echo "FAILED (status $tests_status)"), benchmark $([ $benchmark_status -eq 0 ] && echo passed || echo "FAILED (status $benchmark_status)"), $((SECONDS - started)) s"
[ $tests_status -eq 0 ] && [ $benchmark_status -eq 0 ]
