#!/usr/bin/env bash
# The prepared GPU check, second version (issue 16, item 4): one script, one GPU, at most 6 minutes.
#
#   bash scripts/gpu_wheels.sh                  # here, once: the wheels the GPU machine lacks
#   OUT=/dir bash scripts/gpu_check.sh          # on the GPU machine, in the repository root
#   bash scripts/gpu_check.sh --dry-run         # here, on the CPU, tiny sizes, no install (.venv's python)
#
# Options: --dry-run, --budget SECONDS (wall-clock budget of the whole script, packing included;
# default 330, which leaves a margin under 6 minutes: give the device call a hard limit of at least
# budget + 30 s), --out DIR (default: $OUT, else ./gpu_check_out).
#
# What comes back: exactly three files in OUT, because the device call returns only a few files:
#   summary.md, summary.json   one line per cell with the GPU targets (scripts/gpu_summary.py)
#   gpu_check.tar.gz           everything else: logs, facts, junit, every run's JSON/md/png
# Intermediate files go to a scratch folder (${TMPDIR:-/tmp}/gpu_check_work.XXXXXX), never to OUT.
#
# Phases, most important first, each time-boxed (SIGINT at its box, SIGKILL 10 s later) and each
# writing its results as it goes, so a phase cut short leaves what it had and the summary says so:
#   install  .wheels/*.whl, then the project, --no-deps and no index, into a private site directory
#            on PYTHONPATH: the image's torch (and its whole environment) is used as it is
#   facts    the card (nvidia-smi), date, torch / CUDA / DeepSpeed versions          -> facts.json
#   tests    pytest tests/gpu, parity file first (after the batched-step rewrite these are the
#            only exactness check on a GPU)                                           -> tests/junit.xml
#   paper    the paper's settings, bf16, synthetic data, 224 px, batch 64: ViT-B/16 ZeRO-2,
#            ResNet-50 (ImageNet stem) ZeRO-2, ViT-B/16 ZeRO-3; per cell one process running
#            `ldb-bench step,epochs`                                                  -> bench/<cell>/
#   host     `ldb-bench host --host-units 50,200`: per-step host work per unit       -> host/
#   cifar    the 32 px cells of the first GPU run (resnet18/resnet50, CIFAR stem), as time allows
#   summary  summary.md / summary.json, then the tarball. Also on SIGINT/SIGTERM/SIGHUP: the running
#            phase is stopped, recorded as interrupted, and the summary and tarball are still written.
#
# One GPU is world size 1: DeepSpeed skips the gradient reductions and all-gathers, so the run
# measures compute and per-param-group launch costs, not communication (stated in every table).
# The dry run takes every phase's commands with tiny sizes on DeepSpeed's CPU accelerator (the
# 224 px cells with vit_tiny / resnet50 at 32 px, one of the 32 px cells, the host mode on one
# small cell), and only collects
# tests/gpu (they need a GPU). tests/app/test_gpu_check.py runs it in the test suite.
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
    -h|--help) sed -n '2,36p' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
if [ -z "$BUDGET" ]; then
  if [ "$DRY" = 1 ]; then BUDGET=600; else BUDGET=330; fi
fi
START=$(date +%s)
DEADLINE=$((START + BUDGET))
# Kept for the end: a phase killed at its box may need the 10 s SIGKILL grace, then the summary
# (standard-library Python, < 1 s) and the tarball (a few MB).
RESERVE=20
MIN_PHASE=15     # a phase with less time left than this is skipped, not started

mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_work.XXXXXX")
LOGS=$WORK/logs
PHASES=$WORK/phases.tsv
mkdir -p "$LOGS" "$WORK/bench" "$WORK/tests"
: > "$PHASES"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

if [ "$DRY" = 1 ]; then
  # Here: the project's virtualenv (scripts/setup.sh) when there is one, as launch/mpirun.sh does;
  # PYTHON=... overrides. (On the GPU machine the image's python3 is the point.)
  if [ -z "${PYTHON:-}" ] && [ -x "$ROOT/.venv/bin/python" ]; then PY=$ROOT/.venv/bin/python; fi
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

# ---------------------------------------------------------------- the end, also on a signal
FINISHED=0
finish() {  # summary and tarball into OUT; runs once, whatever happened before
  [ "$FINISHED" = 1 ] && return 0
  FINISHED=1
  "$PY" scripts/gpu_summary.py summarize "$WORK" > "$LOGS/summary.log" 2>&1 \
    || echo "gpu_summary.py failed: see logs/summary.log in the tarball" | tee -a "$WORK/summary.md"
  # Only the summary and the tarball go to OUT (the device call returns a handful of files).
  cp "$WORK/summary.md" "$OUT_DIR/summary.md" 2>/dev/null || echo "no summary (see the tarball)" > "$OUT_DIR/summary.md"
  cp "$WORK/summary.json" "$OUT_DIR/summary.json" 2>/dev/null || echo '{"error": "no summary"}' > "$OUT_DIR/summary.json"
  if tar -czf "$OUT_DIR/gpu_check.tar.gz.part" -C "$WORK" . && mv "$OUT_DIR/gpu_check.tar.gz.part" "$OUT_DIR/gpu_check.tar.gz"; then
    rm -rf "$WORK"
  else
    rm -f "$OUT_DIR/gpu_check.tar.gz.part"
    log "packing failed; the files stay in $WORK"
  fi
  # The one-line-per-cell summary on stdout too: the device call returns the output's tail.
  sed -n '/^## Cells/,/^## Phases/p' "$OUT_DIR/summary.md" | grep -v '^## Phases'
  log "done in $(( $(date +%s) - START ))s: $OUT_DIR/{summary.md,summary.json,gpu_check.tar.gz}"
}

PHASE_NAME=""   # the running phase, for the signal handler
on_signal() {  # $1: the signal. Stop the running phase, record it, then still summarise and pack.
  trap '' INT TERM HUP
  log "received SIG$1: stopping ${PHASE_NAME:-nothing}, then summary and tarball"
  # The running phase is this script's only background job (also when the signal came between its
  # start and the recording of its pid). timeout forwards the signal to its command's process
  # group and SIGKILLs it 10 s later (-k).
  local pid
  for pid in $(jobs -p); do kill -INT "$pid" 2>/dev/null; done
  wait 2>/dev/null
  if [ -n "$PHASE_NAME" ]; then
    printf '%s\tinterrupted (SIG%s)\t%s\t%s\n' "$PHASE_NAME" "$1" "$(( $(date +%s) - PHASE_T0 ))" "$PHASE_BOX" >> "$PHASES"
  fi
  finish
  exit 130
}
trap 'on_signal INT' INT
trap 'on_signal TERM' TERM
trap 'on_signal HUP' HUP

# run_phase NAME CAP_SECONDS COMMAND...: time-boxed, logged, recorded as one line of phases.tsv:
# name, status, wall seconds, time box. The command runs in the background and the shell waits on
# it, so that a signal to this script is handled at once (bash defers traps until a foreground
# child ends).
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
  PHASE_T0=$(date +%s) PHASE_BOX=$box PHASE_NAME=$name
  timeout -s INT -k 10 "$box" "$@" > "$LOGS/$name.log" 2>&1 < /dev/null &
  local pid=$!
  log "$name: start (time box ${box}s)"
  wait "$pid"
  local rc=$?
  PHASE_NAME=""
  local wall=$(( $(date +%s) - PHASE_T0 ))
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
  "$PY" -c "import torch, deepspeed, ldb_ds, timm; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__, 'ldb_ds', ldb_ds.__version__, 'timm', timm.__version__, 'cuda', torch.cuda.is_available())"
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
run_phase facts 30 "$PY" scripts/gpu_summary.py facts "$WORK" --dry-run "$DRY"

if [ "$INSTALL_OK" = 0 ]; then
  printf 'everything else\tskipped (install failed)\t0\t0\n' >> "$PHASES"
  finish
  exit 1
fi

# ---------------------------------------------------------------- tests
# The parity file first: if the box cuts the run, the exactness check is what was kept (pytest
# writes the junit file of the tests done so far when interrupted). --durations: what each took.
GPU_TESTS=(tests/gpu/test_ws1_parity.py tests/gpu/test_ws1_fp16_overflow.py)
for f in tests/gpu/test_*.py; do [[ " ${GPU_TESTS[*]} " == *" $f "* ]] || GPU_TESTS+=("$f"); done
if [ "$DRY" = 1 ]; then
  run_phase tests 75 "$PY" -m pytest -q -p no:cacheprovider "${GPU_TESTS[@]}" --collect-only
else
  run_phase tests 75 "$PY" -m pytest -q -p no:cacheprovider -rs --durations=0 "${GPU_TESTS[@]}" \
    --junitxml="$WORK/tests/junit.xml"
fi

# ---------------------------------------------------------------- benchmark cells
NOTE="One GPU: world size 1, where DeepSpeed skips the gradient reductions and all-gathers; these figures are compute and per-param-group launch costs, not communication."
if [ "$DRY" = 1 ]; then
  NOTE="Dry run on the CPU at tiny sizes (scripts/gpu_check.sh --dry-run): checks the commands, measures nothing."
  # Tiny stand-ins: the ViT-B/16 is a ViT-Ti/16, 224 px is 32 px (2x2 patches), batches are 2-4.
  declare -A MODEL=([vit_base_patch16_224]=vit_tiny_patch16_224 [resnet50]=resnet50 [resnet18]=resnet18)
  declare -A BATCH=([64]=2 [128]=2 [256]=4)
  declare -A IMG=([224]=32 [32]=16)
  STEP_OF() { echo --warmup-rounds 0 --rounds 1 --steps-per-round 1 --byte-steps 1 --dw-reps 1; }
  EPOCHS_OF() { echo --samples-per-rank $(( $1 * 2 )) --periods 1 --reps 1 --warmup-steps 1 --loader-workers 1; }
  # The host mode's own call, on one small cell (its full grid is 32 cells of 3-8 s each on a CPU).
  HOST_ARGS=(--host-units 4,6 --host-stages 2 --host-precisions bf16 --host-optimizers sgd --host-rounds 1)
  PAPER_CAP=90; CIFAR_CAP=90; HOST_CAP=60
else
  declare -A MODEL=([vit_base_patch16_224]=vit_base_patch16_224 [resnet50]=resnet50 [resnet18]=resnet18)
  declare -A BATCH=([64]=64 [128]=128 [256]=256)
  declare -A IMG=([224]=224 [32]=32)
  # Sizes per cell, from the first GPU run's step times (ViT-B/16 b64: ~85 ms at ZeRO-2, ~280 ms at
  # ZeRO-3; ResNet-50 224 px b64 ~80 ms): each 224 px cell ~50-60 s on an H200, start-up included.
  # STEP_OF ZERO / EPOCHS_OF BATCH ZERO: 12 FULL steps per epoch and 6 A/B pairs at ZeRO-2 (6 and
  # 3 at ZeRO-3, 3.4x slower) - the IQR of the speedup over the pairs is what the reps buy.
  STEP_OF() {
    if [ "$1" = 3 ]; then echo --warmup-rounds 1 --rounds 3 --steps-per-round 2 --byte-steps 1 --dw-reps 2
    else echo --warmup-rounds 1 --rounds 5 --steps-per-round 2 --byte-steps 1 --dw-reps 2; fi
  }
  EPOCHS_OF() {
    if [ "$2" = 3 ]; then echo --samples-per-rank $(( $1 * 6 )) --periods 1 --reps 3 --warmup-steps 2 --loader-workers "$LOADER_WORKERS"
    else echo --samples-per-rank $(( $1 * 12 )) --periods 1 --reps 6 --warmup-steps 2 --loader-workers "$LOADER_WORKERS"; fi
  }
  # 4 loader workers: in the first GPU runs the main process collated and pinned each 224 px batch
  # between steps (about 30 ms per batch of 64 against a 77 ms step, and as noisy as the host): the
  # FULL-epoch ratio measured the loader as much as LDB. Workers take that off the step's path, as
  # in a GPU training loop; the summary still reports each side's wait for the loader. Workers hand
  # batches over in /dev/shm (4 workers x 2 prefetched x a 77 MB DROP batch): where it has less than
  # 2 GiB free (a container's default is 64 MiB) the main process loads, as before, and the summary
  # says 0 workers.
  SHM_FREE_MB=$(df -Pm /dev/shm 2>/dev/null | awk 'NR == 2 {print $4}')
  LOADER_WORKERS=4
  if ! [[ "$SHM_FREE_MB" =~ ^[0-9]+$ ]] || [ "$SHM_FREE_MB" -lt 2048 ]; then LOADER_WORKERS=0; fi
  log "loader workers: $LOADER_WORKERS (/dev/shm free: ${SHM_FREE_MB:-unknown} MiB)"
  # The host mode runs every cell at N = 50 first (3.6-10 s each on the H200: all 8 fit the box),
  # then N = 200, the N of its targets, as time allows (15-35 s per cell there), each cell written
  # as it ends. bf16: the precision a GPU trains in.
  HOST_ARGS=(--host-units 50,200 --host-precisions bf16)
  PAPER_CAP=70; CIFAR_CAP=50; HOST_CAP=60
fi
COMMON=(--precision bf16 --granularity module --no-tensorboard --note "$NOTE")

bench_cell() {  # NAME MODEL IMG STEM BATCH ZERO CAP: one process, `step` then `epochs` (each written when done)
  local name=$1 model=${MODEL[$2]} img=${IMG[$3]} stem=$4 batch=${BATCH[$5]} zero=$6 cap=$7
  local -a step_args epochs_args
  read -r -a step_args <<< "$(STEP_OF "$zero")"
  read -r -a epochs_args <<< "$(EPOCHS_OF "$batch" "$zero")"
  run_phase "bench-$name" "$cap" "$PY" -m ldb_ds.bench step,epochs --out "$WORK/bench/$name" --model "$model" \
    --img-size "$img" --stem "$stem" --batch-size "$batch" --zero-stage "$zero" "${COMMON[@]}" \
    "${step_args[@]}" "${epochs_args[@]}"
}

# The paper's settings (the 224 px ZeRO-2 cells carry the end-to-end target; names matter to the summary).
#          name                    model                 img  stem      batch zero
bench_cell vit_b16-224-b64-zero2   vit_base_patch16_224  224  original  64    2  "$PAPER_CAP"
bench_cell resnet50-224-b64-zero2  resnet50              224  original  64    2  "$PAPER_CAP"
bench_cell vit_b16-224-b64-zero3   vit_base_patch16_224  224  original  64    3  $((PAPER_CAP + 5))

# ---------------------------------------------------------------- host work per unit
# The host-overhead benchmark (issue 16, item 1). Called exactly so; where the mode does not exist
# yet this phase is reported as failed and the check goes on.
mkdir -p "$WORK/host"
run_phase host "$HOST_CAP" "$PY" -m ldb_ds.bench host --out "$WORK/host" "${HOST_ARGS[@]}"

# ---------------------------------------------------------------- the 32 px cells, as time allows
# The first GPU run's list (CIFAR stem), in its table's order; the dry run takes one of them (the
# others differ only in their numbers).
CIFAR_CELLS=(
  "resnet18-32-b128-zero0  resnet18  128  0"
  "resnet18-32-b128-zero2  resnet18  128  2"
  "resnet50-32-b128-zero0  resnet50  128  0"
  "resnet50-32-b256-zero2  resnet50  256  2"
)
DRY_CIFAR="resnet18-32-b128-zero2"
for entry in "${CIFAR_CELLS[@]}"; do
  read -r name model batch zero <<< "$entry"
  if [ "$DRY" = 1 ] && [[ " $DRY_CIFAR " != *" $name "* ]]; then continue; fi
  bench_cell "$name" "$model" 32 cifar "$batch" "$zero" "$CIFAR_CAP"
done

# ---------------------------------------------------------------- summary and tarball
trap '' INT TERM HUP
# Non-zero when a phase failed (timed-out and skipped phases are reported, not failures).
FAILED=0
grep -q $'\tfailed' "$PHASES" && FAILED=1
finish
exit "$FAILED"
