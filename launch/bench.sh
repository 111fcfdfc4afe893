#!/usr/bin/env bash
# Reproduce the benchmark figures of docs/benchmark.md.
#
#   launch/bench.sh [OUT_DIR]                         # CPU (this machine's settings)
#   BENCH_DEVICE=gpu WORLD_SIZES=1,2,4,8 launch/bench.sh results_gpu   # a GPU server
#
# 1. headline: per-step FULL/DROP/oracle times, gradient bytes and the end-to-end schedule speedup
#    of resnet18 at ZeRO-2 (p=0.3, s=2, kappa=2, batch_kappa=2) at every world size in WORLD_SIZES
#    (each through the deepspeed launcher), merged into speedup against world size;
# 2. the step comparison at ZeRO-0, world size 1;
# 3. drop-rate and sampling-rate sweeps and the digits accuracy comparison at world size 1.
# Every mode writes <mode>.json, <mode>.md, <mode>.png and TensorBoard scalars under OUT_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench_results}
DEVICE=${BENCH_DEVICE:-cpu}
WORLD_SIZES=${WORLD_SIZES:-1,2}
# The project's virtualenv (scripts/setup.sh) when there is one, so that
# "bash scripts/setup.sh && launch/bench.sh" works without activating it; PYTHON=... overrides.
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=${PYTHON:-python}; fi
PAPER="--zero-stage 2 --precision fp32 --drop-rate 0.3 --sampling-rate 2 --kappa 2 --batch-kappa 2 --granularity module --keep-first 4 --keep-last 1"

if [ "$DEVICE" = cpu ]; then
  export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.torch_extensions}
  # glibc serves allocations above its mmap threshold (at most 32 MB) with fresh pages from the kernel
  # and page-faults through them every step. The baseline's ZeRO flat group of resnet18 (44.7 MB)
  # crosses it, LDB's per-unit groups do not: without this the CPU baseline pays ~25% extra in its
  # optimizer step and LDB looks better than it is (docs/benchmark.md). GPUs have a caching allocator.
  export MALLOC_MMAP_THRESHOLD_=${MALLOC_MMAP_THRESHOLD_:-4294967296} MALLOC_TRIM_THRESHOLD_=${MALLOC_TRIM_THRESHOLD_:-4294967296}
  # resnet18 with the CIFAR stem (11.2 M parameters, 32 px): ~1 s per step of 32 images on one core.
  HEAD="--model resnet18 --batch-size 32 --rounds 10 --warmup-rounds 2 --steps-per-round 1 --dw-reps 3 --profile
        --samples-per-rank 256 --periods 2 --reps 4"
  # Sweeps and accuracy: the same network with its ImageNet stem (8x8 after the stem: ~5x cheaper).
  SMALL="--model resnet18 --stem original --batch-size 32 --samples-per-rank 256 --sweep-periods 1 --sweep-reps 2
         --acc-epochs 8"
else
  HEAD="--model resnet18 --batch-size 128 --rounds 20 --warmup-rounds 5 --steps-per-round 5 --dw-reps 10 --profile
        --samples-per-rank 6272 --periods 2 --reps 5"
  SMALL="--model resnet18 --batch-size 128 --samples-per-rank 6272 --sweep-periods 1 --sweep-reps 3 --acc-epochs 30"
fi

# shellcheck disable=SC2086
$PY -m ldb_ds.bench scaling --world-sizes "$WORLD_SIZES" --scaling-modes step,epochs $PAPER $HEAD --out "$OUT/headline"
# The wrapper's overhead where DeepSpeed itself adds the least: the step comparison at ZeRO-0.
# shellcheck disable=SC2086
$PY -m ldb_ds.bench step $PAPER $HEAD --zero-stage 0 --out "$OUT/zero0"
# shellcheck disable=SC2086
$PY -m ldb_ds.bench sweep-drop-rate,sweep-sampling-rate,accuracy $PAPER $SMALL --out "$OUT/sweeps"
echo "results in $OUT/headline (step, epochs, scaling), $OUT/zero0 (step) and $OUT/sweeps"
