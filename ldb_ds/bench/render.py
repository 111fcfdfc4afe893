"""Markdown tables, PNG plots and TensorBoard scalars of the timing modes.

``step``, ``epochs``, the two sweeps, ``accuracy`` and ``scaling``; :mod:`.report` dispatches here
by mode (``counts`` and ``project`` render in their own modules).
"""

from __future__ import annotations

from typing import Any, Sequence

from .report import fmt as _fmt, minmax as _minmax, pyplot, save, spread as _spread, stats, table


def markdown(result: dict[str, Any]) -> str:
    fn = {"step": _md_step, "epochs": _md_epochs, "sweep-drop-rate": _md_sweep,
          "sweep-sampling-rate": _md_sweep, "accuracy": _md_accuracy, "scaling": _md_scaling}[result["mode"]]
    return fn(result)


VARIANT_LABEL = {
    "baseline": "DeepSpeed baseline (LDB off)",
    "ldb_full": "LDB, FULL step",
    "ldb_drop": "LDB, DROP step",
    "oracle_full": "oracle FULL (plain PyTorch)",
    "oracle_drop": "oracle DROP (plain PyTorch, same units frozen)",
    "ldb_drop_kb": "LDB, DROP step at batch_kappa x batch (a DROP epoch's step)",
}


def _md_step(result: dict[str, Any]) -> str:
    r = result["results"]
    base = r["variants"]["baseline"]["total_s"]["median"]
    rows = []
    for name, v in r["variants"].items():
        rows.append([VARIANT_LABEL.get(name, name), _spread(v["total_s"], 1e3), _minmax(v["total_s"], 1e3),
                     _fmt(v["forward_s"]["median"] * 1e3), _fmt(v["backward_s"]["median"] * 1e3),
                     _fmt(v["step_s"]["median"] * 1e3), _fmt(v["total_s"]["median"] / base, 3),
                     _fmt(v["total_s"]["n"])])
    s = table(["variant", "step ms, median [IQR]", "median (min .. max)", "forward ms", "backward ms",
               "optimizer step ms", "x baseline", "n"], rows)
    k = r["key_figures"]
    var = r["variants"]

    def min_ratio(a: str, b: str) -> float:
        # Interference from other jobs only adds time: on a shared machine the ratio of the
        # minimums is the least disturbed estimate, the median ratio the typical one.
        return var[a]["total_s"]["min"] / var[b]["total_s"]["min"]

    s += "\n" + table(["figure", "median-based", "min-based", "target"], [
        ["DROP step / oracle DROP step (paired ratios, median [IQR]; ratio of minimums)",
         _spread(k["drop_over_oracle"], 1, 3), _fmt(min_ratio("ldb_drop", "oracle_drop"), 3), "<= 1.05 at ws 1"],
        ["DROP step / FULL step (measured)", _fmt(k["drop_over_full_measured"], 3),
         _fmt(min_ratio("ldb_drop", "ldb_full"), 3), "<= predicted"],
        ["oracle DROP / oracle FULL (plain PyTorch)", _fmt(k.get("oracle_drop_over_oracle_full"), 3),
         _fmt(min_ratio("oracle_drop", "oracle_full"), 3), ""],
        ["LDB FULL step / baseline step", _fmt(k["ldb_full_over_baseline"], 3),
         _fmt(min_ratio("ldb_full", "baseline"), 3), "~1"],
        ["LDB FULL step / oracle FULL step", _fmt(var["ldb_full"]["total_s"]["median"]
                                                  / var["oracle_full"]["total_s"]["median"], 3),
         _fmt(min_ratio("ldb_full", "oracle_full"), 3), ""],
        ["baseline step / oracle FULL step (DeepSpeed's own overhead, LDB off)",
         _fmt(var["baseline"]["total_s"]["median"] / var["oracle_full"]["total_s"]["median"], 3),
         _fmt(min_ratio("baseline", "oracle_full"), 3), ""],
        ["LDB's own overhead in a DROP step: (DROP / oracle DROP) / (baseline / oracle FULL)",
         _fmt((var["ldb_drop"]["total_s"]["median"] / var["oracle_drop"]["total_s"]["median"])
              / (var["baseline"]["total_s"]["median"] / var["oracle_full"]["total_s"]["median"]), 3),
         _fmt(min_ratio("ldb_drop", "oracle_drop") / min_ratio("baseline", "oracle_full"), 3), "~1"],
    ])
    s += "\n" + table(["figure", "value", "target"], [
        ["DROP step / FULL step (predicted from skipped dW)", _fmt(k["drop_over_full_predicted_dw"], 3), ""],
        ["  ... predicted with skipped dW + optimizer update", _fmt(k["drop_over_full_predicted_dw_opt"], 3), ""],
        ["dW share of an oracle FULL step (all units)", _fmt(k["dw_share_of_full"], 3), ""],
        ["kept parameter fraction in DROP steps (mean)", _fmt(k["kept_param_fraction_mean"], 3), ""],
    ])
    if "drop_epoch_over_full_epoch_predicted" in k:
        s += "\n" + table(["schedule breakdown (from the step medians)", "value"], [
            ["DROP step / FULL step, same batch (dropping alone)", _fmt(k["drop_over_full_measured"], 3)],
            [f"per-sample cost of a x{k['batch_kappa']} batch DROP step / of a DROP step (batch alone)",
             _fmt(k["batch_effect"], 3)],
            ["=> DROP epoch / FULL epoch (per-sample cost, x batch_kappa DROP step / FULL step)",
             _fmt(k["drop_epoch_over_full_epoch_predicted"], 3)],
            [f"=> steady-state schedule speedup with 1 in s = {result['conditions']['ldb'].get('sampling_rate')} "
             "epochs DROP, %", _fmt(100 * k["schedule_speedup_predicted"])],
        ])
    b = r["bytes"]
    drop_calls = [d.get("calls") for d in b.get("drop_steps", []) if d.get("calls") is not None]
    s += "\n" + table(["gradient bytes per rank per step", "counted", "expected", "reduction calls"], [
        ["baseline step", _fmt(b["baseline_counted"]), "-", _fmt(b.get("baseline_calls"))],
        ["LDB FULL step", _fmt(b["full_counted"]), _fmt(b["full_expected"]), _fmt(b.get("full_calls"))],
        ["LDB DROP step (mean)", _fmt(b["drop_counted_mean"]), _fmt(b["drop_expected_mean"]),
         _fmt(sum(drop_calls) / len(drop_calls)) if drop_calls else "-"],
        ["DROP / FULL bytes vs kept param fraction (max abs rel. error; target <= 0.01)",
         _fmt(b["drop_ratio_max_rel_error"], 4), "-", "-"],
    ])
    if b.get("note"):
        s += f"\n{b['note']}\n"
    prof = r.get("profile")
    if prof:
        names = list(prof)
        ops: list[str] = []
        for rows in prof.values():
            for row in rows[:8]:
                if row["op"] not in ops:
                    ops.append(row["op"])
        cell = {(n, row["op"]): row["self_cpu_ms"] + row.get("self_device_ms", 0.0) for n in names for row in prof[n]}
        s += "\nWhere the time goes (torch.profiler, self time per step in ms, top ops; '-' = not in the top 15):\n\n"
        s += table(["op"] + names, [[op] + [_fmt(cell.get((n, op))) for n in names] for op in ops])
    return s


def _md_epochs(result: dict[str, Any]) -> str:
    r = result["results"]
    rows = [["baseline", _spread(r["baseline_s"], 1, 2), _minmax(r["baseline_s"], 1, 2),
             _fmt(r["epoch_s"]["baseline_FULL"]["median"], 2), "-", _fmt(r["steps"]["baseline"])],
            ["LDB", _spread(r["ldb_s"], 1, 2), _minmax(r["ldb_s"], 1, 2),
             _fmt(r["epoch_s"]["ldb_FULL"]["median"], 2), _fmt(r["epoch_s"]["ldb_DROP"]["median"], 2),
             _fmt(r["steps"]["ldb"])]]
    s = (f"Epochs {r['epochs'][0]}..{r['epochs'][-1]} ({''.join(m[0] for m in r['modes'])}: "
         f"F = FULL, D = DROP), {r['samples_per_epoch']} samples per epoch, {r['reps']} A/B repetitions "
         f"after warm-up.\n\n")
    s += table(["run", "schedule time s, median [IQR]", "median (min .. max)", "FULL epoch s", "DROP epoch s",
                "optimizer steps"], rows)
    s += "\n" + table(["figure", "value"], [
        ["speedup = 1 - T_ldb / T_baseline, %, median [IQR]", _spread(r["speedup"], 100)],
        ["speedup %, median (min .. max)", _minmax(r["speedup"], 100)],
        ["throughput ratio T_baseline / T_ldb", _fmt(r["throughput_ratio"]["median"], 3)],
        ["DROP epoch / FULL epoch (LDB)", _fmt(r["drop_over_full_epoch"], 3)],
        ["LDB FULL epoch / baseline epoch (no dropping: should be ~1)",
         _fmt(r["epoch_s"]["ldb_FULL"]["median"] / r["epoch_s"]["baseline_FULL"]["median"], 3)],
        ["... the same without each epoch's first step (what the epoch boundary adds is left out)",
         _fmt(r.get("full_epoch_over_baseline_after_first_step"), 3)],
        ["first step of an epoch, ms, median: baseline FULL / LDB FULL / LDB DROP (loader start included)",
         _ms_triple(r.get("first_step_s", {}))],
        [f"waiting for the loader per epoch, ms, median: baseline FULL / LDB FULL / LDB DROP "
         f"({r.get('loader_workers', 0)} loader workers; host time, what the input pipeline adds to an epoch)",
         _ms_triple(r.get("loader_wait_s", {}))],
        [f"derived: speedup of a {r['derived']['epochs']}-epoch schedule from the epoch times, %",
         _fmt(r["derived"]["speedup"] * 100)],
    ])
    return s


def _ms_triple(seconds_by_side: dict[str, Any]) -> str:
    """``a / b / c``: the median in ms of baseline FULL, LDB FULL and LDB DROP ("-" where missing)."""
    return " / ".join(_fmt(1e3 * seconds_by_side[k]["median"], 1) if k in seconds_by_side else "-"
                      for k in ("baseline_FULL", "ldb_FULL", "ldb_DROP"))


def full_epoch_ratio(per_rep: dict[str, Any]) -> float | None:
    """Median LDB FULL epoch / median baseline epoch: what LDB changes when nothing is dropped."""
    if not per_rep or "ldb_epochs" not in per_rep:
        return None
    ldb = stats(t for run in per_rep["ldb_epochs"] for _, m, t in run if m == "FULL")
    base = stats(t for run in per_rep["baseline_epochs"] for _, _, t in run)
    return ldb["median"] / base["median"] if ldb["n"] and base["n"] else None


def _md_sweep(result: dict[str, Any]) -> str:
    r = result["results"]
    key = r["parameter"]
    rows = [[_fmt(row["value"], 2) if isinstance(row["value"], float) else row["value"],
             _spread(row["speedup"], 100), _minmax(row["speedup"], 100),
             _fmt(row["baseline_s"]["median"], 2), _fmt(row["ldb_s"]["median"], 2),
             _fmt(row["drop_over_full_epoch"], 3), _fmt(full_epoch_ratio(row.get("per_rep")), 3),
             _fmt(row.get("kept_param_fraction"), 3),
             _fmt(row.get("paper_speedup_pct"))] for row in r["rows"]]
    s = f"Each row: epochs {r['epoch_rule']}, {r['reps']} A/B repetitions.\n\n"
    s += table([key, "speedup %, median [IQR]", "median (min .. max)", "baseline s", "LDB s", "LDB DROP/FULL epoch",
                "LDB FULL / baseline epoch", "kept param fraction", "paper speedup %"], rows)
    return s


def _md_accuracy(result: dict[str, Any]) -> str:
    r = result["results"]
    rows = [[name, _fmt(v["final_top1"], 2), _fmt(v["best_top1"], 2), _fmt(v["train_s"], 1), _fmt(v["steps"])]
            for name, v in (("baseline", r["baseline"]), ("LDB", r["ldb"]))]
    s = (f"{r['epochs']} epochs on {r['dataset']} ({r['train_size']} train / {r['test_size']} test images), "
         f"epochs alternated baseline/LDB; evaluation not timed.\n\n")
    s += table(["run", "final top-1 %", "best top-1 %", "train time s", "optimizer steps"], rows)
    s += "\n" + table(["figure", "value"], [
        ["speedup = 1 - T_ldb / T_baseline, %", _fmt(r["speedup"] * 100)],
        ["accuracy difference (LDB - baseline), points", _fmt(r["ldb"]["final_top1"] - r["baseline"]["final_top1"], 2)],
    ])
    s += "\n" + table(["epoch", "mode", "baseline top-1", "LDB top-1", "baseline s", "LDB s"],
                      [[e["epoch"], e["mode"], _fmt(e["baseline_top1"], 2), _fmt(e["ldb_top1"], 2),
                        _fmt(e["baseline_s"], 2), _fmt(e["ldb_s"], 2)] for e in r["per_epoch"]])
    return s


def _md_scaling(result: dict[str, Any]) -> str:
    r = result["results"]
    rows = []
    for row in r["rows"]:
        rows.append([row["world_size"], _spread(row["speedup"], 100), _minmax(row["speedup"], 100),
                     _fmt(row["baseline_s"]["median"], 2), _fmt(row["ldb_s"]["median"], 2),
                     _fmt(row.get("drop_over_oracle"), 3), _fmt(row.get("bytes_full")),
                     _fmt(row.get("bytes_drop_mean")), _fmt(r["paper"].get(str(row["world_size"]))
                                                            or r["paper"].get(row["world_size"]))])
    s = "Speedup of LDB over the DeepSpeed baseline against world size (paper, Table 3).\n\n"
    s += table(["world size", "speedup %, median [IQR]", "median (min .. max)", "baseline s", "LDB s",
                "DROP / oracle DROP step", "grad bytes FULL/rank", "grad bytes DROP/rank", "paper %"], rows)
    return s




# --------------------------------------------------------------------------- plots


def _speedup_errorbar(ax: Any, xs: Sequence[float], rows: Sequence[dict[str, Any]]) -> None:
    """Median speedup (%) per x with min..max error bars: the sweep and scaling plots."""
    med = [row["speedup"]["median"] * 100 for row in rows]
    lo = [m - row["speedup"]["min"] * 100 for m, row in zip(med, rows)]
    hi = [row["speedup"]["max"] * 100 - m for m, row in zip(med, rows)]
    ax.errorbar(xs, med, yerr=[lo, hi], marker="o", capsize=4, label="this machine (median, min..max)")



def plot(result: dict[str, Any], path: str) -> str | None:
    plt = pyplot()

    mode = result["mode"]
    c = result["conditions"]
    title_cond = (f"{c.get('device')}, ws {c.get('world_size')}, {c.get('model')}, "
                  f"B={c.get('micro_batch_per_rank')}/rank, {c.get('precision')}, ZeRO-{c.get('zero_stage')}")
    r = result["results"]
    if mode == "step":
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
        names = list(r["variants"])
        med = [r["variants"][n]["total_s"]["median"] * 1e3 for n in names]
        lo = [m - r["variants"][n]["total_s"]["q1"] * 1e3 for m, n in zip(med, names)]
        hi = [r["variants"][n]["total_s"]["q3"] * 1e3 - m for m, n in zip(med, names)]
        palette = {"baseline": "#888", "ldb_full": "#4c72b0", "ldb_drop": "#dd8452", "oracle_drop": "#55a868",
                   "oracle_full": "#c44e52", "ldb_drop_kb": "#8172b3"}
        ax1.bar(names, med, yerr=[lo, hi], capsize=4, color=[palette.get(n, "#999") for n in names])
        pred = r["key_figures"].get("predicted_drop_s_dw")
        if pred:
            ax1.axhline(pred * 1e3, ls="--", color="k", lw=1, label="predicted DROP (skipped dW)")
            ax1.legend(fontsize=8)
        ax1.set_ylabel("step time, ms (median, IQR)")
        ax1.tick_params(axis="x", rotation=20)
        bottom = [0.0] * len(names)
        for phase, col in (("forward_s", "#4c72b0"), ("backward_s", "#dd8452"), ("step_s", "#55a868")):
            vals = [r["variants"][n][phase]["median"] * 1e3 for n in names]
            ax2.bar(names, vals, bottom=bottom, label=phase[:-2], color=col)
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax2.set_ylabel("ms (median per phase)")
        ax2.legend(fontsize=8)
        ax2.tick_params(axis="x", rotation=20)
        fig.suptitle(f"FULL / DROP / oracle step time - {title_cond}", fontsize=9)
    elif mode == "epochs":
        fig, ax = plt.subplots(figsize=(7, 4.5))
        b, l = r["per_rep"]["baseline_s"], r["per_rep"]["ldb_s"]
        xs = list(range(len(b)))
        ax.bar([x - 0.2 for x in xs], b, width=0.4, label="baseline", color="#888")
        ax.bar([x + 0.2 for x in xs], l, width=0.4, label="LDB", color="#dd8452")
        ax.set_xlabel("A/B repetition")
        ax.set_ylabel("schedule wall-clock time, s")
        ax.legend()
        ax.set_title(f"speedup {r['speedup']['median'] * 100:.1f}% (median; {r['speedup']['min'] * 100:.1f}.."
                     f"{r['speedup']['max'] * 100:.1f}%)\n{title_cond}", fontsize=9)
    elif mode in ("sweep-drop-rate", "sweep-sampling-rate"):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        xs = [row["value"] for row in r["rows"]]
        _speedup_errorbar(ax, xs, r["rows"])
        paper = [(row["value"], row["paper_speedup_pct"]) for row in r["rows"] if row.get("paper_speedup_pct")]
        if paper:
            ax.plot(*zip(*paper), "s--", color="#c44e52", label="paper (GPU)")
        ax.set_xlabel(r["parameter"])
        ax.set_ylabel("speedup = 1 - T_ldb/T_base, %")
        ax.axhline(0, color="k", lw=0.5)
        ax.legend(fontsize=8)
        ax.set_title(f"{mode}\n{title_cond}", fontsize=9)
    elif mode == "accuracy":
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
        ep = [e["epoch"] for e in r["per_epoch"]]
        ax1.plot(ep, [e["baseline_top1"] for e in r["per_epoch"]], "o-", label="baseline", color="#888")
        ax1.plot(ep, [e["ldb_top1"] for e in r["per_epoch"]], "o-", label="LDB", color="#dd8452")
        ax1.set_xlabel("epoch")
        ax1.set_ylabel("test top-1, %")
        ax1.legend()
        ax2.bar(["baseline", "LDB"], [r["baseline"]["train_s"], r["ldb"]["train_s"]], color=["#888", "#dd8452"])
        ax2.set_ylabel("training wall-clock time, s")
        ax2.set_title(f"speedup {r['speedup'] * 100:.1f}%", fontsize=9)
        fig.suptitle(f"accuracy on {r['dataset']} - {title_cond}", fontsize=9)
    elif mode == "scaling":
        fig, ax = plt.subplots(figsize=(7, 4.5))
        xs = [row["world_size"] for row in r["rows"]]
        _speedup_errorbar(ax, xs, r["rows"])
        paper = sorted((int(k), v) for k, v in r["paper"].items())
        ax.plot(*zip(*paper), "s--", color="#c44e52", label="paper Table 3 (GPUs)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("world size")
        ax.set_ylabel("speedup = 1 - T_ldb/T_base, %")
        ax.legend(fontsize=8)
        ax.set_title(f"scaling\n{title_cond}", fontsize=9)
    else:
        return None
    return save(fig, path)


# --------------------------------------------------------------------------- tensorboard


def scalars(result: dict[str, Any]) -> list[tuple[str, float, int]]:
    """(tag, value, step) triples for one result; tags are namespaced ``bench/<mode>/...``."""
    mode, r = result["mode"], result["results"]
    pre = f"bench/{mode}"
    out: list[tuple[str, float, int]] = []
    if mode == "step":
        for name, v in r["variants"].items():
            for i, t in enumerate(v.get("samples_s", [])):
                out.append((f"{pre}/{name}_step_ms", t * 1e3, i))
            out.append((f"{pre}/{name}_median_ms", v["total_s"]["median"] * 1e3, 0))
        for key in ("drop_over_full_measured", "drop_over_full_predicted_dw", "dw_share_of_full"):
            out.append((f"{pre}/{key}", r["key_figures"][key], 0))
        out.append((f"{pre}/drop_over_oracle", r["key_figures"]["drop_over_oracle"]["median"], 0))
        out.append((f"{pre}/grad_bytes_full", r["bytes"]["full_counted"], 0))
        out.append((f"{pre}/grad_bytes_drop_mean", r["bytes"]["drop_counted_mean"], 0))
    elif mode == "epochs":
        for i, (b, l) in enumerate(zip(r["per_rep"]["baseline_s"], r["per_rep"]["ldb_s"])):
            out += [(f"{pre}/baseline_s", b, i), (f"{pre}/ldb_s", l, i), (f"{pre}/speedup_pct", 100 * (1 - l / b), i)]
    elif mode in ("sweep-drop-rate", "sweep-sampling-rate"):
        for row in r["rows"]:
            step = int(round(row["value"] * 100)) if mode == "sweep-drop-rate" else int(row["value"])
            out.append((f"{pre}/speedup_pct", row["speedup"]["median"] * 100, step))
    elif mode == "accuracy":
        for e in r["per_epoch"]:
            out += [(f"{pre}/baseline_top1", e["baseline_top1"], e["epoch"]),
                    (f"{pre}/ldb_top1", e["ldb_top1"], e["epoch"]),
                    (f"{pre}/baseline_epoch_s", e["baseline_s"], e["epoch"]),
                    (f"{pre}/ldb_epoch_s", e["ldb_s"], e["epoch"])]
        out.append((f"{pre}/speedup_pct", r["speedup"] * 100, 0))
    elif mode == "scaling":
        for row in r["rows"]:
            out.append((f"{pre}/speedup_pct", row["speedup"]["median"] * 100, row["world_size"]))
    return out
