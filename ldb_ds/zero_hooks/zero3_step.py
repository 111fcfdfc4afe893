"""ldb_ds's own version of DeepSpeed's per-sub-group ZeRO-3 step (deepspeed==0.19.8).

DeepSpeed internals (docs/design.md, section 4), installed by :func:`ldb_ds.zero_hooks.install_step_loops`,
which checks the version and the mirrored sources first. With one param group per unit, ZeRO-3
has at least one sub-group per unit (``sub_group_size`` splits big groups further), and
``DeepSpeedZeroOptimizer_Stage3.step`` (``stage3.py:2873``) does per sub-group: one norm
all-reduce (``_get_norm_groups``, ``:2573``), then a flatten, an unscale, one basic-optimizer
call that walks *every* group (``_optimizer_step``, ``:1235``), a copy to the 16-bit partition
and an unflatten (``:2910``-``:2927``). Here:

* :func:`norm_groups` - the norms of all sub-groups in one all-reduce (the same numbers);
* :func:`step` - DeepSpeed's step with the loop over sub-groups done once for the kept ones:
  one flatten, one unscale, one optimizer call, one batched copy; dropped units' sub-groups get
  no work at all (their gradients are DeepSpeed's zero fill, ``:1426``);
* :func:`optimizer_step` - where the loop stays DeepSpeed's, the optimizer call of one sub-group
  shows the optimizer that sub-group's group only.

All three apply on the plain path only (:func:`norm_group`): no offload, NVMe swapping, Muon,
ZenFlow, torch autocast's GradScaler, model parallelism, AutoEP or per-parameter process groups.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..functional import MERGEABLE_OPTIMIZERS
from .groups import NOT_A_GRADIENT, zero_stage
from .norms import foreach_norm_takes_dtype, group_square_sums
from .views import point_into

# The replacements read the gradient partitions on the current stream; ZeRO-3 reduces them on its
# reduce_and_partition_stream, which the backward epilogue synchronizes before any step
# (stage3.py:1413-1414): its source is checked with each replacement's.
EPILOGUE = "stage3.DeepSpeedZeroOptimizer_Stage3.independent_gradient_partition_epilogue"

MIRRORED = {
    "norm": ["stage3.DeepSpeedZeroOptimizer_Stage3._get_norm_groups",
             "stage3.DeepSpeedZeroOptimizer_Stage3.get_grad_norm_direct", EPILOGUE],
    "optimizer_step": ["stage3.DeepSpeedZeroOptimizer_Stage3._optimizer_step", EPILOGUE],
    "step": ["stage3.DeepSpeedZeroOptimizer_Stage3.step", EPILOGUE,
             "stage3.DeepSpeedZeroOptimizer_Stage3._prepare_fp32_grad_for_sub_group",
             "stage3.DeepSpeedZeroOptimizer_Stage3.unscale_and_clip_grads",
             "stage3.DeepSpeedZeroOptimizer_Stage3._reassign_or_swap_out_partitioned_parameters",
             "stage3.DeepSpeedZeroOptimizer_Stage3._release_sub_group",
             "stage3.DeepSpeedZeroOptimizer_Stage3._optimizer_step",
             "stage3.DeepSpeedZeroOptimizer_Stage3._unflatten_partitioned_parameters"],
}
"""The DeepSpeed functions each replacement mirrors (keys of ``version.MIRRORED_SOURCES``)."""


def norm_group(z: Any) -> Any:
    """The one process group all of ZeRO-3's norms reduce over, or None off the plain path.

    ``get_grad_norm_direct`` all-reduces over the first parameter's ``ds_process_group``
    (``stage3.py:643``): batching the sub-groups is only the same when all parameters share it
    (no per-parameter groups, AutoEP, model or sequence parallel groups), and there is no
    offload, Muon, ZenFlow or torch autocast GradScaler.
    """
    try:
        from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    except ImportError:
        return None
    if not isinstance(z, DeepSpeedZeroOptimizer_Stage3):
        return None
    # Attributes as DeepSpeedZeroOptimizer_Stage3.__init__ sets them (stage3.py): swap_optimizer
    # :249/:826, offload_optimizer :251/:824, use_muon :356, model_parallel_group :372-375,
    # torch_autocast_gradscaler :469-473; ds_process_group read as _get_param_partition_group (:643)
    # does, ds_zero_placement_family as :676 does.
    if z.offload_optimizer or z.swap_optimizer or getattr(z, "use_muon", False) or getattr(z, "zenflow", False) \
            or z.torch_autocast_gradscaler is not None or z.model_parallel_group is not None:
        return None
    groups = {id(getattr(p, "ds_process_group", z.dp_process_group)): getattr(p, "ds_process_group", z.dp_process_group)
              for sub_group in z.fp16_groups for p in sub_group}
    if len(groups) != 1 or any(getattr(p, "ds_zero_placement_family", "replicated") == "autoep_expert"
                               for sub_group in z.fp16_groups for p in sub_group):
        return None
    return next(iter(groups.values()))


def norm_groups(z: Any, step_state: Any) -> Callable:
    """``_get_norm_groups`` (``stage3.py:2573``) with one all-reduce for all sub-groups.

    Per sub-group it is ``get_grad_norm_direct`` (``:2419``) on the plain path: the sum over
    the partition's gradients of ``norm(g.to(norm dtype))**2``, summed over ranks, square-rooted,
    inf/NaN masked to -1. The sums of all sub-groups go into one vector and one all-reduce, so
    each sub-group's norm is the number DeepSpeed computes (at world size > 2 the cross-rank sum
    of a vector element may be added in another order than a scalar's, as between any two
    collective algorithms). A dropped unit's sub-group holds the zeros DeepSpeed gives a
    ``requires_grad=False`` parameter (``:1426``): its sum is 0, not computed.
    """
    from deepspeed import comm as dist
    from deepspeed.accelerator import get_accelerator
    from deepspeed.runtime.zero.utils import get_norm_dtype

    device_name = get_accelerator().device_name()
    process_group = norm_group(z)

    norm_dtype = get_norm_dtype()
    # Pads group_square_sums' rows and stands for dropped sub-groups; allocated once, so a step
    # makes no host-to-device copy.
    zero = torch.zeros((), dtype=norm_dtype, device=device_name)
    foreach_norm_takes_dtype(zero.device.type, norm_dtype)  # asked here, at set-up, not in the first step

    def _get_norm_groups() -> list[torch.Tensor]:
        skipped = step_state.skipped_groups
        # get_grad_norm_direct's per-tensor norms (:2454-2457) for the kept sub-groups, in one
        # foreach op (the gradients are on the device: no offload here), and its per-sub-group
        # sums of squares (:2467) for every sub-group at once (norms.group_square_sums: the same
        # sums). A dropped unit's sub-group holds DeepSpeed's zero fill, whose sum is 0.
        stacked = group_square_sums(
            [z.averaged_gradients[i] if z.sub_group_to_group_id[i] not in skipped and z.averaged_gradients[i] else []
             for i in range(len(z.fp16_groups))], zero)
        setattr(stacked, NOT_A_GRADIENT, True)  # a byte counter of gradient traffic leaves it out
        # One collective for all sub-groups; every rank adds its partition's sums.
        dist.all_reduce(stacked, op=dist.ReduceOp.SUM, group=process_group)
        norms = stacked**(1. / 2.0)
        # DeepSpeed masks inf/NaN with a -1 it copies from the host per call; full_like makes it
        # on the device.
        norms = torch.where(norms.isnan().logical_or(norms.isinf()), torch.full_like(norms, -1.0), norms)
        return list(norms.unbind(0))

    return _get_norm_groups


def optimizer_step(z: Any) -> Callable:
    """``_optimizer_step`` (``stage3.py:1235``, non-offload branch) showing one group, not all.

    DeepSpeed puts the sub-group's flat partition into its group's ``params`` and steps the
    optimizer with every other group's ``params`` empty: the optimizer walks all N groups for
    each of the N sub-groups. Showing only the sub-group's group is the same update (an empty
    group steps nothing) and walks one.
    """

    def _optimizer_step(sub_group_id: int) -> None:
        optimizer = z.optimizer
        all_groups = optimizer.param_groups
        group = all_groups[z.sub_group_to_group_id[sub_group_id]]
        group["params"] = [z.fp32_partitioned_groups_flat[sub_group_id]]
        optimizer.param_groups = [group]
        try:
            optimizer.step()
        finally:
            optimizer.param_groups = all_groups
            group["params"] = []

    return _optimizer_step


def step(z: Any, step_state: Any) -> Callable:
    """``DeepSpeedZeroOptimizer_Stage3.step`` (``stage3.py:2873``) with the sub-group loop batched.

    Up to the overflow decision it calls what DeepSpeed calls, in the same order
    (``:2877``-``:2907``); then the loop of ``:2910``-``:2927`` runs once over the kept
    sub-groups: the same elements are flattened, multiplied by the same factor, updated by the
    same per-parameter rule and copied to the same 16-bit partitions, so the result is bitwise
    DeepSpeed's (tests/dist/test_zero_step_dist.py).
    """
    from deepspeed import comm as dist
    from deepspeed.accelerator import get_accelerator
    from deepspeed.runtime.utils import combine_grad_norm_groups, is_invalid_grad_norm
    from deepspeed.runtime.zero.stage3 import OPTIMIZER_STEP_TIMER
    from deepspeed.utils import logger

    # _unflatten_partitioned_parameters' layout per sub-group: partitions are sized once, at
    # DeepSpeed's __init__, so their offsets and shapes are computed here, not per step.
    layouts = [_partition_layout(params) for params in z.fp16_partitioned_groups]

    def _step(closure: Any = None) -> None:
        skipped = step_state.skipped_groups
        # :2877-2902, as DeepSpeed has them (swap_optimizer is excluded at install).
        z._pre_step()
        z._partition_all_parameters()
        z._overflow_check_and_loss_scale_update(update_scale=False)
        scaled_global_grad_norm = None
        if not z.overflow:
            z._apply_muon_to_accumulated_grads()
            scaled_global_grad_norm = combine_grad_norm_groups(z._get_norm_groups())
            if is_invalid_grad_norm(scaled_global_grad_norm):
                z.overflow = True
        if z._loss_scale_update_and_overflow_cleanup():
            return
        z._global_grad_norm = scaled_global_grad_norm / z.loss_scale
        timer_names = {OPTIMIZER_STEP_TIMER}
        z.timers(OPTIMIZER_STEP_TIMER).start()
        z.zero_grad(set_to_none=True)  # :2907, non-offload

        kept = [i for i in range(len(z.fp16_groups)) if z.sub_group_to_group_id[i] not in skipped]
        masters = [z.fp32_partitioned_groups_flat[i] for i in kept]
        # _prepare_fp32_grad_for_sub_group (:2683) for all kept sub-groups: one flatten.
        tensors = []
        for i, master in zip(kept, masters):
            grads = z.averaged_gradients[i]
            numel = sum(g.numel() for g in grads)
            assert numel == master.numel(), \
                f"averaged gradients have {numel} elements, partition size {master.numel()} (sub-group {i})"
            tensors.extend(grads)
            if not get_accelerator().is_synchronized_device():
                for grad in filter(lambda g: get_accelerator().on_accelerator(g), grads):
                    grad.record_stream(get_accelerator().current_stream())
        for i in range(len(z.fp16_groups)):
            z.averaged_gradients[i] = None  # a dropped sub-group's zero fill is released unread
        if kept:
            flat = z.flatten(tensors).to(masters[0].dtype)
            del tensors
            offset = 0
            for master in masters:
                master.grad = flat.narrow(0, offset, master.numel())
                offset += master.numel()
            # unscale_and_clip_grads (:2979): the factor depends on the norm and the loss scale
            # only, so one multiplication of the whole buffer is each sub-group's.
            combined_scale = z.loss_scale
            if z.clip_grad > 0.:
                clip = ((scaled_global_grad_norm / z.loss_scale) + 1e-6) / z.clip_grad
                clip = torch.clamp(clip, min=1.0)
                combined_scale = clip * z.loss_scale
            flat.mul_(1. / combined_scale)
            _step_kept(z, kept)
            # _reassign_or_swap_out_partitioned_parameters (:2854) and _release_sub_group (:2731).
            with torch.no_grad():
                torch._foreach_copy_([z.fp16_partitioned_groups_flat[i] for i in kept], masters)
            for i, master in zip(kept, masters):
                # _unflatten_partitioned_parameters (:2792): unflatten_dense_tensors' views
                # (flat.narrow(0, offset, numel).view_as(t), in order), set only where moved.
                point_into(z.fp16_partitioned_groups_flat[i], *layouts[i])
                master.grad = None
            del flat
        z.timers(OPTIMIZER_STEP_TIMER).stop()
        z._post_step(timer_names)

        # :2934-2949: warn about caching allocator flushes, as DeepSpeed does.
        alloc_retries = get_accelerator().memory_stats().get("num_alloc_retries") or 0
        if alloc_retries > z.n_caching_allocator_flushes:
            if dist.get_rank() == 0:
                logger.warning("%d pytorch allocator cache flushes since last step. this happens when there is high "
                               "memory pressure and is detrimental to performance.",
                               alloc_retries - z.n_caching_allocator_flushes)
            z.n_caching_allocator_flushes = alloc_retries

    return _step


def _partition_layout(params: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[int], list[torch.Size]]:
    """The partitions, their offsets in the sub-group's flat buffer (in order, as
    ``unflatten_dense_tensors`` lays them out) and their shapes, for :func:`.views.point_into`."""
    offsets, offset = [], 0
    for partitioned_param in params:
        offsets.append(offset)
        offset += partitioned_param.numel()
    return params, offsets, [p.shape for p in params]


def _step_kept(z: Any, kept: list[int]) -> None:
    """One basic-optimizer call for all kept sub-groups (``_optimizer_step``, ``:1235``, batched).

    Each sub-group's group is shown with its kept sub-groups' flat partitions as ``params``.
    A group split into several sub-groups then holds several partitions in one call; an
    optimizer that keeps per-group state (DeepSpeed's FusedAdam counts steps per call, not per
    tensor) gets one call per sub-group instead, as DeepSpeed makes.
    """
    optimizer = z.optimizer
    by_group: dict[int, list[torch.Tensor]] = {}
    for i in kept:
        by_group.setdefault(z.sub_group_to_group_id[i], []).append(z.fp32_partitioned_groups_flat[i])
    if type(optimizer) not in MERGEABLE_OPTIMIZERS and any(len(v) > 1 for v in by_group.values()):
        for i in kept:
            z._optimizer_step(i)
        return
    all_groups = optimizer.param_groups
    shown = []
    for gid, flats in by_group.items():
        all_groups[gid]["params"] = flats
        shown.append(all_groups[gid])
    optimizer.param_groups = shown
    try:
        optimizer.step()
    finally:
        optimizer.param_groups = all_groups
        for g in shown:
            g["params"] = []


def clear_stale_gradient_partitions(ds_engine: Any) -> bool:
    """ZeRO-3, after a skipped (overflow) step: zero the gradient partition buffer.

    ``DeepSpeedZeroOptimizer_Stage3.has_overflow`` (``stage3.py:3013``) checks the whole
    ``grad_partitions_flat_buffer`` (allocated and zeroed once, ``:791``) for inf/NaN. A
    reduction writes only the regions of parameters that got a gradient (``:2024``: copy at
    the first micro step, add after), and a dropped unit gets none, so after an fp16 overflow
    its region keeps the inf of the skipped step. Without this, every later step that drops
    that unit would see the stale inf and be skipped too (the loss scale halving each time)
    until the unit is kept again. Zeroing is exact: DeepSpeed discarded the gradients of the
    skipped step (``_overflow_clean_up``, ``:2799``), and the next window's first micro step
    overwrites every kept region. Returns whether a buffer was cleared.
    """
    buffer = getattr(ds_engine.optimizer, "grad_partitions_flat_buffer", None)
    if zero_stage(ds_engine) != 3 or not isinstance(buffer, torch.Tensor):
        return False
    buffer.zero_()
    return True


__all__ = ["MIRRORED", "norm_group", "norm_groups", "optimizer_step", "step", "clear_stale_gradient_partitions"]
