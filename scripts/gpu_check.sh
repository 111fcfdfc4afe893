#!/usr/bin/env bash
# The prepared GPU check (README, "GPU check"): one script, one GPU, at most 6 minutes wall.
#
#   bash scripts/gpu_wheels.sh                  # here, once: the wheels the GPU machine lacks
#   OUT=/dir bash scripts/gpu_check.sh          # on the GPU machine, in the repository root
#   bash scripts/gpu_check.sh --dry-run         # here, on the CPU, tiny sizes, no install
#
# Options: --dry-run, --budget SECONDS (wall-clock budget of the whole script; default 330, which
# leaves a margin under 6 minutes), --out DIR (default: $OUT, else ./gpu_check_out).
#
# Phases, in order of importance, each time-boxed; every phase writes its results as it goes, so
# a phase cut short (SIGINT at its time box) leaves what it had measured, and the summary says so:
#   install  .wheels/*.whl, then the project, with --no-deps and no index into a private site
#            directory put on PYTHONPATH: the image's torch (and its whole environment) is used
#            as it is and not modified
#   facts    the card (nvidia-smi), date, torch / CUDA / DeepSpeed versions        -> facts.json
#   tests    pytest tests/gpu at world size 1 (parity at ZeRO 0-3, bf16 and fp16)  -> tests/
#   bench    python -m ldb_ds.bench: baseline vs LDB on resnet18 and resnet50 (CIFAR stem, 32x32,
#            bf16, batch 128 and 256, ZeRO-0 and ZeRO-2; step and epochs modes), and densenet121
#            at module granularity (step mode: LDB FULL / baseline with hundreds of groups)
#                                                                                   -> bench/<run>/
#   summary  summary.md and summary.json (scripts/gpu_summary.py)
#
# One GPU is world size 1: DeepSpeed skips the gradient reductions and all-gathers, so the run
# measures compute and per-param-group launch costs, not communication (stated in every table).
# The dry run takes the same steps with tiny sizes on DeepSpeed's CPU accelerator, runs the
# resnet18 ZeRO-2, resnet50 ZeRO-0 and densenet121 entries of the benchmark (the others differ
# only in their numbers), and only collects tests/gpu (they need a GPU; the suite runs them
# wherever one is visible). tests/app/test_gpu_check.py runs it in the test suite.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

DRY=0
BUDGET=""
OUT_DIR=${OUT:-$ROOT/gpu_check_out}
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --budget) BUDGET=$2; shift ;;
    --out) OUT_DIR=$2; shift ;;
    -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
if [ -z "$BUDGET" ]; then
  if [ "$DRY" = 1 ]; then BUDGET=600; else BUDGET=330; fi
fi
START=$(date +%s)
DEADLINE=$((START + BUDGET))
RESERVE=12       # seconds kept for the summary
MIN_PHASE=15     # a phase with less time left than this is skipped, not started

mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
LOGS=$OUT_DIR/logs
PHASES=$OUT_DIR/phases.tsv
mkdir -p "$LOGS" "$OUT_DIR/bench" "$OUT_DIR/tests"
: > "$PHASES"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

if [ "$DRY" = 1 ]; then
  export DS_ACCELERATOR=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$ROOT/.torch_extensions}
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
else
  export DS_ACCELERATOR=cuda   # tests/conftest.py would otherwise default to DeepSpeed's CPU accelerator
  SITE=${TMPDIR:-/tmp}/ldb_ds_gpu_site
  export TORCH_EXTENSIONS_DIR=${TMPDIR:-/tmp}/ldb_ds_torch_extensions
  export PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi

log() { echo "[gpu_check $(( $(date +%s) - START ))s] $*"; }

# run_phase NAME CAP_SECONDS COMMAND...: time-boxed (SIGINT, then SIGKILL 10 s later), logged,
# recorded as one line of phases.tsv: name, status, wall seconds, time box.
run_phase() {
  local name=$1 cap=$2
  shift 2
  local left=$((DEADLINE - RESERVE - $(date +%s)))
  local box=$((cap < left ? cap : left))
  if [ "$box" -lt "$MIN_PHASE" ]; then
    printf '%s\tskipped (budget spent)\t0\t%s\n' "$name" "$box" >> "$PHASES"
    log "$name: skipped, ${left}s left"
    return 0
  fi
  log "$name: start (time box ${box}s)"
  local t0
  t0=$(date +%s)
  timeout -s INT -k 10 "$box" "$@" > "$LOGS/$name.log" 2>&1
  local rc=$?
  local wall=$(( $(date +%s) - t0 ))
  local status=ok
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then status="timed out"; elif [ "$rc" != 0 ]; then status="failed (exit $rc)"; fi
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$wall" "$box" >> "$PHASES"
  log "$name: $status after ${wall}s"
  if [ "$status" != ok ]; then tail -n 5 "$LOGS/$name.log" | sed 's/^/    /'; fi
  return 0
}

# ---------------------------------------------------------------- install
install_wheels() {
  rm -rf "$SITE" && mkdir -p "$SITE"
  ls .wheels/*.whl >/dev/null || { echo "no .wheels/*.whl: run scripts/gpu_wheels.sh on a machine with a package index"; return 1; }
  "$PY" -m pip install --no-deps --no-index --target "$SITE" .wheels/*.whl || return 1
  # The project: an isolated build whose backend (setuptools, wheel) comes from .wheels/build.
  "$PY" -m pip install --no-deps --no-index --find-links .wheels/build --target "$SITE" . || return 1
  "$PY" -c "import torch, deepspeed, ldb_ds; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__, 'ldb_ds', ldb_ds.__version__, 'cuda', torch.cuda.is_available())"
}
INSTALL_OK=1
if [ "$DRY" = 1 ]; then
  printf 'install\tskipped (dry run)\t0\t0\n' >> "$PHASES"
else
  export SITE PY
  run_phase install 90 bash -c "$(declare -f install_wheels); install_wheels"
  grep -q $'^install\tok' "$PHASES" || INSTALL_OK=0
fi

# ---------------------------------------------------------------- facts
run_phase facts 30 "$PY" scripts/gpu_summary.py facts "$OUT_DIR" --dry-run "$DRY"

if [ "$INSTALL_OK" = 0 ]; then
  for p in tests bench; do printf '%s\tskipped (install failed)\t0\t0\n' "$p" >> "$PHASES"; done
  "$PY" scripts/gpu_summary.py summarize "$OUT_DIR"
  exit 1
fi

# ---------------------------------------------------------------- tests
if [ -d tests/gpu ] && ls tests/gpu/test_*.py >/dev/null 2>&1; then
  if [ "$DRY" = 1 ]; then
    run_phase tests 120 "$PY" -m pytest -q -p no:cacheprovider tests/gpu --collect-only
  else
    run_phase tests 120 "$PY" -m pytest -q -p no:cacheprovider -rs tests/gpu --junitxml="$OUT_DIR/tests/junit.xml"
  fi
else
  printf 'tests\tskipped (no tests/gpu)\t0\t0\n' >> "$PHASES"
fi

# ---------------------------------------------------------------- bench
NOTE="One GPU: world size 1, where DeepSpeed skips the gradient reductions and all-gathers; these figures are compute and per-param-group launch costs, not communication."
if [ "$DRY" = 1 ]; then
  NOTE="Dry run on the CPU at tiny sizes (scripts/gpu_check.sh --dry-run): checks the commands, measures nothing."
  # Tiny stand-ins for batch 128 / 256, so the resnet entries keep their own batch sizes apart.
  declare -A BATCH=([128]=2 [256]=4)
  SIZE=(--img-size 16)
  STEP=(--warmup-rounds 0 --rounds 1 --steps-per-round 1 --byte-steps 1 --dw-reps 1)
  EPOCHS_OF() { echo --samples-per-rank $(( $1 * 2 )) --periods 1 --reps 1 --warmup-steps 1; }
  RUN_CAP=200
  DENSE_CAP=200
else
  declare -A BATCH=([128]=128 [256]=256)
  SIZE=(--img-size 32)
  STEP=(--warmup-rounds 1 --rounds 4 --steps-per-round 2 --byte-steps 1 --dw-reps 2)
  # 16 FULL steps per epoch; one schedule period (a FULL and a DROP epoch); two A/B pairs.
  EPOCHS_OF() { echo --samples-per-rank $(( $1 * 16 )) --periods 1 --reps 2 --warmup-steps 2; }
  RUN_CAP=60
  DENSE_CAP=75
fi
COMMON=(--precision bf16 --stem cifar --granularity module --no-tensorboard --note "$NOTE")

bench_run() {  # NAME MODES MODEL BATCH ZERO CAP
  local name=$1 modes=$2 model=$3 batch=${BATCH[$4]} zero=$5 cap=$6
  local -a epochs_args=()
  if [[ "$modes" == *epochs* ]]; then read -r -a epochs_args <<< "$(EPOCHS_OF "$batch")"; fi
  run_phase "bench-$name" "$cap" "$PY" -m ldb_ds.bench "$modes" --out "$OUT_DIR/bench/$name" --model "$model" \
    --batch-size "$batch" --zero-stage "$zero" "${SIZE[@]}" "${COMMON[@]}" "${STEP[@]}" "${epochs_args[@]}"
}

# Most important first, and every model, batch and stage early: what the time box cuts is the
# least needed.
#        name                     modes        model        batch zero cap
ENTRIES=(
  "resnet18-b128-zero2           step,epochs  resnet18     128   2"
  "densenet121-b128-zero2        step         densenet121  128   2"
  "resnet50-b256-zero2           step,epochs  resnet50     256   2"
  "resnet18-b128-zero0           step,epochs  resnet18     128   0"
  "resnet50-b128-zero2           step,epochs  resnet50     128   2"
  "resnet18-b256-zero2           step,epochs  resnet18     256   2"
  "resnet50-b256-zero0           step,epochs  resnet50     256   0"
  "resnet50-b128-zero0           step,epochs  resnet50     128   0"
  "resnet18-b256-zero0           step,epochs  resnet18     256   0"
)
DRY_ENTRIES="resnet18-b128-zero2 densenet121-b128-zero2 resnet50-b256-zero0"
for entry in "${ENTRIES[@]}"; do
  read -r name modes model batch zero <<< "$entry"
  if [ "$DRY" = 1 ] && [[ " $DRY_ENTRIES " != *" $name "* ]]; then continue; fi
  cap=$RUN_CAP
  if [[ "$model" == densenet* ]]; then cap=$DENSE_CAP; fi
  bench_run "$name" "$modes" "$model" "$batch" "$zero" "$cap"
done

# ---------------------------------------------------------------- summary
"$PY" scripts/gpu_summary.py summarize "$OUT_DIR"
log "done in $(( $(date +%s) - START ))s; summary: $OUT_DIR/summary.md"
# Non-zero when a phase failed (timed-out and skipped phases are reported, not failures).
! grep -q $'\tfailed' "$PHASES"
