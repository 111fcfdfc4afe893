"""A plain single-process PyTorch implementation of LDB, written for the tests.

It shares no code with ldb_ds: the mode rule, the mask draw (Python's
``random.Random(seed)``, one ``u < p`` per sampleable unit, in unit order), the
LR/batch scaling and the optimizer updates are written out here from the paper
and from torch's documented update rules. ldb_ds at ZeRO 0-3 on 2 ranks must
end with the same weights.
"""

from __future__ import annotations

import math
import random
from typing import Any

import torch
import torch.nn.functional as F

from tests.support.core_workers import MICRO_BATCH, make_model, window_batch


def reference_run(case: dict[str, Any], world_size: int = 2, device: Any = "cpu",
                  dtype: torch.dtype = torch.float32, zero_grad_step_at_init: bool = False) -> dict[str, Any]:
    """Train ``case`` the paper's way; returns the masks, the scheduler's lrs and the final weights.

    ``dtype`` other than fp32 is mixed precision as DeepSpeed does it: the model computes in
    ``dtype``, the optimizer updates fp32 master copies with the gradients cast to fp32, and the
    masters are rounded back into the model after every step. ``zero_grad_step_at_init`` adds
    what DeepSpeed's FP16_UnfusedOptimizer (ZeRO-0 with bf16, or fp16 without fused Adam) does
    when it is built: one optimizer step of the masters with all-zero gradients
    (``runtime/fp16/unfused_optimizer.py:425`` in 0.19.8), which applies weight decay and seeds
    SGD's momentum and Adam's step counter; FP16_Optimizer (fp16 with DeepSpeed's FusedAdam at
    ZeRO-0) does the same (``runtime/fp16/fused_optimizer.py:125``). Windows listed in
    ``case["overflow_steps"]`` draw their mask and update nothing: what a step DeepSpeed skips
    (loss-scale overflow, inf/NaN gradient) must do.
    """
    ldb = {"drop_rate": 0.5, "sampling_rate": 2, "keep_first": 1, "keep_last": 1, "kappa": 2.0,
           "batch_kappa": 2, "seed": 7, "lr_policy": "kappa", "resample": "step", **case.get("ldb", {})}
    model = make_model().to(device=device, dtype=dtype)
    masters = {p: p.detach().float().clone() for p in model.parameters()} if dtype != torch.float32 else {}
    state: dict[torch.Tensor, dict[str, Any]] = {}
    linears = [m for m in model if isinstance(m, torch.nn.Linear)]
    units = [[m.weight, m.bias] for m in linears]  # module granularity: one Linear = one unit
    rng = random.Random(ldb["seed"])
    if zero_grad_step_at_init:
        for p in model.parameters():
            _update(case, masters.get(p, p), torch.zeros_like(p, dtype=torch.float32), state.setdefault(p, {}), 1.0)
    masks = []
    lrs: list = []  # the scheduler's (unscaled) lr per step, when a schedule is used
    gas = case.get("gas", 1)
    step = 0
    for epoch in range(case.get("epochs", 3)):
        drop_epoch = epoch > 0 and epoch % ldb["sampling_rate"] == 0
        epoch_mask = None
        for _ in range(case.get("steps_per_epoch", 3)):
            dropped = [False] * len(units)
            if drop_epoch and (ldb["resample"] == "step" or epoch_mask is None):
                for i in range(ldb["keep_first"], len(units) - ldb["keep_last"]):
                    dropped[i] = rng.random() < ldb["drop_rate"]
                epoch_mask = dropped
            elif drop_epoch:
                dropped = epoch_mask
            masks.append(tuple(i for i, d in enumerate(dropped) if d))
            lrs.append(0.02 + 0.08 * min(1.0, max(0, step - 1) / 4) if case.get("warmup") else None)
            per_rank = MICRO_BATCH * (ldb["batch_kappa"] if drop_epoch else 1)
            lr_base = (0.02 + 0.08 * min(1.0, max(0, step - 1) / 4)) if case.get("warmup") else None
            lr_scale = {"kappa": ldb["kappa"], "inverse_keep": 1 / (1 - ldb["drop_rate"]), "none": 1.0
                        }[ldb["lr_policy"]] if drop_epoch else 1.0
            if step in case.get("overflow_steps", ()):
                step += 1  # skipped: the mask was drawn (above), nothing is updated
                continue
            for unit, d in zip(units, dropped):
                for p in unit:
                    p.requires_grad_(not d)
            # DeepSpeed averages over ranks and divides each micro loss by gas:
            # the gradient of the mean loss over the whole global window batch.
            for micro in range(gas):
                x, y = window_batch(step, micro, per_rank, world_size)
                (F.cross_entropy(model(x.to(device, dtype)).float(), y.to(device)) / gas).backward()
            kept = [p for unit, d in zip(units, dropped) if not d for p in unit]
            if case.get("clip", 0.0) > 0:
                clip_by_global_norm(kept, case["clip"])
            for p in kept:
                # The fp32 master in mixed precision, else the parameter itself.
                _update(case, masters.get(p, p), p.grad.float(), state.setdefault(p, {}), lr_scale, lr_base)
                if masters:
                    with torch.no_grad():
                        p.copy_(masters[p])
                p.grad = None
            for unit in units:
                for p in unit:
                    p.requires_grad_(True)
            step += 1
    return {"masks": masks, "scheduler_lrs": lrs, "final": {n: p.detach().clone() for n, p in model.named_parameters()}}


def _update(case: dict[str, Any], p, grad, st, lr_scale: float, lr_base: float | None = None) -> None:
    if case["optimizer"] == "sgd":
        sgd_update(p, grad, st, lr=(lr_base or 0.1) * lr_scale, momentum=0.9, weight_decay=0.01,
                   nesterov=case.get("nesterov", False))
    else:
        adamw_update(p, grad, st, lr=(lr_base or 0.01) * lr_scale, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)


def clip_by_global_norm(params, max_norm: float) -> None:
    total = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in params))
    coef = max_norm / (total + 1e-6)
    if coef < 1:
        for p in params:
            p.grad.mul_(coef)


@torch.no_grad()
def sgd_update(p, grad, st, lr, momentum, weight_decay, nesterov) -> None:
    """torch.optim.SGD's documented rule (dampening 0)."""
    d = grad + weight_decay * p
    if "buf" not in st:
        st["buf"] = d.clone()
    else:
        st["buf"].mul_(momentum).add_(d)
    d = d + momentum * st["buf"] if nesterov else st["buf"]
    p.sub_(lr * d)


@torch.no_grad()
def adamw_update(p, grad, st, lr, betas, eps, weight_decay) -> None:
    """Decoupled weight decay Adam (Loshchilov & Hutter), as torch.optim.AdamW documents it."""
    st["t"] = st.get("t", 0) + 1
    st.setdefault("m", torch.zeros_like(p))
    st.setdefault("v", torch.zeros_like(p))
    p.mul_(1 - lr * weight_decay)
    st["m"].mul_(betas[0]).add_(grad, alpha=1 - betas[0])
    st["v"].mul_(betas[1]).addcmul_(grad, grad, value=1 - betas[1])
    m_hat = st["m"] / (1 - betas[0] ** st["t"])
    v_hat = st["v"] / (1 - betas[1] ** st["t"])
    p.sub_(lr * m_hat / (v_hat.sqrt() + eps))
