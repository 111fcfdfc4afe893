"""``accuracy`` mode: the baseline and LDB trained for the same epochs on the bundled digits data.

Epochs interleaved baseline/LDB, a cosine learning rate over the run, both test accuracies after
every epoch (not timed), both training times and the speedup (the paper's Tables 1-2 in small).
"""

from __future__ import annotations

import math
from typing import Any

from ..schedule import epoch_mode
from .epochs import run_epoch
from .harness import BenchContext, barrier, close_engine, make_engine, make_model, result


def run_accuracy(ctx: BenchContext) -> dict[str, Any]:
    from torch.utils.data import DataLoader, Subset

    from ..workloads.data import ShardedEval, build_datasets
    from ..workloads.evaluation import validate

    opts, ep = ctx.opts, ctx.opts.epochs
    bundle = build_datasets("digits", img_size=opts.run.img_size)
    train = bundle.train if ep.acc_limit is None else Subset(bundle.train, range(min(ep.acc_limit, len(bundle.train))))
    init_model = make_model(opts, num_classes=bundle.num_classes)
    base = make_engine(opts, init_model, False, train)
    ldb = make_engine(opts, init_model, True, train)
    eval_loader = DataLoader(ShardedEval(bundle.test, ctx.rank, ctx.world_size), batch_size=2 * opts.run.batch_size)
    sides = (("baseline", base), ("ldb", ldb))
    base_lrs = {name: [g["lr"] for g in e.optimizer.param_groups] for name, (e, _) in sides}
    per_epoch: list[dict[str, Any]] = []
    totals, steps = {"baseline": 0.0, "ldb": 0.0}, {"baseline": 0, "ldb": 0}
    best = {"baseline": 0.0, "ldb": 0.0}
    cfg = ldb[0].ldb.config
    for epoch in range(ep.acc_epochs):
        scale = 0.5 * (1 + math.cos(math.pi * epoch / ep.acc_epochs))  # cosine, no warm-up
        row: dict[str, Any] = {"epoch": epoch, "mode": epoch_mode(epoch, cfg).value}
        order = list(sides)
        if epoch % 2:
            order.reverse()
        for name, (engine, loader) in order:
            for grp, lr0 in zip(engine.optimizer.param_groups, base_lrs[name]):
                grp["lr"] = lr0 * scale
            barrier(ctx)
            t, s, _ = run_epoch(ctx, engine, loader, epoch)
            totals[name] += t
            steps[name] += s
            row[f"{name}_s"] = t
        for name, (engine, _) in sides:
            top1 = validate(engine, eval_loader)["top1"]
            row[f"{name}_top1"] = top1
            best[name] = max(best[name], top1)
        per_epoch.append(row)
        ctx.log(f"accuracy: epoch {epoch} [{row['mode']}] baseline {row['baseline_top1']:.2f}% "
                f"({row['baseline_s']:.1f} s), LDB {row['ldb_top1']:.2f}% ({row['ldb_s']:.1f} s)")
    res = {"dataset": "digits", "train_size": len(train), "test_size": len(bundle.test), "epochs": ep.acc_epochs,
           "per_epoch": per_epoch, "speedup": 1 - totals["ldb"] / totals["baseline"],
           "baseline": {"final_top1": per_epoch[-1]["baseline_top1"], "best_top1": best["baseline"],
                        "train_s": totals["baseline"], "steps": steps["baseline"]},
           "ldb": {"final_top1": per_epoch[-1]["ldb_top1"], "best_top1": best["ldb"], "train_s": totals["ldb"],
                   "steps": steps["ldb"]}}
    notes = ["One run per side (accuracy varies with the seed by about a point on 360 test images); "
             "cosine learning rate over the run, LDB's DROP epochs scale it by kappa."]
    out = result(ctx, "accuracy", res, ldb[0], init_model, notes)
    close_engine(base)
    close_engine(ldb)
    return out


__all__ = ["run_accuracy"]
