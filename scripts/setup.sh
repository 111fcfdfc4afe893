#!/usr/bin/env bash
# Set up everything the README's two commands need, in ./.venv (idempotent: a second run only checks).
#   - Open MPI from Debian's packages (for mpirun / mpi4py; skipped if mpirun exists or not root)
#   - a virtual environment with ldb_ds (editable) and its train, bench and test extras
#     (torch, torchvision, DeepSpeed, timm, TensorBoard, ...), plus mpi when MPI is installed.
# A torch that is already in the environment is kept: it is pinned for the install, so pip
# picks a torchvision that matches it instead of replacing torch (gigabytes, maybe another CUDA).
#   LDB_DS_SYSTEM_SITE_PACKAGES=1 bash scripts/setup.sh   # reuse the system's torch (venv sees it)
#   PYTHON=python3.12 bash scripts/setup.sh               # another interpreter
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
  if [ "${LDB_DS_SYSTEM_SITE_PACKAGES:-0}" = 1 ]; then
    "$PY" -m venv --system-site-packages .venv
  else
    "$PY" -m venv .venv
  fi
fi
VPY=.venv/bin/python
stamp=.venv/.ldb_ds_installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "[setup] installing ldb_ds with its train, bench and test extras (torch is large: a few minutes the first time)"
  extras="test"
  if command -v mpicc >/dev/null 2>&1; then extras="test,mpi"; fi
  constraints=()
  if have_torch=$("$VPY" -c "import torch; print(torch.__version__.split('+')[0])" 2>/dev/null); then
    echo "[setup] keeping the installed torch $have_torch"
    echo "torch==$have_torch" > .venv/keep-torch.txt
    constraints=(-c .venv/keep-torch.txt)
  fi
  "$VPY" -m pip install -q "${constraints[@]}" -e ".[${extras}]"
  touch "$stamp"
fi
"$VPY" - <<'PY'
import torch, deepspeed, timm
print(f"[setup] ok: torch {torch.__version__}, deepspeed {deepspeed.__version__}, timm {timm.__version__}")
PY
