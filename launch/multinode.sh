#!/usr/bin/env bash
# Multi-node training with DeepSpeed's launcher: run this on the first node of the hostfile.
#
#   HOSTFILE=launch/hostfile launch/multinode.sh --model resnet50 --dataset cifar10 --data-dir /data
#   HOSTFILE=launch/hostfile launch/multinode.sh --dry-run       # print the address, env and command only
#
# MASTER_ADDR defaults to the first host of the hostfile: its first line that is neither blank nor
# a comment, as DeepSpeed's own hostfile parser reads it. Every node needs the same checkout,
# virtualenv path and data path, and passwordless ssh from this node (the default pdsh launcher).
# With Open MPI instead of ssh/pdsh, set LAUNCHER=openmpi. Without a GPU (DS_ACCELERATOR=cpu)
# "slots" in the hostfile count CPU ranks.
#
# Environment for the ranks: DeepSpeed's launcher exports the variables of a ".deepspeed_env" file
# (name from DS_ENV_FILE, looked up in ~ and in the working directory) to every node. This script
# leaves your files alone: it writes a temporary file with OMP_NUM_THREADS (which the launcher does
# not set), DS_ACCELERATOR, NCCL_SOCKET_IFNAME and MASTER_PORT (Open MPI), followed by the lines of
# your own ~/.deepspeed_env and ./.deepspeed_env (yours win where both set a variable), and points
# DS_ENV_FILE at it for this run.
set -euo pipefail
cd "$(dirname "$0")/.."

DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then
  DRY_RUN=1
  shift
fi

HOSTFILE=${HOSTFILE:-launch/hostfile}
CONFIG=${CONFIG:-ds_configs/zero2_ldb.json}
MASTER_PORT=${MASTER_PORT:-29500}
LAUNCHER=${LAUNCHER:-pdsh}

if [[ ! -f "$HOSTFILE" ]]; then
  echo "no hostfile at $HOSTFILE: copy launch/hostfile.example to launch/hostfile and list your nodes" >&2
  exit 2
fi
# The first host: skip blank lines and comments (leading spaces allowed), like DeepSpeed's parser.
first_host=$(awk 'NF && $1 !~ /^#/ {print $1; exit}' "$HOSTFILE")
if [[ -z "$first_host" ]]; then
  echo "hostfile $HOSTFILE lists no host (only blank lines and comments)" >&2
  exit 2
fi
MASTER_ADDR=${MASTER_ADDR:-$first_host}

deepspeed_cmd=deepspeed
[[ -x .venv/bin/deepspeed ]] && deepspeed_cmd=.venv/bin/deepspeed

env_name=${DS_ENV_FILE:-.deepspeed_env}
env_file=$(mktemp "${TMPDIR:-/tmp}/ldb_ds_env.XXXXXX")
trap 'rm -f "$env_file"' EXIT
{
  echo "OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}"
  [[ -n "${DS_ACCELERATOR:-}" ]] && echo "DS_ACCELERATOR=$DS_ACCELERATOR"
  [[ -n "${NCCL_SOCKET_IFNAME:-}" ]] && echo "NCCL_SOCKET_IFNAME=$NCCL_SOCKET_IFNAME"
  [[ "$LAUNCHER" == openmpi ]] && echo "MASTER_PORT=$MASTER_PORT"
  # The user's own files, in the order DeepSpeed reads them (~ first, then the working directory);
  # DeepSpeed keeps the last value of a variable, so theirs override the defaults above.
  for user_file in "$HOME/$env_name" "./$env_name"; do
    [[ -f "$user_file" ]] && grep -v '^[[:space:]]*$' "$user_file"
  done
  true
} > "$env_file"

extra=()
if [[ "$LAUNCHER" == openmpi ]]; then
  # Open MPI starts the ranks; train.py finds rank and world size through mpi4py.
  extra=(--launcher openmpi --launcher_args="-x MASTER_PORT=$MASTER_PORT")
fi
cmd=("$deepspeed_cmd" --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT"
     "${extra[@]}" launch/train.py --deepspeed_config "$CONFIG" "$@")

if [[ "$DRY_RUN" == 1 ]]; then
  echo "MASTER_ADDR=$MASTER_ADDR"
  echo "DS_ENV_FILE=$env_file"
  sed 's/^/env: /' "$env_file"
  echo "command: ${cmd[*]}"
  exit 0
fi
# An absolute DS_ENV_FILE: DeepSpeed joins it to ~ and to ".", which both give this path.
DS_ENV_FILE="$env_file" "${cmd[@]}"
