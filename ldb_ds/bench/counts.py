"""``counts`` mode: per FULL and DROP step, what the baseline and LDB launch. Counted, not guessed.

For each model and ZeRO stage (``--count-models``, ``--count-stages``), one baseline FULL step,
one LDB FULL step and ``--count-steps`` LDB DROP steps (after one untimed step of each), with:

* every collective by kind, its calls and its message bytes, counted at DeepSpeed's backend object
  and at ``torch.distributed`` (:class:`.comm_count.CollectiveCounter`; ldb_ds's own mask broadcast
  included), and the gradient bytes among them;
* the optimizer: how often DeepSpeed calls the basic optimizer's ``step``, how many param groups it
  presents in those calls (all, and those holding parameters), how many of the calls reach torch's
  ``Optimizer.step`` (torch.profiler's ``Optimizer.step#...`` ranges), and the ``aten::_foreach_*``
  and ``aten::_fused_*`` ops (the kernels a GPU launches per step for the update) from torch.profiler
  op counts on the CPU. A torch optimizer is forced to ``foreach=True``: torch picks foreach kernels
  by default only for cuda/xpu tensors, so on a CPU it would otherwise count per-tensor ops and not
  predict a GPU's launches;
* the number of param groups of the basic optimizer.

Counts are deterministic (same seed, same masks): they can be taken on a busy machine at a tiny batch.
"""

from __future__ import annotations

import contextlib
import copy
from collections import Counter
from typing import Any, Iterator

from ..process import input_dtype
from . import report as rep
from .alphabeta import GATHERS, REDUCTIONS
from .comm_count import ONE_LAUNCH, CollectiveCounter, ReductionCounter
from ..schedule import first_drop_epoch
from .harness import BenchContext, barrier, drop_steps_at_the_full_batch, ds_config, make_model, result

PHASES = ("forward", "backward", "optimizer")


def force_foreach(cfg: dict[str, Any]) -> bool:
    """Set ``foreach=True`` on a torch optimizer in the DeepSpeed config; whether it applied.

    DeepSpeed builds ``getattr(torch.optim, type)`` for a type that is not one of its own
    (``DEEPSPEED_OPTIMIZERS``; deepspeed/runtime/engine.py ``_configure_basic_optimizer``), so the
    flag reaches torch. DeepSpeed's own optimizers (FusedAdam, ...) are left alone.
    """
    import torch
    from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS

    opt = cfg.get("optimizer") or {}
    name = str(opt.get("type", ""))
    if name.lower() in DEEPSPEED_OPTIMIZERS or not isinstance(getattr(torch.optim, name, None), type):
        return False
    opt.setdefault("params", {})["foreach"] = True
    return True


@contextlib.contextmanager
def counting_optimizer_calls(optimizer: Any) -> Iterator[list[tuple[int, int]]]:
    """Record, per call of ``optimizer.step``: (param groups presented, groups holding parameters).

    Wraps whatever ``step`` is in place (ldb_ds's group filter on the LDB side), from outside: it sees
    the groups DeepSpeed presents, before ldb_ds hides the dropped ones.
    """
    calls: list[tuple[int, int]] = []
    had_instance = "step" in vars(optimizer)
    inner = optimizer.step

    def step(*args: Any, **kwargs: Any) -> Any:
        groups = optimizer.param_groups
        calls.append((len(groups), sum(1 for g in groups if len(g["params"]))))
        return inner(*args, **kwargs)

    optimizer.step = step
    try:
        yield calls
    finally:
        if had_instance:
            optimizer.step = inner
        else:
            del optimizer.step


def op_counts(prof: Any) -> dict[str, Any]:
    """Per phase: foreach/fused op calls (by name), torch optimizer steps, all aten ops."""
    out: dict[str, Any] = {p: {"foreach_fused": Counter(), "optimizer_steps": 0, "aten_ops": 0} for p in PHASES}
    out["other"] = {"foreach_fused": Counter(), "optimizer_steps": 0, "aten_ops": 0}
    for ev in prof.events():
        node, phase = ev, "other"
        while node is not None:
            if node.name.startswith("bench.") and node.name[6:] in PHASES:
                phase = node.name[6:]
                break
            node = node.cpu_parent
        row = out[phase]
        if ev.name.startswith(("aten::_foreach_", "aten::_fused_", "aten::_amp_foreach_")):
            row["foreach_fused"][ev.name] += 1
        elif ev.name.startswith("Optimizer.step#"):
            row["optimizer_steps"] += 1
        if ev.name.startswith("aten::"):
            row["aten_ops"] += 1
    for row in out.values():
        row["foreach_fused"] = dict(sorted(row["foreach_fused"].items()))
    return out


def count_step(engine: Any, x: Any, y: Any, profile: bool = True) -> dict[str, Any]:
    """One training step of ``engine`` with its collectives, optimizer calls and ops counted."""
    import torch.nn.functional as F
    from torch.profiler import ProfilerActivity, profile as torch_profile, record_function

    from ..zero_hooks import basic_optimizer

    opt = basic_optimizer(engine.ds_engine)
    prof_ctx = torch_profile(activities=[ProfilerActivity.CPU]) if profile else contextlib.nullcontext()
    with counting_optimizer_calls(opt) as calls, CollectiveCounter() as comm, prof_ctx as prof:
        with record_function("bench.forward"):
            loss = F.cross_entropy(engine(x).float(), y)
        with record_function("bench.backward"):
            engine.backward(loss)
        with record_function("bench.optimizer"):
            engine.step()
    grad = [c for c in comm.calls if c.kind in REDUCTIONS and c.numel >= ReductionCounter.MIN_NUMEL
            and not c.not_a_gradient]
    out: dict[str, Any] = {
        "collectives": comm.summary(),
        "collective_calls": len(comm.calls), "collective_bytes": sum(c.bytes for c in comm.calls),
        "direct_torch_calls": sum(1 for c in comm.calls if c.source == "torch.distributed"),
        "grad_bytes": sum(c.bytes for c in grad), "grad_reductions": len(grad),
        "messages": [[c.kind, c.bytes] for c in comm.calls],
        "optimizer_calls": len(calls), "groups_presented": sum(n for n, _ in calls),
        "groups_nonempty": sum(k for _, k in calls), "param_groups": len(opt.param_groups),
        "dropped_units": len(engine.ldb.dropped_units) if engine.ldb.enabled else 0,
    }
    if profile:
        ops = op_counts(prof)
        out["ops"] = ops
        out["torch_optimizer_steps"] = sum(r["optimizer_steps"] for r in ops.values())
        out["foreach_fused_ops"] = sum(sum(r["foreach_fused"].values()) for r in ops.values())
        out["foreach_fused_ops_optimizer"] = sum(ops["optimizer"]["foreach_fused"].values())
    return out


def mean_counts(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The mean of the numeric figures over DROP steps (their masks differ), kinds merged."""
    n = len(rows)
    out: dict[str, Any] = {}
    for key, value in rows[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = sum(r[key] for r in rows) / n
    kinds = sorted({k for r in rows for k in r["collectives"]})
    out["collectives"] = {k: {f: sum(r["collectives"].get(k, {}).get(f, 0) for r in rows) / n
                              for f in ("calls", "bytes")} for k in kinds}
    out["steps"] = n
    out["messages_all"] = [r["messages"] for r in rows]
    out["per_step"] = [{k: r[k] for k in ("collective_calls", "grad_bytes", "optimizer_calls", "dropped_units")}
                       for r in rows]
    return out


def count_model(ctx: BenchContext, model_name: str, stage: int) -> dict[str, Any]:
    """Baseline FULL, LDB FULL and the mean LDB DROP step of one model at one ZeRO stage."""
    import torch

    import ldb_ds

    opts = copy.deepcopy(ctx.opts)
    opts.run.model, opts.run.zero_stage = model_name, stage
    run = opts.run
    init_model = make_model(opts)
    engines, forced = {}, False
    for name, enabled in (("baseline", False), ("ldb", True)):
        cfg = ds_config(opts, enabled)
        forced = force_foreach(cfg)
        model = copy.deepcopy(init_model)
        if run.precision == "bf16":
            model = model.bfloat16()
        engines[name], _, _, _ = ldb_ds.initialize(model=model, model_parameters=list(model.parameters()), config=cfg)
    base, ldb = engines["baseline"], engines["ldb"]
    g = torch.Generator().manual_seed(run.seed * 1000 + ctx.rank)
    x = torch.randn(run.batch_size, 3, run.img_size, run.img_size, generator=g).to(ctx.device, input_dtype(ldb))
    y = torch.randint(0, run.num_classes, (run.batch_size,), generator=g).to(ctx.device)
    drop_epoch = first_drop_epoch(ldb.ldb.config)
    profile = opts.counts.count_profile
    # Two uncounted steps of each kind first: the first steps create optimizer state and buffers,
    # and ZeRO-3 records its parameter trace and checks it across ranks (broadcasts) once.
    for _ in range(2):
        count_step(base, x, y, profile=False)
    ldb.set_epoch(0)
    for _ in range(2):
        count_step(ldb, x, y, profile=False)
    ldb.set_epoch(drop_epoch)
    for _ in range(2):
        count_step(ldb, x, y, profile=False)
    barrier(ctx)
    rows = {"baseline_full": count_step(base, x, y, profile)}
    ldb.set_epoch(0)
    rows["ldb_full"] = count_step(ldb, x, y, profile)
    ldb.set_epoch(drop_epoch)
    drops = [count_step(ldb, x, y, profile) for _ in range(opts.counts.count_steps)]
    rows["ldb_drop"] = mean_counts(drops)
    params = sum(p.numel() for p in init_model.parameters())
    res = {"model": model_name, "zero_stage": stage, "params": params, "units": len(ldb.ldb.units),
           "foreach_forced": forced, "rows": rows}
    base.destroy()
    ldb.destroy()
    ctx.log(f"counts: {model_name} ZeRO-{stage}: {len(ldb.ldb.units)} units; collectives per step "
            f"baseline {rows['baseline_full']['collective_calls']}, LDB FULL {rows['ldb_full']['collective_calls']}, "
            f"LDB DROP {rows['ldb_drop']['collective_calls']:.1f}")
    return res


def run_counts(ctx: BenchContext) -> dict[str, Any]:
    c = ctx.opts.counts
    models = list(c.count_models) or [ctx.opts.run.model]
    stages = list(c.count_stages)
    with drop_steps_at_the_full_batch():  # DROP steps counted at the FULL step's batch
        tables = [count_model(ctx, m, s) for m in models for s in stages]
    seen = sorted({k for t in tables for row in t["rows"].values() for k in row["collectives"]})
    notes = ["Coalesced and list-form collectives count as ONE call each: "
             + "; ".join(f"{k}: {v}" for k, v in ONE_LAUNCH.items())
             + f". Kinds seen in these steps: {', '.join(seen)}"
             + (" (none of them coalesced)." if not set(seen) & set(ONE_LAUNCH) else ".")]
    notes.append("Message bytes: the full-size tensor of each collective (an all-reduce's tensor, a "
                 "reduce-scatter's input, an all-gather's output), per rank. DROP rows are means over "
                 f"{c.count_steps} DROP steps (different masks).")
    if ctx.world_size == 1:
        notes.append("World size 1: DeepSpeed skips some collectives with one rank; count at world size 2.")
    out = result(ctx, "counts", {"tables": tables, "models": models, "stages": stages, "steps": c.count_steps},
                 notes=notes, timed=False)
    out["conditions"]["model"] = ",".join(models)
    out["conditions"]["zero_stage"] = ",".join(str(s) for s in stages)
    return out


# --------------------------------------------------------------------------- rendering


def _mb(b: float) -> str:
    for scale, unit in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if b >= scale:
            return f"{b / scale:.2f} {unit}"
    return f"{b:.0f} B"


def _kind_cell(row: dict[str, Any], kinds: tuple[str, ...]) -> str:
    calls = sum(row["collectives"].get(k, {}).get("calls", 0) for k in kinds)
    size = sum(row["collectives"].get(k, {}).get("bytes", 0) for k in kinds)
    if not calls:
        return "-"
    return f"{rep.fmt_count(calls)} / {_mb(size)}"


ALL_REDUCES = ("all_reduce", "all_reduce_coalesced", "reduce")
SCATTERS = ("reduce_scatter", "reduce_scatter_tensor")
LABEL = {"baseline_full": "baseline", "ldb_full": "LDB FULL", "ldb_drop": "LDB DROP (mean)"}


def markdown(result: dict[str, Any]) -> str:
    r = result["results"]
    rows = []
    for t in r["tables"]:
        for key, row in t["rows"].items():
            other = sorted(set(row["collectives"]) - set(REDUCTIONS) - set(GATHERS) - {"broadcast"})
            rows.append([t["model"], f"{t['params'] / 1e6:.1f}", t["zero_stage"], t["units"], LABEL[key],
                         _kind_cell(row, ALL_REDUCES), _kind_cell(row, SCATTERS), _kind_cell(row, GATHERS),
                         _kind_cell(row, ("broadcast",)),
                         _kind_cell(row, tuple(other)) if other else "-",
                         rep.fmt_count(row["collective_calls"]), _mb(row["grad_bytes"]),
                         rep.fmt_count(row["param_groups"]), rep.fmt_count(row["optimizer_calls"]),
                         rep.fmt_count(row["groups_nonempty"]), rep.fmt_count(row.get("torch_optimizer_steps")),
                         rep.fmt_count(row.get("foreach_fused_ops_optimizer"))])
    s = ("Per step and rank. Collective cells: calls / message bytes. 'optimizer calls': DeepSpeed's calls "
         "of the basic optimizer's step; 'groups with params': summed over those calls, as DeepSpeed presents "
         "them (before ldb_ds hides dropped groups); 'torch steps': calls that reached torch's "
         "Optimizer.step; 'foreach/fused ops': aten::_foreach_* and aten::_fused_* calls in the optimizer "
         "phase (torch.profiler, foreach=True forced).\n\n")
    s += rep.table(["model", "params M", "ZeRO", "units", "step", "all-reduces", "reduce-scatters", "all-gathers", "broadcasts",
                    "other",
                    "collectives", "gradient bytes", "param groups", "optimizer calls", "groups with params",
                    "torch steps", "foreach/fused ops"], rows)
    return s


def plot(result: dict[str, Any], path: str) -> str:
    plt = rep.pyplot()
    tables = result["results"]["tables"]
    labels = [f"{t['model']}\nZeRO-{t['zero_stage']}" for t in tables]
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.3 * len(tables) + 4), 4.5))
    width = 0.27
    for ax, key, title in ((axes[0], "collective_calls", "collectives per step"),
                           (axes[1], "foreach_fused_ops_optimizer", "foreach/fused ops in the optimizer step")):
        for j, (variant, color) in enumerate((("baseline_full", "#888"), ("ldb_full", "#4c72b0"),
                                              ("ldb_drop", "#dd8452"))):
            ax.bar([i + (j - 1) * width for i in range(len(tables))],
                   [t["rows"][variant].get(key) or 0 for t in tables], width, label=LABEL[variant], color=color)
        ax.set_xticks(range(len(tables)), labels, fontsize=7)
        ax.set_yscale("symlog")
        ax.set_title(title, fontsize=9)
    axes[0].legend(fontsize=8)
    c = result["conditions"]
    fig.suptitle(f"counts per step and rank - {c.get('device')}, ws {c.get('world_size')}, "
                 f"B={c.get('micro_batch_per_rank')}/rank, {c.get('precision')}", fontsize=9)
    return rep.save(fig, path)


def scalars(result: dict[str, Any]) -> list[tuple[str, float, int]]:
    out = []
    for t in result["results"]["tables"]:
        for variant, row in t["rows"].items():
            pre = f"bench/counts/{t['model']}/{variant}"
            out += [(f"{pre}/collectives", row["collective_calls"], t["zero_stage"]),
                    (f"{pre}/grad_bytes", row["grad_bytes"], t["zero_stage"]),
                    (f"{pre}/optimizer_calls", row["optimizer_calls"], t["zero_stage"])]
    return out


__all__ = ["run_counts", "count_step", "count_model", "force_foreach", "op_counts", "markdown", "plot", "scalars"]
