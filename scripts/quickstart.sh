#!/usr/bin/env bash
# Set up (scripts/setup.sh), then the main job: a small timm model (MobileNetV2-0.5) trained with
# LayerDropBack at ZeRO-2 on 2 CPU ranks on the bundled digits data (no download), 10 epochs,
# a few minutes on 2 cores. TensorBoard logs go to runs/; view them with
#   .venv/bin/tensorboard --logdir runs
# Extra arguments are passed to launch/train.py (e.g. --epochs 4, --model resnet10t).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
# No GPU here: DeepSpeed's CPU accelerator with gloo; one thread per rank (docs/design.md, section 5).
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1
fi
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.torch_extensions}"
exec deepspeed --num_gpus 2 launch/train.py --deepspeed_config ds_configs/zero2_ldb.json \
  --model mobilenetv2_050 --epochs 10 --output runs --overwrite "$@"
