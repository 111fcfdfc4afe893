#!/usr/bin/env python
"""Scaling sweep: baseline and LDB at several world sizes into one TensorBoard log root.

    python launch/sweep.py --log-root runs/sweep -- --model resnet10t --epochs 4

runs ``launch/train.py`` through the ``deepspeed`` launcher once per (config, world size), each as
``<log-root>/<config name>-ws<N>``, so ``tensorboard --logdir runs/sweep`` overlays them (the
``Run/world_size`` tag tells the curves apart). Arguments after ``--`` go to every train.py run.
Afterwards it writes ``summary.md`` and ``summary.csv`` into the log root:

* epoch time and training samples/s, averaged over the epochs after the first (warm-up), split
  by FULL and DROP epochs where LDB is on;
* speedup of each config over the first one (the baseline) at the same world size, as a ratio of
  mean training time per epoch (what the paper reports, but in wall-clock time with the device
  synchronised, evaluation excluded);
* scaling efficiency: samples/s at N ranks / (N x samples/s at the smallest world size);
* the final test top-1.

World sizes larger than the machine allows (GPUs, or CPU cores on ``DS_ACCELERATOR=cpu``) are
skipped with a note unless ``--oversubscribe``. On a CPU each rank gets cores / N threads, so the
sweep measures how one machine's cores are best split. Compare runs of one sweep only: same
machine, same time, same settings.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
if REPO not in sys.path:  # a checkout that was not pip-installed
    sys.path.insert(0, REPO)

from ldb_ds.process import free_port  # noqa: E402
from ldb_ds.schedule import Mode  # noqa: E402


def deepspeed_bin() -> str:
    """The deepspeed launcher of this Python environment (also when it is not on PATH)."""
    local = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    return local if os.path.exists(local) else "deepspeed"


def device_slots() -> tuple[int, str]:
    """How many ranks this machine can run without oversubscribing: GPUs, else CPU cores."""
    if os.environ.get("DS_ACCELERATOR", "") != "cpu":
        try:
            import torch

            if torch.cuda.is_available():
                return torch.cuda.device_count(), "GPUs"
        except ImportError:
            pass
    return os.cpu_count() or 1, "CPU cores"


def summarise(result: dict) -> dict:
    hist = result.get("history", [])
    steady = hist[1:] or hist  # leave out the first (warm-up) epoch when there are others

    def mean(rows, key):
        vals = [r[key] for r in rows if r.get(key) is not None]
        return sum(vals) / len(vals) if vals else float("nan")

    def mode(row):  # results.json holds the mode's value ("FULL"/"DROP")
        return Mode(row["mode_name"]) if row.get("mode_name") else None

    full = [r for r in steady if mode(r) is Mode.FULL]
    drop = [r for r in steady if mode(r) is Mode.DROP]
    return {
        "epoch_s": mean(steady, "epoch_s"), "train_s": mean(steady, "train_s"),
        "samples_per_sec": mean(steady, "samples_per_sec"),
        "full_samples_per_sec": mean(full, "samples_per_sec"),
        "drop_samples_per_sec": mean(drop, "samples_per_sec"),
        "top1": result.get("final_top1"), "epochs": len(hist),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--configs", nargs="+",
                    default=["ds_configs/zero2_baseline.json", "ds_configs/zero2_ldb.json"],
                    help="DeepSpeed configs; the first is the baseline for the speedup column")
    ap.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--log-root", default=os.path.join("runs", "sweep-" + time.strftime("%Y%m%d-%H%M%S")))
    ap.add_argument("--oversubscribe", action="store_true",
                    help="run world sizes larger than the machine's GPUs/cores anyway")
    ap.add_argument("--timeout", type=float, default=None, help="seconds per run")
    ap.add_argument("train_args", nargs=argparse.REMAINDER,
                    help="after --: arguments for every launch/train.py run")
    args = ap.parse_args()
    extra = [a for a in args.train_args if a != "--"]

    slots, what = device_slots()
    sizes = []
    for ws in args.world_sizes:
        if ws > slots and not args.oversubscribe:
            print(f"[sweep] skipping world size {ws}: this machine has {slots} {what} "
                  "(--oversubscribe to run it anyway)")
        else:
            sizes.append(ws)
    os.makedirs(args.log_root, exist_ok=True)
    rows = []
    for ws in sizes:
        for cfg in args.configs:
            name = os.path.splitext(os.path.basename(cfg))[0]
            exp = f"{name}-ws{ws}"
            env = dict(os.environ)
            if what == "CPU cores":
                env["OMP_NUM_THREADS"] = str(max(1, slots // ws))
            cmd = [deepspeed_bin(), "--num_gpus", str(ws), "--master_port", str(free_port()),
                   os.path.join(HERE, "train.py"), "--deepspeed_config", cfg,
                   "--output", args.log_root, "--experiment", exp, "--overwrite",
                   "--ckpt-every", "0", "--no-progress", *extra]
            print(f"[sweep] {' '.join(cmd)}", flush=True)
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, env=env, timeout=args.timeout)
            wall = time.perf_counter() - t0
            res_path = os.path.join(args.log_root, exp, "results.json")
            if proc.returncode != 0 or not os.path.isfile(res_path):
                print(f"[sweep] {exp} failed (exit code {proc.returncode})", flush=True)
                rows.append({"config": name, "world_size": ws, "status": f"failed ({proc.returncode})"})
                continue
            with open(res_path) as f:
                row = {"config": name, "world_size": ws, "status": "ok", "wall_s": wall,
                       **summarise(json.load(f))}
            rows.append(row)

    base_name = os.path.splitext(os.path.basename(args.configs[0]))[0]
    ok = [r for r in rows if r["status"] == "ok"]
    for r in ok:
        base = next((b for b in ok if b["config"] == base_name and b["world_size"] == r["world_size"]), None)
        # Training time only (evaluation is the same work in both runs and not what LDB changes).
        r["speedup_vs_baseline"] = base["train_s"] / r["train_s"] if base else float("nan")
        small = min((b for b in ok if b["config"] == r["config"]), key=lambda b: b["world_size"])
        r["scaling_efficiency"] = (r["samples_per_sec"] / (small["samples_per_sec"] * r["world_size"]
                                                           / small["world_size"]))
    cols = ["config", "world_size", "status", "epochs", "epoch_s", "train_s", "samples_per_sec",
            "full_samples_per_sec", "drop_samples_per_sec", "speedup_vs_baseline",
            "scaling_efficiency", "top1", "wall_s"]
    with open(os.path.join(args.log_root, "summary.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)

    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v if v is not None else "")

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    note = (f"\nMachine: {slots} {what}; extra train.py args: {' '.join(extra) or '(none)'}. "
            "Times are wall-clock means over the epochs after the first (epoch_s with evaluation, "
            "train_s without); speedup = baseline train_s / train_s at the same world size. "
            "Do not cap --max-steps-per-epoch when measuring speedup: a DROP epoch covers the "
            "data in fewer, larger steps.\n")
    table = "\n".join(lines) + "\n" + note
    with open(os.path.join(args.log_root, "summary.md"), "w") as f:
        f.write(table)
    print(table)
    print(f"[sweep] tensorboard --logdir {args.log_root}")
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
