"""``epochs`` and the sweeps: end-to-end schedule time of the baseline and LDB, whole epochs.

The baseline and LDB each train the same whole epochs (steady state: epochs 1 .. periods*s, i.e.
whole schedule periods), alternating A/B/B/A, repeated. Speedup = 1 - T_ldb / T_baseline (the
paper's definition), paired per repetition. ``sweep-drop-rate`` / ``sweep-sampling-rate`` run this
for each drop rate (paper, Figure 3) / sampling rate (paper, Table 4).
"""

from __future__ import annotations

import time
from typing import Any

from ..process import batch_to_device, input_dtype, synchronize
from ..schedule import Mode, epoch_mode, first_drop_epoch
from . import report as rep
from .harness import BenchContext, barrier, close_engine, ldb_section, make_engine, make_model, result


def epoch_dataset(ctx: BenchContext, batch_kappa: int):
    from ..workloads.data import SyntheticDataset, build_datasets

    run, ep = ctx.opts.run, ctx.opts.epochs
    if ep.dataset == "digits":
        return build_datasets("digits", img_size=run.img_size).train
    # Whole DROP batches on every rank: a multiple of batch * batch_kappa * world size.
    unit = run.batch_size * max(batch_kappa, 1) * ctx.world_size
    n = max(unit, -(-ep.samples_per_rank * ctx.world_size // unit) * unit)
    return SyntheticDataset(n, run.num_classes, run.img_size, seed=run.seed)


def run_epoch(ctx: BenchContext, engine: Any, loader: Any, epoch: int, max_steps: int | None = None,
              kept: list[float] | None = None, probe: dict[str, float] | None = None) -> tuple[float, int, int]:
    """Train one epoch (or its first ``max_steps`` steps); wall-clock seconds, steps, samples.

    With ``probe`` (a dict), two parts of the epoch's time are written into it, so that what LDB
    adds to an epoch can be told from what the input pipeline costs:

    * ``first_step_s``: from the epoch's start to the end of its first step (the loader's start
      included; the device synchronised once more there): what an epoch boundary costs (a mode
      switch, a new batch size), apart from the steady steps;
    * ``loader_wait_s``: host seconds spent waiting for the loader's next batch (collation in the
      main process, or a worker that is behind). It costs nothing to measure (no device sync).

    Batches reach the device as in ldb-train (:func:`ldb_ds.process.batch_to_device`: a
    ``non_blocking`` copy of the pinned batch, cast on the device), not through a copy that waits
    for the device at every step.
    """
    import torch.nn.functional as F

    dtype = input_dtype(engine)
    engine.set_epoch(epoch)
    engine.train()
    steps = samples = 0
    loader_wait = 0.0
    synchronize()
    t0 = time.perf_counter()
    batches = iter(loader)
    while max_steps is None or steps < max_steps:
        t_wait = time.perf_counter()
        batch = next(batches, None)
        loader_wait += time.perf_counter() - t_wait
        if batch is None:
            break
        x, y = batch
        x, y = batch_to_device(x, ctx.device, dtype), batch_to_device(y, ctx.device)
        loss = F.cross_entropy(engine(x).float(), y)
        engine.backward(loss)
        engine.step()
        steps += 1
        samples += x.size(0)
        if steps == 1 and probe is not None:
            synchronize()
            probe["first_step_s"] = time.perf_counter() - t0
        if kept is not None and engine.ldb.enabled and engine.ldb.mode is Mode.DROP:
            kept.append(engine.ldb.kept_param_fraction)
    synchronize()
    elapsed = time.perf_counter() - t0
    if probe is not None:
        probe.setdefault("first_step_s", 0.0)
        probe["loader_wait_s"] = loader_wait
    return elapsed, steps, samples


def compare_schedules(ctx: BenchContext, base: tuple, ldb: tuple, epochs: list[int], reps: int,
                      label: str = "") -> dict[str, Any]:
    """Alternate whole-schedule runs of the baseline and LDB; paired speedups per repetition."""
    ep_opts = ctx.opts.epochs
    ldb_engine, ldb_loader = ldb
    cfg = ldb_engine.ldb.config
    drop_epoch = first_drop_epoch(cfg)
    for engine, loader in (base, ldb):  # warm-up: a few FULL and DROP steps, not timed
        run_epoch(ctx, engine, loader, 0, ep_opts.warmup_steps)
        run_epoch(ctx, engine, loader, drop_epoch, ep_opts.warmup_steps)
    per: dict[str, list] = {"baseline_s": [], "ldb_s": [], "baseline_epochs": [], "ldb_epochs": []}
    # Per side and mode, one value per timed epoch (run_epoch's probe): first steps, loader waits.
    first: dict[str, list[float]] = {"baseline_FULL": [], "ldb_FULL": [], "ldb_DROP": []}
    waits: dict[str, list[float]] = {"baseline_FULL": [], "ldb_FULL": [], "ldb_DROP": []}
    steps = {"baseline": 0, "ldb": 0}
    kept: list[float] = []
    for r in range(reps):
        order = [("baseline", base), ("ldb", ldb)]
        if r % 2:
            order.reverse()  # A B, B A, A B, ...: neither side always runs first
        for name, (engine, loader) in order:
            barrier(ctx)
            synchronize()
            t0 = time.perf_counter()
            ep_times, n_steps = [], 0
            for e in epochs:
                probe: dict[str, float] = {}
                t, s, _ = run_epoch(ctx, engine, loader, e, kept=kept if name == "ldb" else None, probe=probe)
                ep_times.append((e, engine.ldb.mode.value, t))
                n_steps += s
                first.setdefault(f"{name}_{engine.ldb.mode.value}", []).append(probe["first_step_s"])
                waits.setdefault(f"{name}_{engine.ldb.mode.value}", []).append(probe["loader_wait_s"])
            synchronize()
            per[f"{name}_s"].append(time.perf_counter() - t0)
            per[f"{name}_epochs"].append(ep_times)
            steps[name] = n_steps
        ctx.log(f"{label}rep {r + 1}/{reps}: baseline {per['baseline_s'][-1]:.2f} s, LDB {per['ldb_s'][-1]:.2f} s, "
                f"speedup {100 * (1 - per['ldb_s'][-1] / per['baseline_s'][-1]):.1f}%")
    speedups = [1 - l / b for b, l in zip(per["baseline_s"], per["ldb_s"])]
    ep: dict[str, list[float]] = {"baseline_FULL": [], "ldb_FULL": [], "ldb_DROP": []}
    for name in ("baseline", "ldb"):
        for run in per[f"{name}_epochs"]:
            for _, mode, t in run:
                if f"{name}_{mode}" in ep:
                    ep[f"{name}_{mode}"].append(t)
    ep_stats = {k: rep.stats(v) for k, v in ep.items()}
    # The FULL-epoch ratio again with each epoch's first step taken out of both sides: whether what
    # LDB adds to a FULL epoch sits at the epoch boundary or in every step.
    rest = {k: rep.stats(t - f for t, f in zip(ep[k], first[k])) for k in ("baseline_FULL", "ldb_FULL")}
    t_full = ep_stats["ldb_FULL"]["median"]
    t_drop = ep_stats["ldb_DROP"]["median"]
    t_base = ep_stats["baseline_FULL"]["median"]
    n_sched = ep_opts.schedule_epochs
    n_drop = sum(1 for e in range(n_sched) if epoch_mode(e, cfg) is Mode.DROP)
    derived_ldb = (n_sched - n_drop) * t_full + n_drop * (t_drop if n_drop else 0.0)
    return {
        "epochs": list(epochs), "modes": [epoch_mode(e, cfg).value for e in epochs], "reps": reps,
        "samples_per_epoch": len(ldb_loader.dataset) if hasattr(ldb_loader, "dataset") else None,
        "baseline_s": rep.stats(per["baseline_s"]), "ldb_s": rep.stats(per["ldb_s"]),
        "speedup": rep.stats(speedups),
        "throughput_ratio": rep.stats(b / l for b, l in zip(per["baseline_s"], per["ldb_s"])),
        "epoch_s": ep_stats, "drop_over_full_epoch": (t_drop / t_full) if ep["ldb_DROP"] else None,
        "full_epoch_over_baseline": (t_full / t_base) if ep["ldb_FULL"] and t_base else None,  # LDB's FULL-epoch cost
        "first_step_s": {k: rep.stats(v) for k, v in first.items() if k in ep},
        "loader_wait_s": {k: rep.stats(v) for k, v in waits.items() if k in ep},
        "loader_workers": ep_opts.loader_workers,
        "full_epoch_over_baseline_after_first_step":
            rest["ldb_FULL"]["median"] / rest["baseline_FULL"]["median"]
            if rest["ldb_FULL"]["n"] and rest["baseline_FULL"]["n"] and rest["baseline_FULL"]["median"] else None,
        "steps": steps, "kept_param_fraction": (sum(kept) / len(kept)) if kept else None,
        "per_rep": {"baseline_s": per["baseline_s"], "ldb_s": per["ldb_s"], "speedup": speedups,
                    "baseline_epochs": per["baseline_epochs"], "ldb_epochs": per["ldb_epochs"]},
        "derived": {"epochs": n_sched, "drop_epochs": n_drop,
                    "speedup": 1 - derived_ldb / (n_sched * t_base) if t_base else None,
                    "how": "from the median FULL and DROP epoch times measured above (not a measured run)"},
    }


def steady_epochs(sampling_rate: int, periods: int) -> list[int]:
    """Epochs 1 .. periods*s: whole schedule periods in steady state (epoch 0 is FULL in any schedule)."""
    return list(range(1, periods * sampling_rate + 1))


def run_epochs(ctx: BenchContext) -> dict[str, Any]:
    opts = ctx.opts
    init_model = make_model(opts)
    cfg = ldb_section(opts, True)
    data = epoch_dataset(ctx, cfg["batch_kappa"])
    base = make_engine(opts, init_model, False, data)
    ldb = make_engine(opts, init_model, True, data)
    res = compare_schedules(ctx, base, ldb, steady_epochs(cfg["sampling_rate"], opts.epochs.periods),
                            opts.epochs.reps)
    out = result(ctx, "epochs", res, ldb[0], init_model,
                 ["Epoch 0 (always FULL) is left out: the timed epochs are whole schedule periods, as in a "
                  "long run. The baseline trains the same epochs, all FULL."])
    close_engine(base)
    close_engine(ldb)
    return out


def run_sweep(ctx: BenchContext, parameter: str) -> dict[str, Any]:
    """``epochs`` for each value of ``parameter`` (``drop_rate`` or ``sampling_rate``)."""
    opts, ep = ctx.opts, ctx.opts.epochs
    init_model = make_model(opts)
    cfg = ldb_section(opts, True)
    if parameter == "drop_rate":
        values: list[Any] = list(ep.drop_rates)
        paper = rep.PAPER["figure3_drop_rate"]
    else:
        values = list(ep.sampling_rates)
        paper = rep.PAPER["table4_sampling_rate"]
    data = epoch_dataset(ctx, cfg["batch_kappa"])
    base = make_engine(opts, init_model, False, data)
    rows = []
    for v in values:
        ldb = make_engine(opts, init_model, True, data, **{parameter: v})
        s = ldb[0].ldb.config.sampling_rate
        res = compare_schedules(ctx, base, ldb, steady_epochs(s, ep.sweep_periods), ep.sweep_reps,
                                label=f"{parameter}={v}: ")
        rows.append({"value": v, "speedup": res["speedup"], "baseline_s": res["baseline_s"], "ldb_s": res["ldb_s"],
                     "drop_over_full_epoch": res["drop_over_full_epoch"],
                     "kept_param_fraction": res["kept_param_fraction"], "epochs": res["epochs"],
                     "modes": res["modes"], "paper_speedup_pct": paper.get(v), "per_rep": res["per_rep"]})
        close_engine(ldb)
    mode = "sweep-drop-rate" if parameter == "drop_rate" else "sweep-sampling-rate"
    res = {"parameter": parameter, "rows": rows, "reps": ep.sweep_reps,
           "epoch_rule": f"1 .. {ep.sweep_periods}*s (whole schedule periods)"}
    notes = ["Paper values are GPU runs of other models (Figure 3: DLA on CIFAR-10, only the rates quoted in "
             "its text; Table 4: ResNet-50 on CIFAR-100): compare shapes, not levels."]
    out = result(ctx, mode, res, None, init_model, notes)
    close_engine(base)
    return out


__all__ = ["epoch_dataset", "run_epoch", "compare_schedules", "steady_epochs", "run_epochs", "run_sweep"]
