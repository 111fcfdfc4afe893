"""Where a step's time goes: per-module weight-gradient costs and torch.profiler op tables."""

from __future__ import annotations

import copy
import time
from typing import Any, Callable

from ..runtime import synchronize
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


__all__ = ["leaf_modules", "capture_inputs", "weight_grad_costs", "profile_table"]
