"""``scaling`` mode: launch ``step,epochs`` at each world size and merge speedup against world size.

Each world size is a separate launch (the deepspeed launcher or torchrun) with the same per-rank
batch and epoch size (weak scaling), writing into ``<out>/ws<N>``; the driver then merges the
results (paper, Table 3). The driver itself starts no process group.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import subprocess
import sys
from typing import Any, Sequence

from ..process import free_port
from . import report as rep
from .bench_options import BenchOptions, ScalingOptions, flag_of
from .harness import SHARED_NOTE, command_line

SCALING_ONLY = (*(flag_of(f.name) for f in dataclasses.fields(ScalingOptions)), "--out")
"""The driver's own options (each takes a value), not passed on to the launched runs."""
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
"""The directory holding the ``ldb_ds`` package: the launched ranks import this copy."""


def strip_options(argv: Sequence[str], names: Sequence[str], mode: str = "scaling") -> list[str]:
    """``argv`` without the positional ``mode`` and the options ``names`` (``--opt v`` and ``--opt=v``)."""
    out, skip, mode_seen = [], False, False
    for a in argv:
        if skip:
            skip = False
        elif a in names:
            skip = True
        elif any(a.startswith(n + "=") for n in names):
            pass
        elif a == mode and not mode_seen:
            mode_seen = True
        else:
            out.append(a)
    return out


def launch_command(sc: ScalingOptions, ws: int, modes: str, rest: list[str], out: str) -> list[str]:
    bin_dir = os.path.dirname(sys.executable)
    port = str(free_port())
    extra = shlex.split(sc.launcher_args)
    if sc.launcher == "deepspeed":
        exe = os.path.join(bin_dir, "deepspeed")
        exe = exe if os.path.exists(exe) else "deepspeed"
        head = [exe, "--num_gpus", str(ws), "--master_port", port, *extra, "--module", "ldb_ds.bench"]
    else:
        exe = os.path.join(bin_dir, "torchrun")
        exe = exe if os.path.exists(exe) else "torchrun"
        head = [exe, "--nproc_per_node", str(ws), "--master_port", port, *extra, "-m", "ldb_ds.bench"]
    return head + [modes, *rest, "--out", out]


def run_scaling(opts: BenchOptions, argv: list[str]) -> dict[str, Any]:
    sc = opts.scaling
    rest = strip_options(argv, SCALING_ONLY)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # the deepspeed launcher does not set it (docs/design.md, section 5)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    runs = {}
    for ws in sc.world_sizes:
        out = os.path.join(opts.output.out, f"ws{ws}")
        cmd = launch_command(sc, ws, sc.scaling_modes, rest, out)
        print(f"[bench] scaling: {' '.join(shlex.quote(c) for c in cmd)}", flush=True)
        proc = subprocess.run(cmd, env=env, cwd=os.getcwd())
        if proc.returncode != 0:
            raise SystemExit(f"scaling: world size {ws} failed with exit code {proc.returncode}")
        runs[ws] = out
    return merge_scaling(runs, command_line(argv))


def merge_scaling(runs: dict[int, str], command: str) -> dict[str, Any]:
    rows, cond = [], None
    for ws, out in sorted(runs.items()):
        row: dict[str, Any] = {"world_size": ws, "dir": out}
        ep_path, st_path = os.path.join(out, "epochs.json"), os.path.join(out, "step.json")
        if os.path.exists(ep_path):
            ep = rep.read_json(ep_path)
            cond = ep["conditions"]
            r = ep["results"]
            row.update(speedup=r["speedup"], baseline_s=r["baseline_s"], ldb_s=r["ldb_s"],
                       drop_over_full_epoch=r["drop_over_full_epoch"])
        if os.path.exists(st_path):
            st = rep.read_json(st_path)
            cond = cond or st["conditions"]
            k, b = st["results"]["key_figures"], st["results"]["bytes"]
            row.update(drop_over_oracle=k["drop_over_oracle"]["median"], drop_over_full_step=k["drop_over_full_measured"],
                       bytes_full=b["full_counted"], bytes_drop_mean=b["drop_counted_mean"])
        row.setdefault("speedup", rep.stats([]))
        row.setdefault("baseline_s", rep.stats([]))
        row.setdefault("ldb_s", rep.stats([]))
        rows.append(row)
    cond = dict(cond or {})
    cond.update(world_size=",".join(str(ws) for ws in sorted(runs)), command=command, mode="scaling")
    notes = ["Each world size is a separate launch with the same per-rank batch and per-rank epoch size "
             "(weak scaling). The paper's Table 3 is MobileNetV2 on CIFAR-100 on GPUs."]
    if cond.get("accelerator") == "cpu":
        notes.append(SHARED_NOTE)
    return {"schema": rep.SCHEMA, "mode": "scaling", "conditions": cond,
            "results": {"rows": rows, "paper": {str(k): v for k, v in rep.PAPER["table3_scaling"].items()}},
            "notes": notes}


__all__ = ["SCALING_ONLY", "strip_options", "launch_command", "run_scaling", "merge_scaling"]
