"""The ``host`` mode's Markdown tables, plot and TensorBoard scalars (:mod:`.host` measures)."""

from __future__ import annotations

from typing import Any

from .host import STEP_OPS_SLACK, US_PER_UNIT_TARGET, VARIANTS, WAITS_SLACK, per_unit_us, waits
from .host_count import PHASES


def _ok(flag: Any) -> str:
    return "-" if flag is None else ("ok" if flag else "**FAIL**")


def _verdict(target: dict[str, Any] | None, key: str) -> str:
    """'ok (+3)' / '**FAIL** (+12)': the target's verdict and the excess over plain DeepSpeed."""
    if target is None:
        return "-"
    return f"{_ok(target[key + '_ok'])} ({target[key + '_over_deepspeed']:+d})"


def markdown(res: dict[str, Any]) -> str:
    from . import report as rep

    r = res["results"]
    cuda = r.get("cuda", False)
    s = ("Per step and rank. ops: aten ops that do work (fwd / bwd / step); waits: syncs + blocking "
         "host-to-device copies over all phases (syncs, copies); collectives: calls / bytes; us/unit: "
         "(variant - off) / N, wall clock, from the medians; cpu us/unit: the same from the rank thread's "
         "CPU time (time.thread_time), paired by round where recorded (per round the variant's mean step "
         "minus off's, median [IQR] over rounds; the deepspeed row is the null control, the same DeepSpeed "
         "step: its figure is the measurement's error). The time target reads FULL's paired figure; "
         "'unresolved' when it is within the resolution (the null's offset or half the IQR) of the "
         "target. Targets per cell: step ops and waits of FULL and DROP against DeepSpeed's.\n\n")
    for units in sorted({c["units"] for c in r["cells"]}):
        rows = []
        for c in (c for c in r["cells"] if c["units"] == units):
            for v in r["variants"]:
                row = c["variants"][v]
                ph = row["phases"]
                t = c["times"][v]
                us = per_unit_us(c["times"], v, units) if v in ("full", "drop") else None
                cpu_us = _cpu_us_text(c, v, units)
                target = c["targets"].get(v) if v in ("full", "drop") else None
                rows.append([c["cell"], v, " / ".join(str(ph[p]["ops"]) for p in PHASES),
                             f"{waits(row, cuda)} ({row['syncs']}, {row['copies']})"
                             + (f" w{row['sync_warnings']}" if cuda else ""),
                             " / ".join(str(ph[p]["kernels"]) for p in PHASES) if cuda else "-",
                             f"{row['collectives']['calls']} / {row['collectives']['bytes']:,}",
                             rep.spread(t, 1e3, 2), "-" if us is None else f"{us:.1f}",
                             cpu_us, _verdict(target, "step_ops"), _verdict(target, "waits"),
                             "-" if target is None or v != "full" else _time_verdict(c["targets"])])
        s += f"#### N = {units} units\n\n"
        s += rep.table(["cell", "variant", "ops fwd / bwd / step", "waits (syncs, copies)",
                        "kernels fwd / bwd / step", "collectives", "ms/step [IQR]", "us/unit", "cpu us/unit",
                        f"step ops <= DS+{STEP_OPS_SLACK}", f"waits <= DS+{WAITS_SLACK}",
                        f"<= {US_PER_UNIT_TARGET:g} us/unit"], rows)
        s += "\n"
    failing = [f"N={c['units']} {c['cell']}" for c in r["cells"] if not c["targets"]["counts_ok"]]
    s += (f"Count targets met in {len(r['cells']) - len(failing)} of {len(r['cells'])} cells"
          + (f"; failing: {', '.join(failing)}.\n" if failing else ".\n"))
    timed = [c for c in r["cells"] if c["targets"].get("paired_us_per_unit") is not None]
    if timed:
        n = max(c["units"] for c in timed)
        rows = [[c["cell"], _cpu_us_text(c, "full", n), _cpu_us_text(c, "deepspeed", n),
                 f"{c['targets']['resolution_us_per_unit']:.1f}", _time_verdict(c["targets"]), _floor_text(c)]
                for c in timed if c["units"] == n]
        s += (f"\n#### Time target at N = {n}: (FULL - off) / N, thread CPU time, paired by round\n\n"
              + rep.table(["cell", "FULL - off, us/unit [IQR]", "null: deepspeed - off", "resolution",
                           f"<= {US_PER_UNIT_TARGET:g} us/unit",
                           "of which torch's optimizer over one tensor per unit [IQR]; the rest"], rows))
        met = sum(1 for c in timed if c["units"] == n and c["targets"]["us_per_unit_ok"])
        unresolved = sum(1 for c in timed if c["units"] == n and not c["targets"]["us_per_unit_resolved"])
        s += (f"\nMet in {met} of {len(rows)} cells; {unresolved} of the {len(rows)} verdicts are unresolved "
              "(the figure is within the resolution of the target).\n")
    return s


def _cpu_us_text(cell: dict[str, Any], variant: str, units: int) -> str:
    """(variant - off) / N of thread CPU time: paired 'median [q1, q3]' if recorded, else from the medians."""
    paired = cell.get("paired_cpu_us_per_unit")
    if paired and variant in paired and paired[variant]["n"]:
        p = paired[variant]
        return f"{p['median']:.1f} [{p['q1']:.1f}, {p['q3']:.1f}]"
    if variant in ("full", "drop") and "cpu_times" in cell:
        return f"{per_unit_us(cell['cpu_times'], variant, units):.1f}"
    return "-"


def _floor_text(cell: dict[str, Any]) -> str:
    """'8.1 [7.5, 8.8] (400 tensors vs 1); 1.2': the optimizer floor and FULL - off less it."""
    floor, t = cell.get("optimizer_floor_us_per_unit"), cell["targets"]
    if not floor or not floor["n"] or "us_per_unit_less_optimizer_floor" not in t:
        return "-"
    counts = cell["optimizer_tensors"]
    return (f"{floor['median']:.1f} [{floor['q1']:.1f}, {floor['q3']:.1f}] ({counts['ldb']} tensors vs "
            f"{counts['off']}); {t['us_per_unit_less_optimizer_floor']:.1f}")


def _time_verdict(target: dict[str, Any]) -> str:
    verdict = _ok(target["us_per_unit_ok"])
    return verdict if target.get("us_per_unit_resolved", True) else f"unresolved ({verdict})"


def plot(res: dict[str, Any], path: str) -> str:
    from . import report as rep

    plt = rep.pyplot()
    cells = res["results"]["cells"]
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 0.45 * len(cells) + 4), 4.5))
    width = 0.2
    labels = [f"N={c['units']}\n{c['cell']}" for c in cells]
    for ax, title, get in ((axes[0], "step-phase aten ops", lambda row: row["phases"]["step"]["ops"]),
                           (axes[1], "syncs + copies per step", lambda row: row["syncs"] + row["copies"])):
        for j, v in enumerate(VARIANTS):
            ax.bar([i + (j - 1.5) * width for i in range(len(cells))], [get(c["variants"][v]) for c in cells],
                   width, label=v)
        ax.set_xticks(range(len(cells)), labels, fontsize=5, rotation=90)
        ax.set_title(title, fontsize=9)
    axes[0].legend(fontsize=7)
    c = res["conditions"]
    fig.suptitle(f"host work per step - {c.get('device')}, ws {c.get('world_size')}", fontsize=9)
    return rep.save(fig, path)


def scalars(res: dict[str, Any]) -> list[tuple[str, float, int]]:
    out = []
    for c in res["results"]["cells"]:
        tag = f"bench/host/zero{c['zero_stage']}_{c['precision']}_{c['optimizer']}"
        for v in VARIANTS:
            row = c["variants"][v]
            out += [(f"{tag}/{v}/step_ops", row["phases"]["step"]["ops"], c["units"]),
                    (f"{tag}/{v}/waits", row["syncs"] + row["copies"], c["units"]),
                    (f"{tag}/{v}/ms_per_step", c["times"][v]["median"] * 1e3, c["units"])]
        out.append((f"{tag}/us_per_unit", c["targets"]["us_per_unit"], c["units"]))
        if c["targets"].get("cpu_us_per_unit") is not None:
            out.append((f"{tag}/cpu_us_per_unit", c["targets"]["cpu_us_per_unit"], c["units"]))
        if c["targets"].get("paired_us_per_unit") is not None:
            out += [(f"{tag}/paired_us_per_unit", c["targets"]["paired_us_per_unit"], c["units"]),
                    (f"{tag}/resolution_us_per_unit", c["targets"]["resolution_us_per_unit"], c["units"])]
        if c["targets"].get("optimizer_floor_us_per_unit") is not None:
            out.append((f"{tag}/optimizer_floor_us_per_unit", c["targets"]["optimizer_floor_us_per_unit"], c["units"]))
    return out


__all__ = ["markdown", "plot", "scalars"]
