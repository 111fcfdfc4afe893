#!/usr/bin/env bash
# Multi-node training with DeepSpeed's launcher: run this on the first node of the hostfile.
#
#   HOSTFILE=launch/hostfile MASTER_ADDR=node1 launch/multinode.sh --model resnet50 --dataset cifar10 --data-dir /data
#
# Every node needs the same checkout, virtualenv path and data path, and passwordless ssh from
# this node (the default pdsh launcher). With Open MPI instead of ssh/pdsh, set LAUNCHER=openmpi.
# Without a GPU (DS_ACCELERATOR=cpu) "slots" in the hostfile count CPU ranks.
set -euo pipefail
cd "$(dirname "$0")/.."

HOSTFILE=${HOSTFILE:-launch/hostfile}
CONFIG=${CONFIG:-ds_configs/zero2_ldb.json}
MASTER_ADDR=${MASTER_ADDR:-$(head -n1 "$HOSTFILE" | awk '{print $1}')}
MASTER_PORT=${MASTER_PORT:-29500}
LAUNCHER=${LAUNCHER:-pdsh}

if [[ ! -f "$HOSTFILE" ]]; then
  echo "no hostfile at $HOSTFILE: copy launch/hostfile.example and list your nodes" >&2
  exit 2
fi

# OMP_NUM_THREADS is not set by the deepspeed launcher; forward it (and the accelerator choice)
# to every node through .deepspeed_env, which the launcher exports on each node.
{
  echo "OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}"
  [[ -n "${DS_ACCELERATOR:-}" ]] && echo "DS_ACCELERATOR=$DS_ACCELERATOR"
  [[ -n "${NCCL_SOCKET_IFNAME:-}" ]] && echo "NCCL_SOCKET_IFNAME=$NCCL_SOCKET_IFNAME"
  [[ "$LAUNCHER" == openmpi ]] && echo "MASTER_PORT=$MASTER_PORT"
} > .deepspeed_env

extra=()
if [[ "$LAUNCHER" == openmpi ]]; then
  # Open MPI starts the ranks; train.py finds rank and world size through mpi4py.
  extra=(--launcher openmpi --launcher_args="-x MASTER_PORT=$MASTER_PORT")
fi

exec deepspeed --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
  "${extra[@]}" launch/train.py --deepspeed_config "$CONFIG" "$@"
