#!/usr/bin/env bash
# The per-step targets of issue 10 (docs/benchmark.md, "Per-group cost"): LDB FULL step / baseline
# step, DROP / oracle DROP against baseline / oracle FULL, and exact DROP-step gradient bytes, for
# resnet50 and densenet121 at module granularity, ZeRO 0-3, world sizes 1 and 2, then one table.
#
#   launch/bench_targets.sh [OUT_DIR]          # CPU: about 2 hours on 2 otherwise idle cores
#
# Each (model, stage) is one `scaling` run: `step` mode through the deepspeed launcher at world
# sizes 1 and 2. Every step-mode run alternates baseline, LDB FULL, LDB DROP and the oracles in
# rotated rounds; ROUNDS (>= 5) timed rounds give the medians and spreads.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench_targets}
PY=${PYTHON:-python}
MODELS=${MODELS:-"resnet50 densenet121"}
STAGES=${STAGES:-"0 1 2 3"}
ROUNDS=${ROUNDS:-7}
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu} OMP_NUM_THREADS=1 TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.torch_extensions}
# glibc's mmap threshold would make the baseline's single large flat group page-fault every step
# (docs/benchmark.md, "A CPU-only trap"); set for both sides.
export MALLOC_MMAP_THRESHOLD_=${MALLOC_MMAP_THRESHOLD_:-4294967296} MALLOC_TRIM_THRESHOLD_=${MALLOC_TRIM_THRESHOLD_:-4294967296}
for model in $MODELS; do
  for stage in $STAGES; do
    # shellcheck disable=SC2086
    $PY -m ldb_ds.bench scaling --world-sizes 1,2 --scaling-modes step --model "$model" --zero-stage "$stage" \
        --batch-size 32 --granularity module --rounds "$ROUNDS" --warmup-rounds 2 --steps-per-round 1 \
        --dw-reps 1 --byte-steps 2 --no-tensorboard --quiet --out "$OUT/$model/zero$stage"
  done
done
$PY -m ldb_ds.bench.targets "$OUT" --out "$OUT/targets.md"
