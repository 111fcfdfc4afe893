"""The step filter: dropped units' groups hidden inside DeepSpeed's call of the basic optimizer;
and the stage-0 fp32 skip of a step with non-finite gradients, which the other stages do themselves.

See the package docstring (:mod:`ldb_ds.zero_hooks`) for why hiding group dicts inside the
basic optimizer's ``step`` keeps a dropped unit bitwise unchanged at every ZeRO stage.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from ..functional import hide_groups, merged_groups
from .groups import zero_stage


def install_group_step_filter(optimizer: torch.optim.Optimizer,
                              hidden_groups: Callable[[], Sequence[Mapping[str, Any]]],
                              lr_factor: Callable[[], float]) -> None:
    """Wrap ``optimizer.step`` to skip hidden groups and scale ``lr`` of the others.

    ``hidden_groups()`` returns the group dicts to hide in the coming step;
    ``lr_factor()`` the multiplier for the visible ones. Both are read at every
    call, so the engine only has to update its own state. The hiding itself is
    :func:`ldb_ds.functional.hide_groups`; what this adds is that it happens
    inside DeepSpeed's own call of the step, whatever ``param_groups`` DeepSpeed
    has put in place for that call (ZeRO-0: all groups; ZeRO-1/2: all kept groups
    with ldb_ds's step loop, else one; ZeRO-3: one sub-group). The visible groups
    are then stepped with :func:`ldb_ds.functional.merged_groups`, so a torch
    optimizer runs its kernels once over all groups of equal hyperparameters.
    """
    if getattr(optimizer, "_ldb_wrapped", False):
        raise RuntimeError("optimizer already wrapped by ldb_ds")
    original_step = optimizer.step
    key_cache: dict[int, tuple] = {}  # merged_groups' key names per group dict, kept across steps

    def step(*args: Any, **kwargs: Any) -> Any:
        hidden = hidden_groups()
        factor = lr_factor()
        if not hidden and factor == 1.0:
            with merged_groups(optimizer, key_cache):
                return original_step(*args, **kwargs)
        with hide_groups(optimizer, hidden, factor) as visible:
            if not any(len(g["params"]) for g in visible):
                return None  # e.g. ZeRO's per-group call for a dropped group: nothing to do
            # Groups of equal hyperparameters stepped as one: one foreach/fused kernel set
            # for all kept units instead of one per unit (bitwise the same update).
            with merged_groups(optimizer, key_cache):
                return original_step(*args, **kwargs)

    optimizer.step = step
    optimizer._ldb_wrapped = True


@contextlib.contextmanager
def skip_allgather_of_dropped(ds_engine: Any, skipped_group_indices: set[int]) -> Iterator[None]:
    """During one ``step()``, leave dropped groups out of the post-step all-gather.

    ``DeepSpeedZeroOptimizer.step`` (ZeRO-1/2) and ``BF16_Optimizer.step`` call
    the module-level function ``all_gather_dp_groups`` of their own module once
    with the lists of all groups; we substitute a version that passes on only
    the kept groups. Exact because the skipped groups were not stepped on any rank (the
    mask is identical everywhere), so their partitions equal every rank's copy.
    """
    # DeepSpeedZeroOptimizer (stage_1_and_2) and BF16_Optimizer each import the function into
    # their own module (stage_1_and_2.py:26, bf16_optimizer.py:16) and call it once per step
    # with the lists of all groups (stage_1_and_2.py:3155, bf16_optimizer.py:599).
    module = sys.modules[type(ds_engine.optimizer).__module__]
    if not skipped_group_indices or not callable(getattr(module, "all_gather_dp_groups", None)) \
            or zero_stage(ds_engine) == 3:
        yield
        return
    original = module.all_gather_dp_groups

    def all_gather_kept_groups(groups_flat, partitioned_param_groups, dp_process_group, **kwargs):
        keep = [i for i in range(len(groups_flat)) if i not in skipped_group_indices]
        return original(groups_flat=[groups_flat[i] for i in keep],
                        partitioned_param_groups=[partitioned_param_groups[i] for i in keep],
                        dp_process_group=[dp_process_group[i] for i in keep],
                        **kwargs)

    module.all_gather_dp_groups = all_gather_kept_groups
    try:
        yield
    finally:
        module.all_gather_dp_groups = original


def install_nonfinite_skip(ds_engine: Any) -> bool:
    """Stage 0 in fp32: skip an optimizer step whose gradients are not finite, as ZeRO 1-3 do.

    ZeRO-1/2 (``stage_1_and_2.py:3043``), ZeRO-3 (``stage3.py:2887``), ``BF16_Optimizer``
    (``bf16_optimizer.py:401``) and the fp16 optimizers skip a step whose gradient norm is inf or
    NaN and set ``optimizer.overflow``; ``engine._take_model_step`` (``engine.py:3535-3541``)
    then counts it in ``engine.skipped_steps`` and leaves the LR scheduler alone. At stage 0 in
    fp32 ``engine.optimizer`` is the basic torch optimizer, which checks nothing: a NaN gradient
    would be applied. This wraps its ``step`` (outside ldb_ds's group filter): if the norm of
    all gradients is not finite, nothing is stepped and ``optimizer.overflow = True`` tells
    ``_take_model_step`` (``was_step_applied()`` False, so ``attach.run_step`` counts it in
    ``counters.skipped_steps`` as an fp16 overflow and the window's mask draw is consumed), so
    every stage skips and counts alike. The gradients were all-reduced
    in backward (``engine.py:3165``), so every rank decides the same without a collective; the
    cost is one foreach norm over the gradients and one host sync per step, as at ZeRO 1-3.
    Plain DeepSpeed has no such skip at stage 0, so ldb_ds installs it where LDB is enabled
    (``attach.new_controller``); with LDB off an engine costs exactly what DeepSpeed's costs, and
    an application that wants the skip there too calls this itself (``ldb-train`` does).
    Returns whether it was installed (only stage 0 without fp16/bf16 needs it).
    """
    opt = ds_engine.optimizer
    if (zero_stage(ds_engine) != 0 or ds_engine.fp16_enabled() or ds_engine.bfloat16_enabled()
            or opt is not getattr(ds_engine, "basic_optimizer", None)):
        return False
    if getattr(opt, "_ldb_nonfinite_wrapped", False):
        return True
    original_step = opt.step

    def step(*args: Any, **kwargs: Any) -> Any:
        grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
        opt.overflow = False
        if grads:
            # One foreach norm and one stack whatever the number of tensors (fp32 at stage 0, so
            # one dtype); the bool() is the one host sync: DeepSpeed decides on the host whether
            # the step counts and the LR scheduler moves.
            if not bool(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all()):
                opt.overflow = True
                return None
        return original_step(*args, **kwargs)

    opt.step = step
    opt.overflow = False
    opt._ldb_nonfinite_wrapped = True
    return True
