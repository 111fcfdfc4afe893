"""Where a step's time goes: per-module costs (forward, input gradient, weight gradient), the
optimizer's per-call, per-group and per-element costs, and torch.profiler op tables."""

from __future__ import annotations

import copy
import time
from typing import Any, Callable

from ..process import synchronize
from . import report as rep


def leaf_modules(model: Any) -> tuple[dict[str, Any], list[str]]:
    """Modules that own parameters and have no children (timeable on their own), and the others."""
    leaves, skipped = {}, []
    for name, mod in model.named_modules():
        if not any(True for _ in mod.parameters(recurse=False)):
            continue
        if any(True for _ in mod.children()):
            skipped.append(name or "<root>")
            continue
        leaves[name] = mod
    return leaves, skipped


def capture_inputs(model: Any, leaves: dict[str, Any], x: Any) -> dict[str, Any]:
    """The single tensor input each leaf module saw in one forward pass of ``model`` on ``x``."""
    import torch

    captured: dict[str, Any] = {}

    def hook(name: str):
        def fn(mod, inputs, output):
            if len(inputs) == 1 and torch.is_tensor(inputs[0]) and torch.is_tensor(output):
                captured[name] = inputs[0].detach().clone()
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in leaves.items()]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return captured


def weight_grad_costs(model: Any, x: Any, reps: int = 5) -> tuple[dict[str, float], list[str]]:
    """Seconds of weight-gradient (dW) work per parameter, each leaf module timed in isolation.

    For every leaf module that owns parameters, its input of a real forward pass is captured;
    then ``autograd.grad`` of its output is timed once for the input only (dX) and once for the
    input and the parameters (dX + dW). The difference is the module's dW cost, split over its
    parameters by size. This is the work a DROP step skips for a dropped unit; it is what LDB
    can save in the backward pass. Returns the costs and the modules that could not be timed
    (not a leaf, or not a single tensor input): their parameters count as 0.
    """
    import torch

    model = copy.deepcopy(model)
    model.train()
    leaves, skipped = leaf_modules(model)
    captured = capture_inputs(model, leaves, x)
    costs: dict[str, float] = {}
    for name, mod in leaves.items():
        if name not in captured:
            skipped.append(name)
            continue
        own = list(mod.named_parameters(recurse=False))
        prefix = f"{name}." if name else ""
        inp = captured[name].requires_grad_(captured[name].is_floating_point())
        out = mod(inp)
        g = torch.randn_like(out)
        wrt_x = [inp] if inp.requires_grad else []
        params = [p for _, p in own]

        def timed(wrt):
            ts = []
            for _ in range(reps + 1):  # the first call warms caches and is dropped
                synchronize()
                t = time.perf_counter()
                torch.autograd.grad(out, wrt, g, retain_graph=True, allow_unused=True)
                synchronize()
                ts.append(time.perf_counter() - t)
            return rep.stats(ts[1:])["median"]

        t_x = timed(wrt_x) if wrt_x else 0.0
        t_all = timed(wrt_x + params)
        dw = max(t_all - t_x, 0.0)
        total = sum(p.numel() for p in params) or 1
        for pn, p in own:
            costs[prefix + pn] = dw * p.numel() / total
    return costs, skipped


def profile_table(step: Callable[[], Any], steps: int = 2, top: int = 15) -> list[dict[str, Any]]:
    """Top ops by self time over ``steps`` calls of ``step`` (torch.profiler), per step."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            step()
    rows = []
    events = prof.key_averages()
    dev_attr = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
    for ev in sorted(events, key=lambda e: e.self_cpu_time_total + getattr(e, dev_attr, 0), reverse=True)[:top]:
        rows.append({"op": ev.key, "self_cpu_ms": ev.self_cpu_time_total / 1e3 / steps,
                     "self_device_ms": getattr(ev, dev_attr, 0) / 1e3 / steps, "calls": ev.count / steps})
    return rows


# --------------------------------------------------------------------------- profiled costs (project mode)


def _device_timing() -> bool:
    """Whether the profiler can time kernels on the device (CUDA); else it times the host (CPU)."""
    import torch
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name() == "cuda" and torch.cuda.is_available()


def profiled_seconds(regions: dict[str, Callable[[], Any]], reps: int) -> dict[str, float]:
    """Seconds per call of each region: the median over ``reps`` interleaved calls, measured by torch.profiler.

    A region may time parts of itself in nested ranges named ``ldb_bench::<part>`` (:func:`part`); those
    parts are returned as well.

    On a CUDA device a call's time is the device time of the kernels it launched (the profiler's
    ``device_time_total`` of the region's range, which includes its children); on the CPU it is the
    range's host time (``cpu_time_total``). The median, because on a shared machine interference only
    ever adds time. One warm-up call of each region is not profiled.
    """
    from torch.profiler import ProfilerActivity, profile, record_function

    on_device = _device_timing()
    for fn in regions.values():
        fn()
    synchronize()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_device else [])
    with profile(activities=acts) as prof:
        for _ in range(reps):
            for name, fn in regions.items():
                with record_function(f"ldb_bench::{name}"):
                    fn()
        synchronize()
    calls: dict[str, list[float]] = {name: [] for name in regions}
    for ev in prof.events():
        if ev.name.startswith("ldb_bench::"):
            us = getattr(ev, "device_time_total", getattr(ev, "cuda_time_total", 0.0)) if on_device \
                else ev.cpu_time_total
            calls.setdefault(ev.name[len("ldb_bench::"):], []).append(us / 1e6)
    return {name: rep.stats(ts)["median"] for name, ts in calls.items()}


def part(name: str) -> Any:
    """A nested range that :func:`profiled_seconds` times on its own."""
    from torch.profiler import record_function

    return record_function(f"ldb_bench::{name}")


def _flops(fn: Callable[[], Any]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def module_costs(model: Any, x: Any, reps: int) -> tuple[dict[str, dict[str, float]], list[str]]:
    """Per leaf module that owns parameters: forward, input-gradient (dX) and weight-gradient (dW)
    seconds (profiled, :func:`profiled_seconds`) and FLOPs (torch's FlopCounterMode), on the input
    it saw in a real forward pass. dW = (dX + dW) - dX. Returns the costs and the modules that could
    not be timed in isolation (not a leaf, or not a single tensor input)."""
    import torch

    leaves, skipped = leaf_modules(model)
    captured = capture_inputs(model, leaves, x)
    out: dict[str, dict[str, float]] = {}
    for name, mod in leaves.items():
        if name not in captured:
            skipped.append(name)
            continue
        inp = captured[name].requires_grad_(captured[name].is_floating_point())
        params = list(mod.parameters(recurse=False))
        out_t = mod(inp)
        g = torch.randn_like(out_t)
        wrt_x = [inp] if inp.requires_grad else []

        def fwd():
            with torch.no_grad():
                mod(inp)

        def grad(wrt):
            return lambda: torch.autograd.grad(out_t, wrt, g, retain_graph=True, allow_unused=True)

        regions = {"fwd": fwd, "dxdw": grad(wrt_x + params)}
        if wrt_x:
            regions["dx"] = grad(wrt_x)
        t = profiled_seconds(regions, reps)
        f = {"fwd": _flops(fwd), "dxdw": _flops(regions["dxdw"]), "dx": _flops(regions["dx"]) if wrt_x else 0}
        dx = t.get("dx", 0.0)
        out[name] = {"forward_s": t["fwd"], "dx_s": dx, "dw_s": max(t["dxdw"] - dx, 0.0),
                     "forward_flops": f["fwd"], "dx_flops": f["dx"], "dw_flops": max(f["dxdw"] - f["dx"], 0),
                     "params": [pn for pn, _ in mod.named_parameters(recurse=False)]}
    return out, skipped


def model_costs(model: Any, batches: dict[str, tuple[Any, Any]], reps: int) -> dict[str, dict[str, float]]:
    """Whole-model seconds per batch (profiled, all batches interleaved): forward with the loss, backward,
    and backward with every weight frozen (input gradients only; timed separately, not by difference);
    plus the forward FLOPs."""
    import torch.nn.functional as F

    params = [p for p in model.parameters() if p.requires_grad]
    regions: dict[str, Callable[[], Any]] = {}
    flops = {}
    for label, (x, y) in batches.items():
        xg = x.detach().clone().requires_grad_(True)

        def forward(xg=xg, y=y):
            return F.cross_entropy(model(xg).float(), y)

        def train_step(label=label, forward=forward):
            with part(f"{label}/fwd"):
                loss = forward()
            with part(f"{label}/bwd"):
                loss.backward()
            for p in params:
                p.grad = None
            for p in params:
                p.requires_grad_(False)
            try:
                loss = forward()
                with part(f"{label}/bwd_dx"):
                    loss.backward()
            finally:
                for p in params:
                    p.requires_grad_(True)

        regions[label] = train_step
        flops[label] = _flops(forward)
    t = profiled_seconds(regions, reps)
    return {label: {"forward_s": t[f"{label}/fwd"], "backward_s": t[f"{label}/bwd"],
                    "backward_dx_only_s": t[f"{label}/bwd_dx"], "forward_flops": flops[label]} for label in batches}


def optimizer_costs(unit_numels: list[int], reps: int, lr: float, momentum: float, weight_decay: float,
                    device: Any) -> dict[str, float]:
    """Per-call, per-group and per-element seconds of ``torch.optim.SGD(foreach=True)`` (profiled, at
    least 20 repetitions: a step is short).

    One flat fp32 tensor per unit, as ZeRO keeps one flat partition per param group. Three layouts:
    one call over one group holding all units (t1), one call over one group per unit (t2), one call
    per unit's group (t3, DeepSpeed's ZeRO-1/2/3 loop). Then per group = (t2 - t1) / (n - 1), per
    call = (t3 - t2) / (n - 1), per element = (t1 - call - group) / elements (clamped at 0).
    """
    import torch

    flats = [torch.zeros(n, device=device, requires_grad=True) for n in unit_numels]
    for f in flats:
        f.grad = torch.randn_like(f) * 1e-3
    kw = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "foreach": True}
    one = torch.optim.SGD([{"params": flats}], **kw)
    per_unit = torch.optim.SGD([{"params": [f]} for f in flats], **kw)
    groups = list(per_unit.param_groups)

    def per_call() -> None:
        for g in groups:  # what ZeRO does: param_groups swapped to one group per call
            per_unit.param_groups = [g]
            per_unit.step()
        per_unit.param_groups = groups

    t = profiled_seconds({"one": one.step, "groups": per_unit.step, "calls": per_call}, max(reps, 20))
    n, elements = len(flats), sum(unit_numels)
    group = max((t["groups"] - t["one"]) / max(n - 1, 1), 0.0)
    call = max((t["calls"] - t["groups"]) / max(n - 1, 1), 0.0)
    return {"call_s": call, "group_s": group, "element_s": max(t["one"] - call - group, 0.0) / max(elements, 1),
            "one_group_s": t["one"], "per_unit_groups_s": t["groups"], "per_unit_calls_s": t["calls"], "units": n,
            "elements": elements}


__all__ = ["leaf_modules", "capture_inputs", "weight_grad_costs", "profile_table", "profiled_seconds", "part",
           "module_costs", "model_costs", "optimizer_costs"]
