#!/usr/bin/env bash
# Set up everything ldb_ds needs in ./.venv (idempotent: a second run only checks).
#   - Open MPI from Debian's packages (for mpirun / mpi4py; skipped if mpirun exists or not root)
#   - a virtual environment with torch 2.14.1, torchvision 0.29.1, deepspeed 0.19.8 and the rest
# Usage: bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v mpirun >/dev/null 2>&1 || ! command -v mpicc >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[setup] installing Open MPI from Debian's packages"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openmpi-bin libopenmpi-dev >/dev/null
  else
    echo "[setup] mpirun/Open MPI headers not found and cannot apt-get: the MPI extra and test will be unavailable"
  fi
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
stamp=.venv/.ldb_ds_installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "[setup] installing ldb_ds and its dependencies (torch is large: a few minutes the first time)"
  extras="test"
  if command -v mpicc >/dev/null 2>&1; then extras="test,mpi"; fi
  python -m pip install -q -e ".[${extras}]"
  touch "$stamp"
fi
python - <<'PY'
import torch, deepspeed, timm
print(f"[setup] ok: torch {torch.__version__}, deepspeed {deepspeed.__version__}, timm {timm.__version__}")
PY
