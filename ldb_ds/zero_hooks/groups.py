"""DeepSpeed's engine as ldb_ds sees it: the basic optimizer, its param groups, the wrapper around it.

ldb_ds maps param group i to a unit by index, so :func:`check_group_order` checks at
``initialize`` that DeepSpeed kept ldb_ds's groups in ldb_ds's order inside whichever optimizer
wrapper it built (docs/design.md, section 4).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from .version import VERIFIED_DEEPSPEED, installed_version

NOT_A_GRADIENT = "ldb_not_a_gradient"
"""Attribute set on tensors that ldb_ds reduces but that are not gradients (the batched
gradient-norm vectors), so a byte counter of gradient traffic can leave them out."""


def zero_stage(ds_engine: Any) -> int:
    return int(ds_engine.zero_optimization_stage())


def basic_optimizer(ds_engine: Any) -> torch.optim.Optimizer:
    """The user-level optimizer that DeepSpeed wrapped (``engine.py:2353``, in ``_configure_optimizer``)."""
    opt = getattr(ds_engine, "basic_optimizer", None)
    if opt is None:
        raise RuntimeError("ldb_ds needs an optimizer: give one in the DeepSpeed config "
                           "('optimizer' section) or to ldb_ds.initialize(optimizer=...)")
    return opt


def step_groups(optimizer: torch.optim.Optimizer, indices: Sequence[int]) -> None:
    """One ``optimizer.step()`` with only the groups at ``indices`` in ``param_groups``, then all back.

    How ldb_ds's step loops show the basic optimizer the kept groups only: a dropped group is
    not even looked at (the step filter would hide it anyway), and the filter then steps groups
    of equal hyperparameters as one. The group dicts are DeepSpeed's own, so what the step
    writes into them (none of torch's optimizers do) stays.
    """
    all_groups = optimizer.param_groups
    optimizer.param_groups = [all_groups[i] for i in indices]
    try:
        optimizer.step()
    finally:
        optimizer.param_groups = all_groups


def check_group_order(ds_engine: Any, expected_param_groups: Sequence[Sequence[torch.nn.Parameter]]) -> None:
    """Fail loudly if DeepSpeed's groups are not ldb_ds's groups in ldb_ds's order.

    The unit of group i is looked up by index; a DeepSpeed change that dropped,
    merged or reordered groups would silently mask the wrong parameters.
    """
    opt = basic_optimizer(ds_engine)
    stage = zero_stage(ds_engine)
    wrapper = ds_engine.optimizer
    if wrapper is not opt and type(wrapper) not in _verified_wrapper_types():
        # Subclasses too (ZenFlow's, SuperOffload's): they step groups their own way.
        raise RuntimeError(f"ldb_ds cannot verify the param groups of DeepSpeed's optimizer wrapper "
                           f"{type(wrapper).__name__} (ZeRO stage {stage}, deepspeed {installed_version()}), "
                           "so it does not run LayerDropBack on it; ldb_ds's hooks were verified on the basic "
                           "optimizer at stage 0, FP16_Optimizer, FP16_UnfusedOptimizer, BF16_Optimizer, "
                           "DeepSpeedZeroOptimizer (ZeRO 1/2) and DeepSpeedZeroOptimizer_Stage3")
    n = len(expected_param_groups)
    if len(opt.param_groups) != n:
        raise RuntimeError(f"DeepSpeed has {len(opt.param_groups)} param groups, ldb_ds made {n} "
                           f"(deepspeed {installed_version()}; ldb_ds's hooks were verified on "
                           f"{VERIFIED_DEEPSPEED[0]} to {VERIFIED_DEEPSPEED[1]})")
    # The model parameters of group i, as each optimizer wrapper keeps them:
    if hasattr(wrapper, "sub_group_to_group_id"):  # ZeRO-3: sub-groups of param groups
        actual = [[] for _ in range(n)]
        for sub_group, params in enumerate(wrapper.fp16_groups):
            actual[wrapper.sub_group_to_group_id[sub_group]].extend(params)
    elif hasattr(wrapper, "bit16_groups"):  # ZeRO-1/2 (DeepSpeedZeroOptimizer)
        actual = wrapper.bit16_groups
    elif hasattr(wrapper, "bf16_groups"):  # BF16_Optimizer: bf16 at stage 1, fp32 grad accumulation (stage 0: pipelines only, refused)
        actual = wrapper.bf16_groups
    elif hasattr(wrapper, "fp16_groups"):  # FP16_(Unfused)Optimizer (fp16, or bf16 at stage 0)
        actual = wrapper.fp16_groups
    else:  # fp32 at stage 0: the basic optimizer itself
        actual = [g["params"] for g in opt.param_groups]
    for i, (want, got) in enumerate(zip(expected_param_groups, actual)):
        if {id(p) for p in want} != {id(p) for p in got}:
            raise RuntimeError(f"DeepSpeed param group {i} does not hold the parameters ldb_ds put there "
                               f"(ZeRO stage {stage}, deepspeed {installed_version()}); ldb_ds's hooks were "
                               f"verified on deepspeed {VERIFIED_DEEPSPEED[0]} to {VERIFIED_DEEPSPEED[1]}")


def _verified_wrapper_types() -> tuple[type, ...]:
    # The wrappers engine._configure_optimizer (engine.py:2328) builds that this module's hooks
    # were checked on (deepspeed 0.19.8: fp16/fused_optimizer.py:35, fp16/unfused_optimizer.py:25,
    # bf16_optimizer.py:39, zero/stage_1_and_2.py:158, zero/stage3.py:152).
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    return (FP16_Optimizer, FP16_UnfusedOptimizer, BF16_Optimizer, DeepSpeedZeroOptimizer,
            DeepSpeedZeroOptimizer_Stage3)
