#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole test suite on the CPU (DeepSpeed with gloo, 2 ranks).
# This is the README's test command and exactly what CI runs (.ci/run).
# Usage: bash scripts/test.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 TORCH_EXTENSIONS_DIR="$PWD/.torch_extensions"
exec python -m pytest -q -p no:cacheprovider tests "$@"
