#!/usr/bin/env bash
# Start launch/train.py with Open MPI's mpirun; train.py finds rank, world size and local rank
# through mpi4py (deepspeed.init_distributed(auto_mpi_discovery=True)).
#
#   NP=2 launch/mpirun.sh --model resnet10t --epochs 5
#   NP=16 HOSTFILE=launch/hostfile launch/mpirun.sh ...        # several nodes (Open MPI hostfile)
#
# MASTER_PORT is forwarded: DeepSpeed's MPI discovery would otherwise always pick 29500.
# On a CPU (DS_ACCELERATOR=cpu, the default here when no GPU is visible) one thread per rank.
set -euo pipefail
cd "$(dirname "$0")/.."

NP=${NP:-2}
CONFIG=${CONFIG:-ds_configs/zero2_ldb.json}
# The project's virtualenv (scripts/setup.sh) when there is one; PYTHON=... overrides.
if [[ -z "${PYTHON:-}" && -x .venv/bin/python ]]; then PY=$PWD/.venv/bin/python; else PY=${PYTHON:-python}; fi
export MASTER_PORT=${MASTER_PORT:-29500}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
fi
export DS_ACCELERATOR=${DS_ACCELERATOR:-}

args=(-np "$NP" -x MASTER_PORT -x OMP_NUM_THREADS -x DS_ACCELERATOR -x PATH)
[[ -n "${HOSTFILE:-}" ]] && args+=(--hostfile "$HOSTFILE")
[[ "$(id -u)" == 0 ]] && args+=(--allow-run-as-root)
# Bind each rank to its own cores (what --bind_cores_to_rank does for the deepspeed launcher).
args+=(--bind-to core --map-by "slot:PE=${OMP_NUM_THREADS}")

exec mpirun "${args[@]}" ${MPIRUN_ARGS:-} "$PY" launch/train.py --deepspeed_config "$CONFIG" "$@"
