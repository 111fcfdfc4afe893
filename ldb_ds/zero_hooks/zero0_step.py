"""ldb_ds's own version of DeepSpeed's ZeRO-0 mixed-precision step (deepspeed==0.19.8).

At ZeRO-0, bf16 (and fp16 with a torch optimizer) runs ``FP16_UnfusedOptimizer``
(``runtime/fp16/unfused_optimizer.py:25``; picked by ``engine._configure_fp16_optimizer``,
``engine.py:2555``, for ``DDP_BFLOAT16``/``FP16`` from ``_do_optimizer_sanity_check``). With one
param group per unit its ``step`` (``:197``) does per-group work every step:

* ``get_weight_norm`` (``runtime/utils.py:537``) once per group: ``float()`` of the group's
  sum of squares, a copy into a new tensor, then ``.item()``: two host syncs per group;
* before that, ``CheckOverflow.check`` (``utils.py:279``): one host sync per *parameter*;
* the fp32 gradient copies, the unscale and the fp32 -> bit16 copy-back, one op per parameter.

:func:`step` does the same arithmetic with the per-group work batched: one host sync per step
(the per-group sums of squares, copied to the host together), the unscale and the copy-back as
one foreach op each, and the dropped groups (the step filter's hidden groups) get no fp32
gradient, no unscale, no optimizer step and no copy-back. It is bitwise DeepSpeed's own loop
over the same groups (tests/dist/test_zero_step_dist.py):

* each parameter's norm is the same call on the same fp32 values (``g.float().norm(2.0)``;
  kept per parameter: a foreach norm reduces in another order on a GPU);
* each group's sum of squares is accumulated in fp32 in DeepSpeed's order (parameter by
  parameter), batched *across* groups: column j holds the j-th parameter's square of every group
  (a group with fewer gradients adds an exact ``+0.0``), so the op count is the number of
  parameters per group, not the number of groups;
* the square roots, the global norm (``get_global_norm``), the invalid-norm skip, the loss-scale
  update and the clip decision stay in Python floats, computed by DeepSpeed's own functions in
  DeepSpeed's order (``_update_scale(False)`` before ``unscale_and_clip_grads`` reads the scale).

``CheckOverflow.check`` is not called: it only says whether a gradient holds an inf or NaN, and
such a gradient makes its group's norm inf or NaN, which DeepSpeed itself turns into the same
skip (``_skip_invalid_grad_norm``, ``:225``-``:226``) with the same resulting state; the
predicate :func:`plain` makes sure the check is local (no model parallelism, no MoE, backward
all-reduce on) so no collective is skipped.

``FP16_Optimizer`` (fp16 or bf16 with DeepSpeed's FusedAdam on a GPU, ``fp16/fused_optimizer.py``)
is not mirrored: FusedAdam does not run on the CPU accelerator, so its bitwise equivalence
could not be tested here; DeepSpeed's own step (with the step filter) runs there.

:func:`install_fp16_loss_scaling` is a correctness fix, not a speed-up: DeepSpeed 0.19.8 never
multiplies the loss by the loss scale at ZeRO-0 in fp16, while both fp16 wrappers divide the
gradients by it (issue 16, item 6; see the function).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from .groups import step_groups
from .patches import Kind, PatchSet

MIRRORED = ["fp16.unfused_optimizer.FP16_UnfusedOptimizer.step",
            "fp16.unfused_optimizer.FP16_UnfusedOptimizer.unscale_and_clip_grads",
            "fp16.unfused_optimizer.FP16_UnfusedOptimizer._skip_invalid_grad_norm",
            "utils.get_weight_norm", "utils.get_global_norm", "utils.CheckOverflow.check",
            "moe.utils.split_params_grads_into_shared_and_expert_params", "utils.CheckOverflow.has_overflow",
            "utils.CheckOverflow.has_overflow_serial", "utils.has_inf_or_nan"]
"""The DeepSpeed functions :func:`step` mirrors (keys of ``version.MIRRORED_SOURCES``)."""


def plain(z: Any) -> bool:
    """Whether ``z`` is an ``FP16_UnfusedOptimizer`` whose ``step`` :func:`step` mirrors.

    Excluded: a subclass or instance that overrides ``step``, LAMB's fused legacy step, model or
    pipeline parallelism (``mpu``, replicated or model-parallel parameters: ``get_weight_norm``
    filters those), MoE parameters (a separate norm and an all-reduce in the overflow check), and
    a disabled backward all-reduce (``CheckOverflow.has_overflow`` then all-reduces the flag).
    """
    try:
        from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
        from deepspeed.moe.utils import is_moe_param
    except ImportError:
        return False
    if not isinstance(z, FP16_UnfusedOptimizer) or type(z).step is not FP16_UnfusedOptimizer.step \
            or "step" in vars(z):
        return False
    checker = z.overflow_checker
    engine = getattr(checker, "deepspeed", None)
    params = [p for group in z.fp16_groups for p in group]
    return (not z.fused_lamb_legacy and z.mpu is None and checker.mpu is None and not checker.has_moe_params
            and not checker.zero_reduce_scatter
            and (engine is None or getattr(engine, "enable_backward_allreduce", True) is not False)
            and len(z.fp16_groups) == len(z.optimizer.param_groups)
            and not any(hasattr(p, "ds_pipe_replicated") or getattr(p, "tensor_model_parallel", False)
                        or is_moe_param(p) for p in params))


def _group_sums_of_squares(norms: list[list[torch.Tensor]]) -> list[float]:
    """Each group's fp32 ``sum(norm**2)``, added parameter by parameter as ``get_weight_norm`` does.

    ``get_weight_norm`` (``utils.py:567``-``:575``) starts from the Python float 0. and adds each
    parameter's ``norm ** 2.0`` in fp32 in turn. Here column j stacks the j-th norm of every
    group (a zero where a group has fewer), so the same fp32 additions happen in the same order
    for every group at once; adding +0.0 to a sum of squares changes no bit. One host copy
    for all groups (the only sync of the step).
    """
    width = max(len(n) for n in norms)
    zero = torch.zeros((), dtype=torch.float32, device=norms[0][0].device) \
        if any(len(n) < width for n in norms) else None
    total = None
    for j in range(width):
        squares = torch.stack([n[j] if j < len(n) else zero for n in norms]).pow(2.0)
        # 0. + square is the square itself (squares are >= 0, inf or NaN): DeepSpeed's first add.
        total = squares if total is None else total.add_(squares)
    return total.tolist()


def step(z: Any, step_state: Any) -> Callable:
    """``FP16_UnfusedOptimizer.step`` (``unfused_optimizer.py:197``) with the per-group work batched."""
    from deepspeed.runtime.utils import get_global_norm, is_invalid_grad_norm

    norm_type = 2.0  # FP16_UnfusedOptimizer.norm_type (:96), as get_weight_norm's float(norm_type)

    def step(closure: Any = None) -> bool:
        skipped = step_state.skipped_groups
        z.overflow = False  # what CheckOverflow.check returns for finite gradients (see module doc)
        norm_groups: list[float] = [0.0] * len(z.fp16_groups)  # :212, 0.0 for a group without gradients
        normed, norms = [], []
        kept, fp32_params, fp32_grads, bit16_params = [], [], [], []
        for i, group in enumerate(z.fp16_groups):
            is_kept = i not in skipped
            group_norms = []
            for fp32_param, p in zip(z.fp32_groups[i], group):
                if p.grad is None:
                    if is_kept:  # :219-220: a kept parameter without gradient steps with zeros
                        fp32_param.grad = torch.zeros(p.size(), dtype=fp32_param.dtype, device=fp32_param.device)
                else:
                    # split_params_grads_into_shared_and_expert_params's .to(p.dtype), then
                    # get_weight_norm's .float(): for a kept group that fp32 copy is also the
                    # gradient of the fp32 master (:222, the same conversion), made once.
                    grad = p.grad if p.grad.dtype == p.dtype else p.grad.to(p.dtype)
                    grad = grad.to(fp32_param.dtype)
                    group_norms.append(grad.norm(norm_type))
                    if is_kept:
                        fp32_param.grad = grad
                if is_kept:
                    fp32_params.append(fp32_param)
                    fp32_grads.append(fp32_param.grad)
                    bit16_params.append(p)
            if is_kept:
                kept.append(i)
            if group_norms:  # a dropped group has none (requires_grad False): its norm is DeepSpeed's 0.0
                normed.append(i)
                norms.append(group_norms)
        if norms:
            for i, total in zip(normed, _group_sums_of_squares(norms)):
                # get_weight_norm (:577-:581): float(total), through an fp32 tensor (exact), ** (1/2).
                value = total ** (1. / norm_type)
                norm_groups[i] = -1 if value in (float("inf"), -float("inf")) or value != value else value
        z._global_grad_norm = get_global_norm(norm_list=norm_groups)  # :224, DeepSpeed's order
        if is_invalid_grad_norm(z._global_grad_norm):  # also every case CheckOverflow.check catches
            return z._skip_invalid_grad_norm()
        z._update_scale(False)  # :227, before the unscale reads the scale, as in DeepSpeed
        combined_scale = z.unscale_and_clip_grads(z._global_grad_norm, apply_scale=False)
        # :228 / :253-256: every fp32 gradient times 1/combined_scale, here in one foreach op.
        # x * 1.0 is x bitwise (NaN cannot reach here), so bf16's scale of 1 costs nothing.
        if fp32_grads and 1. / combined_scale != 1.0:
            torch._foreach_mul_(fp32_grads, 1. / combined_scale)
        if kept:
            # :230 with only the kept groups shown: a dropped group is not even looked at (the
            # step filter would hide it anyway), and equal-hyperparameter groups step as one.
            step_groups(z.optimizer, kept)
        # :232-239: drop the fp32 gradients, copy fp32 -> bit16 in one foreach op. A dropped
        # group's masters did not change, so its bit16 copy is already their rounding.
        for fp32_param in fp32_params:
            fp32_param.grad = None
        if bit16_params:
            with torch.no_grad():
                torch._foreach_copy_(bit16_params, fp32_params)
        return z.overflow

    return step


# --------------------------------------------------------------------------- fp16: the loss scale

LOSS_SCALING_MIRRORED = ["engine.DeepSpeedEngine.backward", "fp16.unfused_optimizer.FP16_UnfusedOptimizer.backward",
                         "fp16.fused_optimizer.FP16_Optimizer.backward"]
"""What :func:`install_fp16_loss_scaling` relies on (keys of ``version.MIRRORED_SOURCES``)."""


def fp16_unscaled_at_zero0(ds_engine: Any) -> bool:
    """Whether ``ds_engine`` has the unscaled fp16 loss of DeepSpeed 0.19.8 at ZeRO-0 (see below).

    fp16, ZeRO-0, one of the fp16 wrappers with loss scaling, and DeepSpeed's ``backward``
    functions hashing to the verified (unfixed) source.
    """
    from .groups import zero_stage
    from .version import mirrors_verified

    try:
        from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
        from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    except ImportError:
        return False
    opt = ds_engine.optimizer
    return (zero_stage(ds_engine) == 0 and ds_engine.fp16_enabled()
            and isinstance(opt, (FP16_UnfusedOptimizer, FP16_Optimizer))
            and opt.loss_scale_config.use_grad_scaling and mirrors_verified(LOSS_SCALING_MIRRORED))


def install_fp16_loss_scaling(ds_engine: Any, patches: PatchSet) -> bool:
    """fp16 at ZeRO-0: multiply the loss by the loss scale in ``backward``, as the step expects.

    DeepSpeed 0.19.8's ``engine.backward`` (``engine.py:3416``-``:3420``) scales the loss only
    for a ZeRO optimizer (``ZeROOptimizer.scale_if_loss``) or torch autocast's GradScaler. At
    ZeRO-0 the fp16 wrappers (``FP16_UnfusedOptimizer``, ``FP16_Optimizer``) are not ZeRO
    optimizers, and their own ``backward`` (which scales) is never called; yet their ``step``
    divides every gradient by the loss scale. So each fp16 ZeRO-0 update is ``loss_scale`` times
    too small (upstream: deepspeedai/DeepSpeed pull request 8393). bf16 is not affected (its
    scale is 1). This wraps ``ds_engine.backward`` on the instance (every caller goes through it:
    ldb_ds's engine, ldb-train, the Hugging Face Trainer and accelerate) so that it does what
    the wrapper's ``backward`` does (``unfused_optimizer.py:268``-``:273``,
    ``fused_optimizer.py:397``-``:402``): ``loss.float() * cur_scale`` (or the external scale),
    after DeepSpeed's division by the accumulation steps; it returns what DeepSpeed returns
    (the loss divided by the accumulation steps, unscaled).

    Installed only where needed and checked: fp16, ZeRO-0, one of those wrappers, and the
    installed DeepSpeed's ``backward`` and the wrappers' ``backward`` hash to the verified
    source (a DeepSpeed that fixed it has another ``backward``). Idempotent. Returns whether
    the wrapper is in place.
    """
    if getattr(ds_engine, "_ldb_fp16_loss_scaling", False):
        return True
    if not fp16_unscaled_at_zero0(ds_engine):
        return False
    opt = ds_engine.optimizer
    deepspeed_backward = ds_engine.backward

    def backward(loss: torch.Tensor, retain_graph: bool = False, scale_wrt_gas: bool = True) -> torch.Tensor:
        # engine.py:3413: DeepSpeed's division by the accumulation steps, done here so that the
        # scale multiplies the same value the wrapper's backward would be given.
        gas_scaled_loss = loss / ds_engine.gradient_accumulation_steps() if scale_wrt_gas else loss
        scaled = (opt.external_loss_scale * gas_scaled_loss if opt.custom_loss_scaler
                  else gas_scaled_loss.float() * opt.loss_scale_config.cur_scale)
        deepspeed_backward(scaled, retain_graph=retain_graph, scale_wrt_gas=False)
        return gas_scaled_loss

    patches.set("fp16 ZeRO-0 loss scaling", Kind.EXACTNESS, ds_engine, "backward", backward)
    patches.set("fp16 ZeRO-0 loss scaling (marker)", Kind.EXACTNESS, ds_engine, "_ldb_fp16_loss_scaling", True)
    return True


__all__ = ["MIRRORED", "LOSS_SCALING_MIRRORED", "plain", "step", "fp16_unscaled_at_zero0", "install_fp16_loss_scaling"]
