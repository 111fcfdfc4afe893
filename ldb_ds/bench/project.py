"""``project`` mode: per-step time of the baseline and LDB, and the end-to-end speedup, at 1 to 1,024 ranks.

Built from (docs/benchmark.md, "Projection to large clusters", lists every assumption):

* **calibrated here** (measured on the current device by torch.profiler, at the FULL batch B and the
  DROP batch batch_kappa x B): the whole model's forward, backward and input-gradient-only backward,
  every unit's forward, input-gradient and weight-gradient cost, and the torch optimizer's cost per
  call, per param group and per element (:mod:`.costs`);
* **counted** (:mod:`.counts`): every collective of a baseline, LDB FULL and LDB DROP step, by kind and
  message size, and the optimizer calls and groups, at the current world size or from ``--counts``;
* **assumed** (:class:`.bench_options.ProjectOptions`): the link figures, the collective algorithm, the
  overlap of reductions with backward, weak scaling (fixed per-rank batch) and collectives per step
  that do not change with the world size. At world size > 1 ``--calibrate-comm`` replaces the
  intra-node figures by a fit to timed all-reduces of this run's backend.

A DROP step's compute is the FULL step's minus the expected weight-gradient cost of the dropped units
(each sampleable unit dropped with probability p; the units' isolated dW costs scaled to the whole
model's dW); its optimizer steps the expected kept elements and the counted kept groups.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from . import alphabeta as ab
from . import report as rep
from .harness import BenchContext, barrier, conditions, ldb_section, make_model, result

PAPER_NOTE = ("Paper, Table 3 (MobileNetV2 on CIFAR-100, 1/2/4/8 GPUs: 7, 18.1, 21, 24.5%) is context only: "
              "it used torch DataParallel and time.process_time(), not DeepSpeed and wall clock.")


# --------------------------------------------------------------------------- inputs


def measure_compute(ctx: BenchContext, model: Any, units: list[Any], batches: dict[str, int],
                    reps: int) -> dict[str, Any]:
    """Profiled whole-model costs (the batches interleaved) and per-unit costs, per batch label."""
    import torch

    from .costs import model_costs, module_costs

    run = ctx.opts.run
    g = torch.Generator().manual_seed(run.seed)
    dtype = torch.bfloat16 if run.precision == "bf16" else torch.float32
    data = {}
    for label, batch in batches.items():
        x = torch.randn(batch, 3, run.img_size, run.img_size, generator=g).to(ctx.device, dtype)
        data[label] = (x, torch.randint(0, run.num_classes, (batch,), generator=g).to(ctx.device))
    model.train()
    whole = model_costs(model, data, reps)
    numel = dict((n, p.numel()) for n, p in model.named_parameters())
    keys = ("forward_s", "dx_s", "dw_s", "forward_flops", "dx_flops", "dw_flops")
    out = {}
    for label, batch in batches.items():
        mods, untimed = module_costs(model, data[label][0], reps)
        share: dict[str, dict[str, float]] = {}  # per parameter: its module's costs split by size
        for name, c in mods.items():
            prefix = f"{name}." if name else ""
            total = sum(numel[prefix + pn] for pn in c["params"]) or 1
            for pn in c["params"]:
                share[prefix + pn] = {k: c[k] * numel[prefix + pn] / total for k in keys}
        per_unit = [{k: sum(share.get(n, {}).get(k, 0.0) for n in u.param_names) for k in keys} for u in units]
        dw_units = sum(u["dw_s"] for u in per_unit)
        dw_model = whole[label]["backward_s"] - whole[label]["backward_dx_only_s"]
        out[label] = {"batch": batch, "model": whole[label], "units": per_unit, "untimed_modules": untimed,
                      "dw_units_s": dw_units, "dw_model_s": dw_model,
                      # The isolated per-unit dW costs give the shares, the whole model's dW the total.
                      "dw_scale": dw_model / dw_units if dw_units > 0 and dw_model > 0 else 1.0}
    return out


def calibrate_comm(ctx: BenchContext, reps: int = 5) -> dict[str, Any]:
    """Time all-reduces of this run's backend at four sizes; fit latency and bandwidth (ring form)."""
    import deepspeed.comm as dist
    import torch

    from ..process import synchronize

    sizes = [1 << 10, 1 << 16, 1 << 20, 1 << 24]
    seconds = []
    for n in sizes:
        t = torch.ones(n // 4, device=ctx.device)
        dist.all_reduce(t)
        ts = []
        for _ in range(reps):
            barrier(ctx)
            synchronize()
            t0 = time.perf_counter()
            dist.all_reduce(t)
            synchronize()
            ts.append(time.perf_counter() - t0)
        seconds.append(rep.stats(ts)["median"])
    lat, bw = ab.fit_alpha_beta(sizes, seconds, ctx.world_size)
    return {"sizes": sizes, "seconds": seconds, "latency_us": lat * 1e6, "bandwidth_gbs": bw / 1e9}


def counted_steps(ctx: BenchContext) -> dict[str, Any]:
    """The counted steps of this model and stage: from ``--counts`` or counted now."""
    from .counts import count_model

    p, run = ctx.opts.project, ctx.opts.run
    if p.counts:
        counted = rep.read_json(p.counts)
        if counted["mode"] != "counts" or counted["conditions"].get("precision") != run.precision:
            raise SystemExit(f"--counts {p.counts}: expected counts at precision {run.precision} (bytes depend on "
                             f"it), got mode {counted['mode']!r} at {counted['conditions'].get('precision')}")
        for t in counted["results"]["tables"]:
            if t["model"] == run.model and t["zero_stage"] == run.zero_stage:
                return {**t, "source": p.counts}
        raise SystemExit(f"--counts {p.counts} has no counts for {run.model} at ZeRO-{run.zero_stage}")
    return {**count_model(ctx, run.model, run.zero_stage), "source": f"counted here at world size {ctx.world_size}"}


def _messages(row: dict[str, Any]) -> list[ab.Message]:
    """The collectives of one counted step (a DROP step's averaged over the masks counted)."""
    steps = row.get("messages_all") or [row["messages"]]
    return [ab.Message(kind, nbytes, 1.0 / len(steps)) for msgs in steps for kind, nbytes in msgs]


# --------------------------------------------------------------------------- the model


def variants(inputs: dict[str, Any], p: float, sampleable: list[bool], numels: list[int],
             batch_kappa: int, accumulation: bool) -> dict[str, ab.Variant]:
    """Baseline, LDB FULL and LDB DROP (at the FULL batch and at a DROP epoch's batch) of one rank."""
    counts, full, big = inputs["counts"]["rows"], inputs["compute"]["full"], inputs["compute"]["drop"]

    def dw_saved(c: dict[str, Any]) -> float:
        return c["dw_scale"] * sum(p * u["dw_s"] for u, s in zip(c["units"], sampleable) if s)

    def optimizer(row: dict[str, Any], drop: bool) -> tuple[float, float]:
        calls = row.get("torch_optimizer_steps", row["optimizer_calls"])
        groups = row["groups_nonempty"] - (row["dropped_units"] if drop else 0)
        return calls, max(groups, 0.0)

    elements = float(sum(numels))
    kept = sum(n * (1 - p * s) for n, s in zip(numels, sampleable))
    out = {}
    for name, key in (("baseline", "baseline_full"), ("ldb_full", "ldb_full")):
        calls, groups = optimizer(counts[key], drop=False)
        out[name] = ab.Variant(full["model"]["forward_s"], full["model"]["backward_s"], calls, groups, elements,
                               _messages(counts[key]), 1, full["batch"])
    calls, groups = optimizer(counts["ldb_drop"], drop=True)
    drop_messages = _messages(counts["ldb_drop"])
    out["ldb_drop"] = ab.Variant(full["model"]["forward_s"], full["model"]["backward_s"] - dw_saved(full), calls,
                                 groups, kept, drop_messages, 1, full["batch"])
    if accumulation:  # batch_kappa micro steps of B, one optimizer step
        out["ldb_drop_kb"] = dataclasses.replace(out["ldb_drop"], micro_steps=batch_kappa, samples=batch_kappa * full["batch"])
    else:
        out["ldb_drop_kb"] = ab.Variant(big["model"]["forward_s"], big["model"]["backward_s"] - dw_saved(big), calls,
                                        groups, kept, drop_messages, 1, big["batch"])
    return out


def project_rows(inputs: dict[str, Any], vs: dict[str, ab.Variant], links: ab.Links, stage: int, overlap: float,
                 sampling_rate: int, batch_kappa: int, world_sizes: tuple[int, ...], algorithm: str,
                 compute_scale: float = 1.0) -> list[dict]:
    """One row per world size.

    ``compute_scale`` (a what-if) divides the forward/backward compute and the optimizer's per-element
    cost, the work that a faster device does faster; the optimizer's per-call and per-group costs stay
    as measured: on a GPU they are kernel-launch latency (a few foreach kernels per group, counted by
    ``counts``), microseconds per launch as on this host, not throughput.
    """
    oc = inputs["optimizer"]
    opt = ab.OptimizerCost(oc["call_s"], oc["group_s"], oc["element_s"] / compute_scale)
    scaled = {k: dataclasses.replace(v, forward=v.forward / compute_scale, backward=v.backward / compute_scale)
              for k, v in vs.items()}
    rows = []
    for w in world_sizes:
        t = {name: ab.step_time(v, w, stage, opt, links, algorithm, overlap) for name, v in scaled.items()}
        row: dict[str, Any] = {"world_size": w}
        for name, st in t.items():
            row[name] = {"total_s": st.total, "compute_s": st.compute, "optimizer_s": st.optimizer,
                         "comm_s": st.comm, "comm_exposed_s": st.comm_exposed}
        row["speedup"] = ab.schedule_speedup(t["baseline"].total, t["ldb_full"].total, t["ldb_drop_kb"].total,
                                             sampling_rate, batch_kappa)
        row["ldb_full_over_baseline"] = t["ldb_full"].total / t["baseline"].total
        row["drop_over_full"] = t["ldb_drop"].total / t["ldb_full"].total
        rows.append(row)
    return rows


def validate(path: str, by_ws: dict[int, dict[str, Any]], opts: Any, this: dict[str, Any]) -> dict[str, Any]:
    """Projected against measured at the measurement's world size: a step.json (step times and their
    ratios) or an epochs.json (the schedule speedup). ``this``: the conditions of the projection; where
    the measurement's differ (another CPU, model, batch or stage) the result says so."""
    res = rep.read_json(path)
    c, ws = res["conditions"], int(res["conditions"]["world_size"])
    if res["mode"] not in ("step", "epochs"):
        raise SystemExit(f"--validate {path}: expected a step.json or an epochs.json, got mode {res['mode']!r}")
    if ws not in by_ws:
        raise SystemExit(f"--validate {path}: world size {ws} is not among --project-world-sizes")
    here = {"model": opts.run.model, "micro_batch_per_rank": opts.run.batch_size, "zero_stage": opts.run.zero_stage,
            "cpu_model": this["cpu_model"], "device": this["device"]}
    mismatch = [f"{k}: measured {c.get(k)}, projected {v}" for k, v in here.items() if c.get(k) != v]
    row = by_ws[ws]
    out: dict[str, Any] = {"file": path, "mode": res["mode"], "world_size": ws, "mismatch": mismatch}
    if res["mode"] == "step":
        var = res["results"]["variants"]
        med = {name: var[name]["total_s"]["median"] for name in ("baseline", "ldb_full", "ldb_drop", "ldb_drop_kb")}
        out["steps"] = {name: {"measured_s": m, "projected_s": row[name]["total_s"],
                               "error": row[name]["total_s"] / m - 1} for name, m in med.items()}
        # Ratios of steps of the same run: what a different machine or load changes least.
        kb = res["results"]["key_figures"].get("batch_kappa", 1)
        pairs = {"LDB FULL / baseline": ("ldb_full", "baseline", 1), "DROP / FULL (batch B)": ("ldb_drop", "ldb_full", 1),
                 "DROP epoch / FULL epoch (per sample)": ("ldb_drop_kb", "ldb_full", kb)}
        out["ratios"] = {label: {"measured": med[a] / (k * med[b]), "projected": row[a]["total_s"] / (k * row[b]["total_s"])}
                         for label, (a, b, k) in pairs.items()}
    else:
        measured = res["results"]["speedup"]["median"]
        out["speedup"] = {"measured": measured, "projected": row["speedup"], "error_points": row["speedup"] - measured}
    return out


def run_project(ctx: BenchContext) -> dict[str, Any]:
    from ..config import LDBConfig
    from ..schedule import sampleable_range
    from ..units import build_units

    opts, p = ctx.opts, ctx.opts.project
    cfg = LDBConfig.from_dict(ldb_section(opts, True))
    model = make_model(opts).to(ctx.device)
    if opts.run.precision == "bf16":
        model = model.bfloat16()
    units = build_units(model, cfg.granularity)
    kb = cfg.batch_kappa
    accumulation = cfg.batch_scaling == "accumulation"
    if p.unit_costs:
        old = rep.read_json(p.unit_costs)["results"]["inputs"]
        compute, optimizer = old["compute"], old["optimizer"]
        source = f"measured earlier ({p.unit_costs}: {old.get('device')})"
    else:
        ctx.log("project: profiling the model and every unit at the FULL and the DROP batch")
        batches = {"full": opts.run.batch_size}
        if not accumulation and kb > 1:
            batches["drop"] = kb * opts.run.batch_size
        compute = measure_compute(ctx, model, units, batches, p.project_reps)
        compute.setdefault("drop", compute["full"])
        optimizer = optimizer_inputs(ctx, units)
        source = "measured here"
    ctx.log("project: counting the collectives of a baseline, LDB FULL and LDB DROP step")
    counts = counted_steps(ctx)
    if counts["units"] != len(units):
        raise SystemExit(f"the counted steps have {counts['units']} units, this model has {len(units)} at "
                         f"granularity {cfg.granularity!r}: count with the same model and LDB settings")
    links = ab.Links(p.gpus_per_node, p.intra_bw_gbs, p.intra_lat_us, p.inter_bw_gbs, p.inter_lat_us)
    comm_fit = None
    if p.calibrate_comm and ctx.world_size > 1:
        comm_fit = calibrate_comm(ctx)
        links = ab.Links(p.gpus_per_node, comm_fit["bandwidth_gbs"], comm_fit["latency_us"],
                         p.inter_bw_gbs, p.inter_lat_us)
    inputs = {"compute": compute, "optimizer": optimizer, "counts": counts, "compute_source": source,
              "device": str(ctx.device), "comm_fit": comm_fit, "links": links.__dict__}
    sample = set(sampleable_range(len(units), cfg))
    sampleable = [i in sample for i in range(len(units))]
    vs = variants(inputs, cfg.drop_rate, sampleable, [u.numel for u in units], kb, accumulation)
    overlap = p.overlap if p.overlap is not None else (1.0 if opts.run.zero_stage == 3 else 0.0)

    def rows_at(o: float, scale: float = 1.0) -> list[dict]:
        return project_rows(inputs, vs, links, opts.run.zero_stage, o, cfg.sampling_rate, kb, p.project_world_sizes,
                            p.algorithm, scale)

    rows = rows_at(overlap)
    sensitivity = {str(o): [r["speedup"] for r in rows_at(o)] for o in (0.0, 1.0)}
    scenarios = {}
    for f in p.compute_scales:
        main, lo, hi = rows_at(overlap, f), rows_at(0.0, f), rows_at(1.0, f)
        scenarios[str(f)] = {"speedup": [r["speedup"] for r in main], "overlap_0": [r["speedup"] for r in lo],
                             "overlap_1": [r["speedup"] for r in hi],
                             "baseline_s": [r["baseline"]["total_s"] for r in main],
                             "comm_share_baseline": [r["baseline"]["comm_exposed_s"] / r["baseline"]["total_s"]
                                                     for r in main]}
    by_ws = {r["world_size"]: r for r in rows}
    this = conditions(ctx, "project")
    checks = [validate(path, by_ws, opts, this) for path in p.validate]
    res = {"rows": rows, "overlap": overlap, "algorithm": p.algorithm, "sensitivity_overlap": sensitivity,
           "scenarios": scenarios, "validation": checks, "units": len(units), "sampleable_units": sum(sampleable),
           "variants": {k: {f: getattr(v, f) for f in ("forward", "backward", "optimizer_calls", "optimizer_groups",
                                                         "optimizer_elements", "micro_steps", "samples")}
                        for k, v in vs.items()},
           "inputs": inputs, "paper": {str(k): v for k, v in rep.PAPER["table3_scaling"].items()}}
    notes = [PAPER_NOTE, "A projection, not a measurement: compute is calibrated on the device named above "
             f"({source}); the links are {'fitted here (intra-node)' if comm_fit else 'assumed'}; "
             "docs/benchmark.md lists every assumption."]
    if ctx.world_size == 1 and not p.counts:
        notes.append("The collectives were counted at world size 1, where DeepSpeed skips the parameter "
                     "all-gathers and ldb_ds the mask broadcast: pass --counts with a counts.json from 2 ranks.")
    out = result(ctx, "project", res, None, model, notes)
    out["conditions"]["ldb"] = cfg.to_dict()
    barrier(ctx)
    return out


def optimizer_inputs(ctx: BenchContext, units: list[Any]) -> dict[str, float]:
    from .costs import optimizer_costs

    run = ctx.opts.run
    return optimizer_costs([u.numel for u in units], ctx.opts.project.project_reps, run.lr, run.momentum,
                           run.weight_decay, ctx.device)


# --------------------------------------------------------------------------- rendering


def _ms(x: float) -> str:
    return f"{x * 1e3:.3g}" if x < 1e-3 else f"{x * 1e3:.1f}"


def markdown(result: dict[str, Any]) -> str:
    r = result["results"]
    inp = r["inputs"]
    s = (f"Compute {inp['compute_source']}; collectives {inp['counts']['source']}; links "
         f"{'intra-node fitted here, inter-node assumed' if inp['comm_fit'] else 'assumed'}; overlap of reductions "
         f"with backward {r['overlap']:g}; algorithm {r['algorithm']}; {r['units']} units, "
         f"{r['sampleable_units']} sampleable.\n\n")
    rows = []
    for key, c in inp["compute"].items():
        m = c["model"]
        rows.append([f"{key} batch ({c['batch']}/rank)", _ms(m["forward_s"]), _ms(m["backward_s"]),
                     _ms(m["backward_dx_only_s"]), _ms(c["dw_model_s"]), _ms(c["dw_units_s"]),
                     rep.fmt(c["dw_scale"], 3), f"{m['forward_flops'] / 1e9:.2f}"])
    s += rep.table(["calibrated compute, ms", "forward", "backward", "backward, dX only", "dW (model)",
                    "dW (sum of units)", "dW scale", "forward GFLOP"], rows)
    o = inp["optimizer"]
    s += (f"\nOptimizer (torch SGD, foreach): {o['call_s'] * 1e6:.1f} us per call, {o['group_s'] * 1e6:.1f} us per "
          f"group, {o['element_s'] * 1e9:.3f} ns per element (one group {_ms(o['one_group_s'])} ms, one group per unit "
          f"{_ms(o['per_unit_groups_s'])} ms, one call per unit {_ms(o['per_unit_calls_s'])} ms; {o['units']} units).\n")
    ln = inp["links"]
    s += (f"Links: intra-node {ln['intra_bw_gbs']:.3g} GB/s, {ln['intra_lat_us']:.3g} us per step up to "
          f"{ln['gpus_per_node']} ranks; inter-node {ln['inter_bw_gbs']:.3g} GB/s, {ln['inter_lat_us']:.3g} us.\n\n")
    rows = []
    for row in r["rows"]:
        i = r["rows"].index(row)
        rows.append([row["world_size"], _ms(row["baseline"]["total_s"]), _ms(row["ldb_full"]["total_s"]),
                     _ms(row["ldb_drop"]["total_s"]), _ms(row["ldb_drop_kb"]["total_s"]),
                     " / ".join(_ms(row[k]["comm_exposed_s"]) for k in ("baseline", "ldb_full", "ldb_drop_kb")),
                     rep.fmt(row["ldb_full_over_baseline"], 3), rep.fmt(100 * row["speedup"]),
                     f"{100 * r['sensitivity_overlap']['0.0'][i]:.1f} .. {100 * r['sensitivity_overlap']['1.0'][i]:.1f}",
                     r["paper"].get(str(row["world_size"]), "")])
    s += rep.table(["world size", "baseline step ms", "LDB FULL ms", "LDB DROP ms (batch B)",
                    "LDB DROP ms (DROP batch)", "exposed comm ms: base / FULL / DROP", "LDB FULL / baseline",
                    "speedup %", "speedup % at overlap 0 .. 1", "paper % (context)"], rows)
    sc = r.get("scenarios", {})
    if len(sc) > 1:
        s += ("\nWhat-if: compute and the optimizer's per-element cost divided by F (a device F times faster; an "
              "assumption), per-call and per-group optimizer costs as measured (launch latency). "
              "Speedup % at the overlap above [overlap 0 .. 1]; share of the baseline step spent in exposed "
              "communication:\n\n")
        rows = []
        for i, row in enumerate(r["rows"]):
            rows.append([row["world_size"]] + [
                f"{100 * v['speedup'][i]:.1f} [{100 * v['overlap_0'][i]:.1f} .. {100 * v['overlap_1'][i]:.1f}]; "
                f"{100 * v['comm_share_baseline'][i]:.0f}%" for v in sc.values()])
        s += rep.table(["world size"] + [f"F = {f}" for f in sc], rows)
    for v in r["validation"]:
        s += f"\nValidation against {v['file']} (world size {v['world_size']})"
        s += f" - conditions differ: {'; '.join(v['mismatch'])}" if v["mismatch"] else ""
        if "steps" in v:
            s += ":\n\n" + rep.table(["step", "measured ms", "projected ms", "error %"],
                                      [[k, _ms(e["measured_s"]), _ms(e["projected_s"]), rep.fmt(100 * e["error"])]
                                       for k, e in v["steps"].items()])
            s += "\n" + rep.table(["ratio (same run)", "measured", "projected", "error %"],
                                  [[k, rep.fmt(e["measured"], 3), rep.fmt(e["projected"], 3),
                                    rep.fmt(100 * (e["projected"] / e["measured"] - 1))] for k, e in v["ratios"].items()])
        if "speedup" in v:
            sp = v["speedup"]
            s += (f": schedule speedup measured {100 * sp['measured']:.1f}%, projected {100 * sp['projected']:.1f}% "
                  f"({100 * sp['error_points']:+.1f} points).\n")
    return s


def plot(result: dict[str, Any], path: str) -> str:
    plt = rep.pyplot()
    r, c = result["results"], result["conditions"]
    ws = [row["world_size"] for row in r["rows"]]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    scenarios = r.get("scenarios") or {"1.0": {"speedup": [row["speedup"] for row in r["rows"]],
                                               "overlap_0": r["sensitivity_overlap"]["0.0"],
                                               "overlap_1": r["sensitivity_overlap"]["1.0"]}}
    for f, v in scenarios.items():
        line = ax1.plot(ws, [100 * x for x in v["speedup"]], "o-",
                        label=f"projected, compute / {f} (overlap {r['overlap']:g})")[0]
        ax1.fill_between(ws, [100 * x for x in v["overlap_0"]], [100 * x for x in v["overlap_1"]], alpha=0.15,
                         color=line.get_color())
    paper = sorted((int(k), v) for k, v in r["paper"].items())
    ax1.plot(*zip(*paper), "s--", color="#c44e52", label="paper Table 3 (context: DataParallel, other model)")
    meas = [(v["world_size"], 100 * v["speedup"]["measured"]) for v in r["validation"] if "speedup" in v]
    if meas:
        ax1.plot(*zip(*meas), "k^", label="measured here")
    ax1.set_xscale("log", base=2)
    ax1.set_xlabel("world size (ranks)")
    ax1.set_ylabel("end-to-end speedup, % (band: overlap 0 .. 1)")
    ax1.legend(fontsize=7)
    for name, color in (("baseline", "#888"), ("ldb_full", "#4c72b0"), ("ldb_drop_kb", "#dd8452")):
        ax2.plot(ws, [row[name]["total_s"] * 1e3 for row in r["rows"]], "o-", color=color, label=f"{name} step")
        ax2.plot(ws, [row[name]["comm_exposed_s"] * 1e3 for row in r["rows"]], ":", color=color,
                 label=f"{name} exposed comm")
    ax2.set_xscale("log", base=2)
    ax2.set_yscale("log")
    ax2.set_xlabel("world size (ranks)")
    ax2.set_ylabel("ms per step")
    ax2.legend(fontsize=7)
    fig.suptitle(f"projection - {c.get('model')}, B={c.get('micro_batch_per_rank')}/rank, ZeRO-{c.get('zero_stage')}, "
                 f"compute from {c.get('device')}, {r['inputs']['compute_source']}", fontsize=9)
    return rep.save(fig, path)


def scalars(result: dict[str, Any]) -> list[tuple[str, float, int]]:
    return [("bench/project/speedup_pct", 100 * row["speedup"], row["world_size"]) for row in result["results"]["rows"]]


__all__ = ["run_project", "variants", "project_rows", "validate", "measure_compute", "calibrate_comm", "markdown",
           "plot", "scalars"]
