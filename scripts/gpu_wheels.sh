#!/usr/bin/env bash
# Prepare, HERE (a machine with a package registry), the wheels that the GPU machine lacks.
#
# The GPU machine (issue 8, item 9; docs: docs/benchmark.md, GPU section) has Python 3.12 and torch 2.11 with
# timm, tensorboard, tqdm, pyyaml, matplotlib, scikit-learn, numpy, but no network and none of
# DeepSpeed, its pure-Python dependencies, or pytest. This script puts them, for CPython 3.12
# manylinux x86_64 and without their dependencies (--no-deps), into .wheels/ (git-ignored; it
# travels with the working tree), then checks the set: it installs into a scratch Python 3.12
# venv with --no-deps, every requirement of every wheel is met by the set or by the image, and
# the torch-free modules import. scripts/gpu_check.sh installs them there.
#
#   bash scripts/gpu_wheels.sh            # about 8 MB; re-running replaces .wheels/
#   PYTHON=/path/to/python bash scripts/gpu_wheels.sh   # the pip to use (default: .venv, else python3)
#   PYTHON312=/path/to/python3.12 ...     # the interpreter for the scratch-venv check
#
# Versions: DeepSpeed is the release ldb_ds's hooks were verified on; the others are the versions
# this project's test environment runs with it.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
OUT_DIR=.wheels
BUILD_DIR=$OUT_DIR/build   # build backend for `pip install .` there (isolated build, no index)

# DeepSpeed's runtime requirements (einops hjson msgpack ninja numpy packaging psutil py-cpuinfo
# pydantic torch tqdm) less what the image has (numpy torch tqdm); pydantic's own; and pytest's.
# packaging, psutil and typing-extensions may be in the image already, but pytest needs
# packaging>=24 and pydantic typing-extensions>=4.16: the newer copies shadow the image's.
BINARY=(
  pydantic-core==2.50.5
  msgpack==1.2.4
  psutil==7.2.2
  ninja==1.13.2
)
PURE=(
  hjson==3.1.0
  pydantic==2.14.4
  annotated-types==0.8.0
  typing-inspection==0.4.5
  typing-extensions==4.16.0
  py-cpuinfo==9.0.0
  einops==0.8.2
  packaging==26.4
  pytest==9.2.0
  pluggy==1.7.0
  iniconfig==2.3.1
  pygments==2.21.0
)
BUILD=(setuptools==80.9.0 wheel==0.45.1)
DEEPSPEED=deepspeed==0.19.8
# Requirements the image satisfies (checked by name only: the image's versions are its own).
IMAGE_HAS="torch numpy tqdm"

rm -rf "$OUT_DIR"
mkdir -p "$OUT_DIR" "$BUILD_DIR"
target=(--python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
        --platform manylinux_2_12_x86_64 --platform manylinux2010_x86_64 --platform any)
echo "[gpu_wheels] downloading ${#BINARY[@]} binary and ${#PURE[@]} pure-Python wheels for cp312 manylinux x86_64"
"$PY" -m pip download -q --no-deps --only-binary=:all: "${target[@]}" -d "$OUT_DIR" "${BINARY[@]}" "${PURE[@]}"
"$PY" -m pip download -q --no-deps --only-binary=:all: "${target[@]}" -d "$BUILD_DIR" "${BUILD[@]}"
# DeepSpeed is an sdist only. DS_BUILD_OPS=0: no op is compiled into it (ops are JIT-built on
# first use, and ldb_ds's GPU check uses none); the wheel is pure Python, any platform.
echo "[gpu_wheels] building $DEEPSPEED (pure-Python wheel from the sdist)"
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps "$DEEPSPEED" -w "$OUT_DIR"
ls "$OUT_DIR"/deepspeed-*-py3-none-any.whl >/dev/null

# ---- check the set in a scratch Python 3.12 venv (no index, no deps)
PY312=${PYTHON312:-}
if [ -z "$PY312" ]; then
  for cand in python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python3.12 /usr/bin/python3.12 /usr/local/bin/python3.12; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
      PY312=$(command -v "$cand"); break
    fi
  done
fi
if [ -z "$PY312" ]; then
  echo "[gpu_wheels] no Python 3.12 here: checking with pip's cross-platform install instead"
  scratch=$(mktemp -d)
  "$PY" -m pip install -q --no-deps --no-index --only-binary=:all: "${target[@]}" --target "$scratch/site" "$OUT_DIR"/*.whl
  rm -rf "$scratch"
else
  scratch=$(mktemp -d)
  trap 'rm -rf "$scratch"' EXIT
  "$PY312" -m venv "$scratch/venv"
  "$scratch/venv/bin/python" -m pip install -q --no-deps --no-index "$OUT_DIR"/*.whl
  IMAGE_HAS="$IMAGE_HAS" "$scratch/venv/bin/python" - <<'PY'
import importlib, importlib.metadata as md, os, sys
from pip._vendor.packaging.requirements import Requirement
from pip._vendor.packaging.utils import canonicalize_name

have = {canonicalize_name(d.metadata["Name"]): d.version for d in md.distributions()}
image = {canonicalize_name(n) for n in os.environ["IMAGE_HAS"].split()}
missing = []
for dist in md.distributions():
    for text in dist.requires or []:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue  # an extra, or another platform / Python
        name = canonicalize_name(req.name)
        if name in image:
            continue
        if name not in have or not req.specifier.contains(have[name], prereleases=True):
            missing.append(f"{dist.metadata['Name']} needs {text} (have: {have.get(name, 'nothing')})")
if missing:
    sys.exit("[gpu_wheels] the set is incomplete:\n  " + "\n  ".join(missing))
for mod in ("pydantic", "pydantic_core", "hjson", "msgpack", "psutil", "ninja", "cpuinfo", "einops",
            "packaging", "typing_extensions", "typing_inspection", "annotated_types", "pytest", "pygments"):
    importlib.import_module(mod)
print(f"[gpu_wheels] scratch venv (Python {sys.version.split()[0]}): {len(have)} distributions installed with "
      "--no-deps; every requirement met by the set or by the image (" + os.environ["IMAGE_HAS"] + "); imports ok")
PY
fi
du -sh "$OUT_DIR" | awk '{print "[gpu_wheels] " $1 " in .wheels/"}'
ls -1 "$OUT_DIR" "$BUILD_DIR"
