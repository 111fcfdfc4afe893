"""Where LDB FULL's host time per unit goes, against LDB off: one cell of ``ldb-bench host``, profiled.

``ldb-bench host`` says *how much* (FULL - off) / N costs; this says *where*. It builds the host
benchmark's model (N x Linear(8, 8) + ReLU, every Linear one LDB unit) and config twice, LDB off and
LDB FULL, runs them interleaved, and reports on one rank:

1. per phase (forward, backward = ``engine.backward``, step = ``engine.step``), the median thread CPU
   time (``time.thread_time``: the host work, other jobs' turns on the cores left out) and
   (FULL - off) / N in microseconds;
2. per function, from cProfile with the thread CPU clock over the same phases, the functions whose
   own time (tottime) differs most between FULL and off, per step and unit. cProfile adds its own
   cost per call, so read the ranking and the call counts, and phase 1 for the amounts.

::

    DS_ACCELERATOR=cpu python scripts/host_profile.py --units 200 --stage 2 --precision fp32 --optimizer sgd

docs/benchmark.md (the host benchmark's section) has a measured run and what it shows.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PHASES = ("forward", "backward", "step")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--units", type=int, default=200, help="N, the number of Linear units (200)")
    p.add_argument("--stage", type=int, choices=(0, 1, 2, 3), default=2, help="ZeRO stage (2)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="(fp32)")
    p.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd", help="torch, foreach=True (sgd)")
    p.add_argument("--steps", type=int, default=40, help="timed steps per variant, interleaved (40)")
    p.add_argument("--top", type=int, default=15, help="functions listed per phase (15)")
    a = p.parse_args(argv)
    if a.units < 3 or a.steps < 1 or a.top < 1:
        p.error("--units must be at least 3 (keep_first and keep_last are 1), --steps and --top at least 1")
    return a


def build(args: argparse.Namespace) -> dict:
    """LDB off and LDB FULL over copies of the host benchmark's model and cell config (``bench.host``)."""
    import ldb_ds
    from ldb_ds.bench.bench_options import HostOptions
    from ldb_ds.bench.host import LDB_SECTION, cell_config, make_model

    cell = HostOptions()  # the benchmark's defaults: width and batch
    engines = {}
    for name, enabled in (("off", False), ("full", True)):
        model = make_model(args.units, cell.host_width, seed=0)
        if args.precision == "bf16":
            model = model.bfloat16()
        config = cell_config(cell.host_batch, args.stage, args.precision, args.optimizer, {**LDB_SECTION, "enabled": enabled})
        engines[name], _, _, _ = ldb_ds.initialize(model=model, model_parameters=list(model.parameters()),
                                                   config=config)
        engines[name].set_epoch(0)  # epoch 0 is a FULL epoch: LDB FULL against LDB off
    return engines


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    from ldb_ds.process import init_process, input_dtype, teardown

    init_process(threads=1)
    import torch
    import torch.nn.functional as F

    engines = build(args)
    g = torch.Generator().manual_seed(0)
    first = engines["off"]
    batch, width = first.micro_batch_size, first.module[0].in_features
    x = torch.randn(batch, width, generator=g).to(first.device, input_dtype(first))
    y = torch.randn(batch, width, generator=g).to(first.device)
    times = {v: {p: [] for p in PHASES} for v in engines}
    profiles = {v: {p: cProfile.Profile(time.thread_time) for p in ("backward", "step")} for v in engines}

    def one_step(variant: str, profile: bool) -> None:
        engine = engines[variant]
        marks = [time.thread_time()]
        loss = F.mse_loss(engine(x).float(), y)
        marks.append(time.thread_time())
        for phase, run in (("backward", lambda: engine.backward(loss)), ("step", engine.step)):
            prof = profiles[variant][phase] if profile else None
            if prof:
                prof.enable()
            run()
            if prof:
                prof.disable()
            marks.append(time.thread_time())
        if not profile:
            for i, phase in enumerate(PHASES):
                times[variant][phase].append(marks[i + 1] - marks[i])

    for _ in range(5):  # warm-up: optimizer state, buffers
        for v in engines:
            one_step(v, profile=False)
    for v in engines:
        for p in PHASES:
            times[v][p].clear()
    for _ in range(args.steps):  # timed, interleaved so both see the same machine
        for v in engines:
            one_step(v, profile=False)
    for _ in range(args.steps):  # profiled apart: cProfile's cost would inflate the times above
        for v in engines:
            one_step(v, profile=True)
    teardown(*engines.values())

    n = args.units
    print(f"ZeRO-{args.stage} {args.precision} {args.optimizer}, N = {n}, {args.steps} steps per variant; "
          f"thread CPU time per step (median), rank 0")
    print(f"{'phase':<9} {'off ms':>8} {'full ms':>8} {'(full-off)/N us':>16}")
    for p in PHASES:
        off, full = (statistics.median(times[v][p]) * 1e3 for v in ("off", "full"))
        print(f"{p:<9} {off:8.3f} {full:8.3f} {(full - off) / n * 1e3:16.2f}")
    for p in ("backward", "step"):
        stats = {v: pstats.Stats(profiles[v][p]).stats for v in engines}
        keys = set(stats["off"]) | set(stats["full"])

        def own(v: str, k: tuple) -> tuple[int, float]:
            cc, nc, tt, ct, callers = stats[v].get(k, (0, 0, 0.0, 0.0, {}))
            return nc, tt

        ranked = sorted(keys, key=lambda k: own("full", k)[1] - own("off", k)[1], reverse=True)
        # The costliest in FULL first, then the few where FULL is cheaper: ldb_ds's replacement of a
        # DeepSpeed function shows up as a gain there and a cost here.
        rows = ranked[:args.top] + ranked[-max(3, args.top // 4):]
        print(f"\n{p}: functions by (full - off) own time, per step and unit (cProfile, thread CPU); "
              f"the last rows: where FULL is cheaper")
        print(f"{'us/unit':>8} {'calls/step off':>15} {'full':>6}  function")
        for k in rows:
            (nc_off, tt_off), (nc_full, tt_full) = own("off", k), own("full", k)
            where = f"{os.path.relpath(k[0]) if k[0].startswith('/') else k[0]}:{k[1]}({k[2]})"
            print(f"{(tt_full - tt_off) / args.steps / n * 1e6:8.2f} {nc_off / args.steps:15.0f} "
                  f"{nc_full / args.steps:6.0f}  {where[-110:]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
