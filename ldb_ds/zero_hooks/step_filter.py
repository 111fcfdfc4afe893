"""The step filter: dropped units' groups hidden inside DeepSpeed's call of the basic optimizer.

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

    def step(*args: Any, **kwargs: Any) -> Any:
        hidden = hidden_groups()
        factor = lr_factor()
        if not hidden and factor == 1.0:
            with merged_groups(optimizer):
                return original_step(*args, **kwargs)
        with hide_groups(optimizer, hidden, factor) as visible:
            if not any(len(g["params"]) for g in visible):
                return None  # e.g. ZeRO's per-group call for a dropped group: nothing to do
            # Groups of equal hyperparameters stepped as one: one foreach/fused kernel set
            # for all kept units instead of one per unit (bitwise the same update).
            with merged_groups(optimizer):
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
