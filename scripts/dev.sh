#!/usr/bin/env bash
# Set up a virtual environment for mlkv on a fresh machine and run one job in it.
#
#   bash scripts/dev.sh demo     # install, then run `mlkv demo`
#   bash scripts/dev.sh test     # install, then run the test suite
#   bash scripts/dev.sh bench    # install with the benchmark extras, then run bench/
#
# The venv is .venv beside this repository (override with MLKV_VENV). torch 2.13.0 (CPU) is
# installed before the project, so that no dependency pulls a multi-GB CUDA build of torch.
set -euo pipefail
cd "$(dirname "$0")/.."
job="${1:-test}"; shift || true
venv="${MLKV_VENV:-.venv}"
python="${PYTHON:-python3.11}"
command -v "$python" >/dev/null || python=python3

if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
pip="$venv/bin/python -m pip"
stamp="$venv/.mlkv-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ scripts/dev.sh -nt "$stamp" ]; then
    $pip install --quiet --upgrade pip
    $pip install --quiet "torch==2.13.0"
    $pip install --quiet --no-deps recbole pykeen   # data files only (mlkv.datasets), never imported
    $pip install --quiet -e ".[torch,test,bench]"
    touch "$stamp"
fi

case "$job" in
    demo)  exec "$venv/bin/mlkv" demo "$@" ;;
    test)  exec "$venv/bin/python" -m pytest "$@" ;;
    bench) exec "$venv/bin/python" -m pytest bench/ --benchmark-enable "$@" ;;
    shell) exec "$SHELL" ;;
    *) echo "usage: bash scripts/dev.sh {demo|test|bench} [args...]" >&2; exit 2 ;;
esac
