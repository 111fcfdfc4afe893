"""ldb_ds's own version of DeepSpeed's per-group ZeRO-1/2 step (deepspeed==0.19.8).

ldb_ds gives every unit its own param group, and ``DeepSpeedZeroOptimizer.step``
(``stage_1_and_2.py:3013``) then does per-group work in every step: it flattens, unscales,
steps and copies back one group at a time (``:3075``-``:3164``), the basic optimizer called
once per group (``_optimizer_step``, ``:2967``), then all-gathers every group's partition with
one collective per group (``all_gather_dp_groups``, ``runtime/utils.py:1019`` ->
``all_gather_into_tensor_dp_groups``, ``:1008``); and ``scaled_global_norm`` (``:2943``)
all-reduces one norm scalar per group (``get_grad_norm_direct``, ``:2648``).

Installed by :func:`ldb_ds.zero_hooks.install_step_loops` where the plain path applies
(:func:`plain`) and the mirrored sources hash as verified (:data:`MIRRORED`):

* :func:`step`: DeepSpeed's step up to the gradient norm and the overflow decision, line by
  line; then for the *kept* groups one flatten (one ``cat``), one unscale/clip, **one**
  basic-optimizer call over all of them (the step filter then steps groups of equal
  hyperparameters as one, ``functional.merged_groups``), one batched copy of the fp32
  partitions into the bit16 ones and one coalesced all-gather (:func:`allgather_partitions`).
  Dropped groups get no flatten, unscale, step, copy-back or all-gather: their gradients are
  DeepSpeed's zero fill, and they are released unread.

:func:`install_batched_grad_norm` (one all-reduce for all group norms) is installed by
``installation.install`` itself; :func:`step` calls it through ``scaled_global_norm``.
Memory: the batched step holds the kept groups' fp32 gradients at once, as DeepSpeed does for
a model with one param group (it frees each group's after stepping it).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from .groups import NOT_A_GRADIENT, step_groups
from .norms import foreach_norm_takes_dtype, group_square_sums
from .patches import Kind, PatchSet, fallback_warning
from .version import mirrors_verified
from .views import point_into

# Both replacements read the gradient partitions on the current stream. With overlap_comm they are
# reduced on DeepSpeed's reduction stream, and the backward epilogue is what synchronizes the device
# before any step (stage_1_and_2.py:1026-1028): its source is checked too, so a DeepSpeed that moved
# that wait elsewhere runs its own code.
EPILOGUE = "stage_1_and_2.DeepSpeedZeroOptimizer.independent_gradient_partition_epilogue"

NORM_MIRRORED = ["stage_1_and_2.DeepSpeedZeroOptimizer.scaled_global_norm",
                 "stage_1_and_2.DeepSpeedZeroOptimizer.get_grad_norm_direct", "utils.combine_grad_norm_groups",
                 EPILOGUE]
"""The DeepSpeed functions :func:`install_batched_grad_norm` mirrors: a changed source keeps DeepSpeed's own norm."""

MIRRORED = ["stage_1_and_2.DeepSpeedZeroOptimizer.step", "stage_1_and_2.DeepSpeedZeroOptimizer._optimizer_step",
            "utils.all_gather_into_tensor_dp_groups",
            "stage_1_and_2.DeepSpeedZeroOptimizer._update_model_bit16_weights", EPILOGUE]
"""The DeepSpeed functions :func:`step` mirrors (keys of ``version.MIRRORED_SOURCES``)."""


# --------------------------------------------------------------------------- the coalesced all-gather


def allgather_partitions(flats: Sequence[torch.Tensor], partitions: Sequence[Sequence[torch.Tensor]],
                         process_group: Any, bucket_numel: int) -> int:
    """All-gather several groups' partitions over one process group in as few collectives as fit.

    ``flats[k]`` is group k's flat buffer, ``partitions[k][r]`` rank r's partition of it (a view).
    Every rank's partition of a group has the same size, so the partitions of all groups can be
    sent as one buffer: each rank concatenates its own partitions (copy-in), one
    ``all_gather_into_tensor`` fills a receive buffer ``[rank 0's | rank 1's | ...]``, and the
    other ranks' pieces are copied into their places (copy-out). This is what DeepSpeed's
    ``all_gather_into_tensor_dp_groups`` (``runtime/utils.py:1008``) does group by group, with
    one collective per group; the values that land in every buffer are the same bytes.

    A group cannot be gathered in place together with others: its flat buffer must stay
    contiguous (its parameters are views into it, and they straddle partition boundaries), while
    one collective needs each rank's contribution contiguous; so the copies are the price of a
    single launch. Groups go into buckets of at most ``bucket_numel`` gathered elements
    (DeepSpeed's ``allgather_bucket_size``); a bucket of one group is gathered in place, with no
    copy. Returns the number of collectives issued.
    """
    from deepspeed import comm as dist

    world = dist.get_world_size(group=process_group)
    if world == 1 or not flats:
        return 0  # DeepSpeed skips it too (runtime/utils.py:1012): one rank holds every partition
    rank = dist.get_rank(group=process_group)
    # Every rank forms the same buckets: they depend only on the partition sizes (equal on all
    # ranks, by DeepSpeed's partitioning) and bucket_numel (one config), and every rank passes
    # the same kept groups (the mask was broadcast). So the collectives pair up rank by rank.
    buckets: list[list[int]] = [[]]
    size = 0
    for k in range(len(flats)):
        n = partitions[k][rank].numel() * world
        if buckets[-1] and size + n > bucket_numel:
            buckets.append([])
            size = 0
        buckets[-1].append(k)
        size += n
    calls = 0
    for bucket in buckets:
        if len(bucket) == 1:
            k = bucket[0]
            dist.all_gather_into_tensor(flats[k], partitions[k][rank], process_group)
            calls += 1
            continue
        own = [partitions[k][rank] for k in bucket]
        send = torch.cat(own)
        recv = torch.empty(world * send.numel(), dtype=send.dtype, device=send.device)
        dist.all_gather_into_tensor(recv, send, process_group)
        calls += 1
        dsts, srcs = [], []
        for r in range(world):
            if r == rank:
                continue  # our own partitions are already in place
            offset = r * send.numel()
            for k, piece in zip(bucket, own):
                dsts.append(partitions[k][r])
                srcs.append(recv.narrow(0, offset, piece.numel()))
                offset += piece.numel()
        torch._foreach_copy_(dsts, srcs)
    return calls


# --------------------------------------------------------------------------- ZeRO-1/2


def plain(z: Any) -> bool:
    """Whether ``z`` is a ZeRO-1/2 optimizer whose step() :func:`step` mirrors (no offload, MoE, Muon...)."""
    try:
        from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
        from deepspeed import comm as dist
    except ImportError:
        return False
    if not isinstance(z, DeepSpeedZeroOptimizer) or type(z).step is not DeepSpeedZeroOptimizer.step:
        return False
    # Attributes as DeepSpeedZeroOptimizer.__init__ sets them (stage_1_and_2.py): cpu_offload :221-224,
    # zenflow :228, real_dp_process_group :293 (one per group), has_moe_layers :302,
    # groups_lacking_loss_scale :407, torch_autocast_gradscaler :608-612; comm.has_all_gather_into_tensor
    # (comm/comm.py:345).
    groups = z.real_dp_process_group
    return (not z.cpu_offload and not z.has_moe_layers and not z.zenflow and z.torch_autocast_gradscaler is None
            and "muon" not in type(z.optimizer).__name__.lower() and not getattr(z, "groups_lacking_loss_scale", None)
            and all(g is groups[0] for g in groups) and dist.has_all_gather_into_tensor())


def _plain_gradients(z: Any) -> bool:
    # DeepCompile may hand over pre-flattened gradient partitions (stage_1_and_2.py:2904); only
    # DeepSpeed's loop knows them.
    for grads in z.averaged_gradients.values():
        if getattr(grads, "flat_partition", None) is not None or hasattr(grads, "release_grad_buffers"):
            return False
    return True


def step(z: Any, step_state: Any, deepspeed_step: Callable) -> Callable:
    """``DeepSpeedZeroOptimizer.step`` (``stage_1_and_2.py:3013``) with the per-group loop batched.

    Up to the overflow decision it is DeepSpeed's code, line for line (``:3017``-``:3072``), but
    for DeepSpeed's separate inf/NaN check, which is left out where the norm decides overflow
    anyway (the same verdict: the comment there says why), so overflow and loss scaling (fp16)
    behave exactly as in DeepSpeed. The loop over groups
    (``:3075``-``:3164``) is then done once for all kept groups: the same values reach the
    same buffers (each element is flattened, converted, multiplied by the same factor and
    updated by the same per-parameter rule), so parameters and optimizer state are bitwise
    DeepSpeed's (tests/dist/test_zero_step_dist.py checks it).
    """
    from deepspeed import comm as dist
    from deepspeed.runtime.utils import is_invalid_grad_norm
    from deepspeed.runtime.zero.stage_1_and_2 import (INITIAL_MICRO_STEP_ID, OPTIMIZER_ALLGATHER_TIMER,
                                                      OPTIMIZER_GRADIENTS_TIMER, OPTIMIZER_STEP_TIMER,
                                                      OPTIMIZER_TIMERS)

    zeros: dict[tuple, torch.Tensor] = {}
    # _update_model_bit16_weights (:889) points each parameter of group i (in round-robin order)
    # at flat.narrow(0, offset, numel).view(shape), then sets each param's data to its own
    # round-robin entry's data: the same objects reordered (_round_robin_reorder), so the second
    # loop is a no-op wherever that holds, checked here once. The layouts are fixed at __init__.
    same_params = all(rr[idx[k]] is p for rr, idx, group in
                      zip(z.round_robin_bit16_groups, z.round_robin_bit16_indices, z.bit16_groups)
                      for k, p in enumerate(group))
    layouts = [(rr, offsets, [meta.shape for meta in metas]) for rr, offsets, metas in
               zip(z.round_robin_bit16_groups, z.round_robin_bit16_offsets, z.round_robin_bit16_meta)]

    def point_group_into_flat(i: int) -> None:
        point_into(z.bit16_groups_flat[i], *layouts[i])

    repoint = point_group_into_flat if same_params else z._update_model_bit16_weights

    def padding(numel: int, like: torch.Tensor) -> torch.Tensor:
        # A zero buffer per dtype and device, grown to the largest padding seen, never written.
        key = (like.dtype, like.device)
        buf = zeros.get(key)
        if buf is None or buf.numel() < numel:
            buf = zeros[key] = torch.zeros(numel, dtype=like.dtype, device=like.device)
        return buf.narrow(0, 0, numel)

    def step(closure: Any = None) -> None:
        if not _plain_gradients(z):
            return deepspeed_step(closure)
        skipped = step_state.skipped_groups
        # :3017-3072, as DeepSpeed has them (cpu_offload is excluded at install).
        z.micro_step_id = INITIAL_MICRO_STEP_ID
        z._wait_for_offload_copies()
        if not z.compute_grad_norm:
            z._global_grad_norm = None
        z.overflow = False
        # Where the gradient norm is computed and its validity decides overflow (every fp16
        # step; bf16 with check_grad_overflow, DeepSpeed's default), DeepSpeed's separate check
        # (:3029, has_overflow_partitioned_grads_serial: 7 kernels per gradient tensor, an
        # all-reduce and a host sync) decides nothing more, so it is not run. Same verdict both
        # ways: an inf or NaN in any kept gradient on any rank makes that rank's sum of squares
        # non-finite (squares are >= 0: nothing cancels an inf), the norm all-reduce carries it to
        # every rank and is_invalid_grad_norm sets overflow on all of them alike; and where the
        # check finds nothing, DeepSpeed computes this same norm and tests it the same way. A
        # dropped group's gradients are DeepSpeed's zero fill, which the check finds finite. The
        # skip, the loss-scale update and the reported norm (inf) are DeepSpeed's (:3050).
        norm_decides_overflow = z.compute_grad_norm and (z.dtype != torch.bfloat16 or z.check_grad_overflow)
        if z.check_grad_overflow and not norm_decides_overflow:
            z.check_overflow(partition_gradients=z.partition_gradients)
        scaled_global_grad_norm = None
        if z.compute_grad_norm and not z.overflow:
            scaled_global_grad_norm = z.scaled_global_norm()
            if norm_decides_overflow and is_invalid_grad_norm(scaled_global_grad_norm):
                z.overflow = True
        prev_scale = z.loss_scale
        z._update_scale(z.overflow)
        if not z.overflow:
            z._commit_muon_momentum()
        if z.overflow:  # :3050-3068, the non-offload branch
            if z.compute_grad_norm:
                z._global_grad_norm = float("inf")
            z.zero_grad(set_to_none=True)
            z._release_preflattened_grad_buffers()
            for k in z.averaged_gradients.keys():
                z.averaged_gradients[k] = None
                z.all_grad_tensors[k] = None
            for timer in OPTIMIZER_TIMERS:
                z.timers(timer).start()
                z.timers(timer).stop()
            return
        if scaled_global_grad_norm is not None:
            z._global_grad_norm = scaled_global_grad_norm / prev_scale

        # The loop of :3075-3164 (non-offload branch), batched over the kept groups.
        z.timers(OPTIMIZER_GRADIENTS_TIMER).start()
        process_group = z.real_dp_process_group[0]  # one group for all (checked at install)
        partition_id = dist.get_rank(group=process_group)
        last_partition = partition_id == dist.get_world_size(group=process_group) - 1
        kept, tensors = [], []
        for i in range(len(z.bit16_groups)):
            z.free_grad_in_param_list(z.params_not_in_partition[i])  # :3103
            if i not in skipped:
                grads = z.averaged_gradients[i]
                numel = sum(g.numel() for g in grads)
                if last_partition and numel % int(z.partition_size[i]):
                    # :3114, flatten_dense_tensors_aligned pads the last partition to its size
                    # with zeros (align_dense_tensors, runtime/utils.py:994): the same zeros,
                    # as a view of one buffer instead of a torch.zeros per group.
                    pad = int(z.partition_size[i]) - numel % int(z.partition_size[i])
                    grads = grads + [padding(pad, grads[0])]
                    numel += pad
                assert numel == z.partition_size[i], \
                    f"averaged gradients have {numel} elements, partition size {z.partition_size[i]} (group {i})"
                tensors.extend(grads)
                kept.append(i)
            # :3128-3132. A dropped group's gradients are DeepSpeed's zero fill: released unread.
            z.free_grad_in_param_list(z.params_in_partition[i])
            z.averaged_gradients[i] = None
            z.all_grad_tensors[i] = None
        if not kept:  # every group dropped (cannot happen with keep_first/keep_last >= 1)
            z.timers(OPTIMIZER_GRADIENTS_TIMER).stop()
            z.timers.log(OPTIMIZER_TIMERS)
            return
        fp32 = [z.single_partition_of_fp32_groups[i] for i in kept]
        # :3114-3118: one flatten and one conversion for all kept groups instead of one per group.
        single_grad_partition = z.flatten(tensors).to(fp32[0].dtype)
        del tensors
        offset = 0
        for i, master in zip(kept, fp32):
            master.grad = single_grad_partition.narrow(0, offset, int(z.partition_size[i]))
            offset += int(z.partition_size[i])
        # :3133: the combined scale depends on the global norm and the loss scale only, so one
        # multiplication of the whole buffer is each group's multiplication.
        z.unscale_and_clip_grads([single_grad_partition], scaled_global_grad_norm)
        z.timers(OPTIMIZER_GRADIENTS_TIMER).stop()

        # :3139 -> _optimizer_step (:2967) once, with every kept group (dropped ones are
        # not even shown); the step filter then steps equal-hyperparameter groups as one.
        z.timers(OPTIMIZER_STEP_TIMER).start()
        step_groups(z.optimizer, kept)
        z._lazy_init_hp_params_optimizer_state()
        # :3141-3145: drop the fp32 gradients, copy fp32 -> bit16 partitions (one batched copy).
        for master in fp32:
            master.grad = None
        del single_grad_partition
        own = [z.parallel_partitioned_bit16_groups[i][partition_id] for i in kept]
        with torch.no_grad():
            torch._foreach_copy_(own, fp32)
        z.timers(OPTIMIZER_STEP_TIMER).stop()

        # :3155: all-gather the kept groups only (a dropped group did not change on any
        # rank: every rank skipped the same groups), in one collective per bucket.
        z.timers(OPTIMIZER_ALLGATHER_TIMER).start()
        allgather_partitions([z.bit16_groups_flat[i] for i in kept],
                             [z.parallel_partitioned_bit16_groups[i] for i in kept], process_group,
                             z.allgather_bucket_size)
        z.timers(OPTIMIZER_ALLGATHER_TIMER).stop()
        # :3163-3164: re-point the model parameters into the flat buffers (views.point_into:
        # only those that moved, normally none). A dropped group's buffer was not written.
        for i in kept:
            repoint(i)
        z.timers.log(OPTIMIZER_TIMERS)

    return step


# --------------------------------------------------------------------------- the gradient norm


def install_batched_grad_norm(ds_engine: Any, step_state: Any, patches: PatchSet) -> bool:
    """ZeRO-1/2: one all-reduce for all group norms instead of one per group.

    ``DeepSpeedZeroOptimizer.scaled_global_norm`` (``stage_1_and_2.py:2943``) calls
    ``get_grad_norm_direct`` (``:2648``) per param group, and each call all-reduces one scalar. With one group per
    unit that is hundreds of tiny collectives per step (the benchmark counted
    42 per step for resnet18 against 2 for the baseline). This replacement
    does the same arithmetic - per group the sum over its gradients of
    ``vector_norm(g.double())**2``, summed over ranks, square-rooted, inf/NaN
    masked to -1, then ``combine_grad_norm_groups`` - but sums all groups in one
    all-reduce of a vector, so each group's value is the same number DeepSpeed
    computes. Dropped groups' gradients are DeepSpeed's zero fill: their
    contribution is 0 and is not computed.

    Installed only where the plain path applies (no CPU offload, MoE, model or
    pipeline parallelism, Muon); elsewhere DeepSpeed's own method stays.
    Returns whether it was installed.
    """
    z = ds_engine.optimizer
    if not hasattr(z, "scaled_global_norm") or not hasattr(z, "bit16_groups"):
        return False
    from deepspeed import comm as dist
    from deepspeed.accelerator import get_accelerator
    from deepspeed.runtime.utils import combine_grad_norm_groups, is_model_parallel_parameter
    from deepspeed.runtime.zero.utils import get_norm_dtype

    plain = (not z.cpu_offload and not z.has_moe_layers and not getattr(z, "use_muon", False)
             and z.mpu is None and getattr(z, "model_parallel_rank", 0) == 0
             and not any(hasattr(p, "ds_pipe_replicated") or is_model_parallel_parameter(p)
                         for group in z.bit16_groups for p in group))
    if not plain:
        return False
    if not mirrors_verified(NORM_MIRRORED):
        # An optimisation only: with a DeepSpeed whose norm code changed, its own per-group norm
        # runs (exact, one all-reduce per group), and the user is told why the step is slower.
        fallback_warning("the ZeRO-1/2 batched gradient norm (one all-reduce per param group remains)", NORM_MIRRORED)
        return False
    original = z.scaled_global_norm
    device = get_accelerator().current_device_name()
    norm_dtype = get_norm_dtype()
    # The padding of group_square_sums and the stand-in of a dropped group: allocated once, so
    # a step makes no host-to-device copy (DeepSpeed's torch.tensor(0.0).to(device), :2691).
    zero = torch.zeros((), dtype=norm_dtype, device=device)
    foreach_norm_takes_dtype(zero.device.type, norm_dtype)  # asked here, at set-up, not in the first step

    def scaled_global_norm(norm_type: int = 2) -> torch.Tensor:
        if norm_type != 2:
            return original(norm_type)
        dropped = step_state.skipped_groups
        # get_grad_norm_direct's per-tensor norms (:2677-2685), for the kept groups only, in one
        # foreach op, and its per-group sums of squares (:2689) for every group at once
        # (norms.group_square_sums: the same sums), then float as there. A dropped group's
        # gradients are DeepSpeed's zero fill, whose sum is 0.
        stacked = group_square_sums(
            [[g for g in z.averaged_gradients[i] if not getattr(g, "_zero_padding", False)] if i not in dropped else []
             for i in range(len(z.bit16_groups))], zero).float()
        setattr(stacked, NOT_A_GRADIENT, True)  # a byte counter of gradient traffic leaves it out
        # One collective for all groups; every rank contributes its partition's sums.
        dist.all_reduce(stacked, op=dist.ReduceOp.SUM, group=z.dp_process_group)
        norms = stacked.pow(0.5)
        norms = torch.where(torch.isfinite(norms), norms, torch.full_like(norms, -1.0))
        # combine_grad_norm_groups (runtime/utils.py:891) stacks its list back into this vector.
        return combine_grad_norm_groups(list(norms.unbind(0)), norm_type=2)

    patches.set("batched gradient norm", Kind.OPTIMISATION, z, "scaled_global_norm", scaled_global_norm)
    return True


__all__ = ["MIRRORED", "NORM_MIRRORED", "plain", "step", "allgather_partitions", "install_batched_grad_norm"]
