"""Test-session environment: DeepSpeed on the CPU with gloo, one thread per rank.

Set before anything imports DeepSpeed, and inherited by every process the
tests start (spawned ranks, the deepspeed launcher, mpirun).
"""

import os
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# Two ranks on two cores: more threads per rank makes steps erratic (docs/design.md, section 5).
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Build DeepSpeed's C++ ops once per checkout, not once per test.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions"))
