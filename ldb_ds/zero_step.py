"""ldb_ds's own version of DeepSpeed's per-group ZeRO step loops (deepspeed==0.19.8).

DeepSpeed internals, like :mod:`ldb_ds.zero_hooks` (docs/design.md, section 4): a DeepSpeed
upgrade touches these two modules only. ldb_ds gives every unit its own param group, and
DeepSpeed's ZeRO optimizers do per-group work in every step:

* ZeRO-1/2 (``DeepSpeedZeroOptimizer.step``, ``stage_1_and_2.py:3013``) flattens, unscales,
  steps and copies back one group at a time (``:3074``-``:3163``), the basic optimizer called
  once per group (``_optimizer_step``, ``:2967``), then all-gathers every group's partition
  with one collective per group (``all_gather_dp_groups``, ``runtime/utils.py:1019`` ->
  ``all_gather_into_tensor_dp_groups``, ``:1009``);
* ZeRO-3 all-reduces one gradient-norm scalar per sub-group (``_get_norm_groups``,
  ``stage3.py:2573`` -> ``get_grad_norm_direct``, ``:2419``) and steps the basic optimizer
  once per sub-group with *every* group dict visible (``_optimizer_step``, ``:1235``): the
  optimizer walks all N groups N times per step.

What this module installs instead, where the plain path applies (:func:`install`):

* **ZeRO-1/2 step** (:func:`_zero12_step`): DeepSpeed's step up to the gradient norm and the
  overflow decision, line by line; then for the *kept* groups one flatten (one ``cat``), one
  unscale/clip, **one** basic-optimizer call over all of them (the step filter then steps
  groups of equal hyperparameters as one, ``functional.merged_groups``), one batched copy of
  the fp32 partitions into the bit16 ones and one coalesced all-gather
  (:func:`allgather_partitions`). Dropped groups get no flatten, unscale, step, copy-back or
  all-gather: their gradients are DeepSpeed's zero fill, and they are released unread.
* **ZeRO-3 gradient norm** (:func:`_zero3_norm_groups`): the same per-sub-group arithmetic
  with one all-reduce of a vector instead of one per sub-group.
* **ZeRO-3 optimizer call** (:func:`_zero3_optimizer_step`): the sub-group's group is the only
  one the basic optimizer sees, so a step walks N groups once instead of N times.

Each replacement is checked against the installed DeepSpeed: the version must be in
``zero_hooks.VERIFIED_DEEPSPEED`` *and* the source of every DeepSpeed function it mirrors must
hash to what was verified (:data:`MIRRORED_SOURCES`); otherwise DeepSpeed's own code stays.
Offload, MoE, Muon, ZenFlow, torch autocast's GradScaler, per-parameter process groups and
AutoEP keep DeepSpeed's loops too.
"""

from __future__ import annotations

import hashlib
import inspect
from typing import Any, Callable, Sequence

import torch

from .zero_hooks import NOT_A_GRADIENT, deepspeed_version_verified

# sha256 (first 16 hex digits) of ``inspect.getsource`` of each DeepSpeed function a replacement
# here mirrors, as in deepspeed 0.19.8. A changed function means the mirror may be stale: the
# replacement is then not installed and DeepSpeed's own code runs.
MIRRORED_SOURCES = {
    "stage_1_and_2.DeepSpeedZeroOptimizer.step": "9520884fd916d178",
    "stage_1_and_2.DeepSpeedZeroOptimizer._optimizer_step": "d7e21affbbf9b696",
    "utils.all_gather_into_tensor_dp_groups": "6e61807fbe6b0417",
    "stage3.DeepSpeedZeroOptimizer_Stage3._get_norm_groups": "6a068faa3149b1f4",
    "stage3.DeepSpeedZeroOptimizer_Stage3.get_grad_norm_direct": "5ba2252d5f16b541",
    "stage3.DeepSpeedZeroOptimizer_Stage3._optimizer_step": "35f8511bba5ff760",
}

INSTALLED_ATTR = "_ldb_step_hooks"


def _mirrored_object(name: str) -> Any:
    import importlib

    module_name, *attrs = name.split(".")
    package = "deepspeed.runtime" if module_name == "utils" else "deepspeed.runtime.zero"
    obj: Any = importlib.import_module(f"{package}.{module_name}")
    for a in attrs:
        obj = getattr(obj, a)
    return obj


def _unwrapped(fn: Any) -> Any:
    # DeepSpeed decorates some methods with instrument_w_nvtx (utils/nvtx.py:25), whose wrapper
    # keeps the function in its closure, not in __wrapped__.
    for _ in range(4):
        inner = getattr(fn, "__wrapped__", None)
        if inner is None and getattr(fn, "__closure__", None):
            inner = next((c.cell_contents for c in fn.__closure__ if inspect.isfunction(c.cell_contents)), None)
        if inner is None:
            break
        fn = inner
    return fn


def source_digest(obj: Any) -> str | None:
    """Short sha256 of a function's source (decorators looked through), None where it cannot be read."""
    try:
        return hashlib.sha256(inspect.getsource(_unwrapped(obj)).encode()).hexdigest()[:16]
    except (OSError, TypeError):
        return None


def mirrors_verified(names: Sequence[str]) -> bool:
    """Whether the installed DeepSpeed is verified and its functions ``names`` are as verified."""
    import deepspeed

    if not deepspeed_version_verified(deepspeed.__version__):
        return False
    return all(source_digest(_mirrored_object(n)) == MIRRORED_SOURCES[n] for n in names)


def installed(ds_engine: Any) -> tuple[str, ...]:
    """Which of this module's replacements run in ``ds_engine`` (empty: DeepSpeed's own loops)."""
    return tuple(getattr(ds_engine.optimizer, INSTALLED_ATTR, ()))


def install(ds_engine: Any, skipped_groups: Callable[[], frozenset[int]]) -> tuple[str, ...]:
    """Install what applies to ``ds_engine``'s ZeRO optimizer; returns the names installed.

    ``skipped_groups()`` gives the indices of the param groups of the dropped units in the
    step about to run (read once per step).
    """
    z = ds_engine.optimizer
    names: list[str] = []
    if _zero12_plain(z) and mirrors_verified(["stage_1_and_2.DeepSpeedZeroOptimizer.step",
                                              "stage_1_and_2.DeepSpeedZeroOptimizer._optimizer_step",
                                              "utils.all_gather_into_tensor_dp_groups"]):
        z.step = _zero12_step(z, skipped_groups, z.step)
        names.append("zero12_step")
    if _zero3_norm_group(z) is not None:
        if mirrors_verified(["stage3.DeepSpeedZeroOptimizer_Stage3._get_norm_groups",
                             "stage3.DeepSpeedZeroOptimizer_Stage3.get_grad_norm_direct"]):
            z._get_norm_groups = _zero3_norm_groups(z, skipped_groups)
            names.append("zero3_grad_norm")
        if mirrors_verified(["stage3.DeepSpeedZeroOptimizer_Stage3._optimizer_step"]):
            z._optimizer_step = _zero3_optimizer_step(z)
            names.append("zero3_optimizer_step")
    setattr(z, INSTALLED_ATTR, tuple(names))
    return tuple(names)


def uninstall(ds_engine: Any) -> None:
    """Put DeepSpeed's own methods back (the instance attributes :func:`install` set are removed)."""
    z = ds_engine.optimizer
    for name, attr in (("zero12_step", "step"), ("zero3_grad_norm", "_get_norm_groups"),
                       ("zero3_optimizer_step", "_optimizer_step")):
        if name in installed(ds_engine):
            delattr(z, attr)
    setattr(z, INSTALLED_ATTR, ())


# --------------------------------------------------------------------------- the coalesced all-gather


def allgather_partitions(flats: Sequence[torch.Tensor], partitions: Sequence[Sequence[torch.Tensor]],
                         process_group: Any, bucket_numel: int) -> int:
    """All-gather several groups' partitions over one process group in as few collectives as fit.

    ``flats[k]`` is group k's flat buffer, ``partitions[k][r]`` rank r's partition of it (a view).
    Every rank's partition of a group has the same size, so the partitions of all groups can be
    sent as one buffer: each rank concatenates its own partitions (copy-in), one
    ``all_gather_into_tensor`` fills a receive buffer ``[rank 0's | rank 1's | ...]``, and the
    other ranks' pieces are copied into their places (copy-out). This is what DeepSpeed's
    ``all_gather_into_tensor_dp_groups`` (``runtime/utils.py:1009``) does group by group, with
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
        return 0  # DeepSpeed skips it too (runtime/utils.py:1013): one rank holds every partition
    rank = dist.get_rank(group=process_group)
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


def _zero12_plain(z: Any) -> bool:
    """The ZeRO-1/2 configurations whose step() this module mirrors (no offload, MoE, Muon...)."""
    try:
        from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
        from deepspeed import comm as dist
    except ImportError:
        return False
    if not isinstance(z, DeepSpeedZeroOptimizer) or type(z).step is not DeepSpeedZeroOptimizer.step:
        return False
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


def _zero12_step(z: Any, skipped_groups: Callable[[], frozenset[int]], deepspeed_step: Callable) -> Callable:
    """``DeepSpeedZeroOptimizer.step`` (``stage_1_and_2.py:3013``) with the per-group loop batched.

    Up to the overflow decision it is DeepSpeed's code, line for line (``:3017``-``:3072``), so
    overflow and loss scaling (fp16) behave exactly as in DeepSpeed. The loop over groups
    (``:3075``-``:3163``) is then done once for all kept groups: the same values reach the
    same buffers (each element is flattened, converted, multiplied by the same factor and
    updated by the same per-parameter rule), so parameters and optimizer state are bitwise
    DeepSpeed's (tests/dist/test_core_dist.py checks it).
    """
    from deepspeed import comm as dist
    from deepspeed.runtime.utils import align_dense_tensors, is_invalid_grad_norm
    from deepspeed.runtime.zero.stage_1_and_2 import (INITIAL_MICRO_STEP_ID, OPTIMIZER_ALLGATHER_TIMER,
                                                      OPTIMIZER_GRADIENTS_TIMER, OPTIMIZER_STEP_TIMER,
                                                      OPTIMIZER_TIMERS)

    def step(closure: Any = None) -> None:
        if not _plain_gradients(z):
            return deepspeed_step(closure)
        skipped = skipped_groups()
        # :3017-3072, as DeepSpeed has them (cpu_offload is excluded at install).
        z.micro_step_id = INITIAL_MICRO_STEP_ID
        z._wait_for_offload_copies()
        if not z.compute_grad_norm:
            z._global_grad_norm = None
        z.overflow = False
        if z.check_grad_overflow:
            z.check_overflow(partition_gradients=z.partition_gradients)
        scaled_global_grad_norm = None
        if z.compute_grad_norm and not z.overflow:
            scaled_global_grad_norm = z.scaled_global_norm()
            if (z.dtype != torch.bfloat16 or z.check_grad_overflow) and is_invalid_grad_norm(scaled_global_grad_norm):
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

        # The loop of :3075-3163 (non-offload branch), batched over the kept groups.
        z.timers(OPTIMIZER_GRADIENTS_TIMER).start()
        process_group = z.real_dp_process_group[0]  # one group for all (checked at install)
        partition_id = dist.get_rank(group=process_group)
        last_partition = partition_id == dist.get_world_size(group=process_group) - 1
        kept, tensors = [], []
        for i in range(len(z.bit16_groups)):
            z.free_grad_in_param_list(z.params_not_in_partition[i])  # :3101
            if i not in skipped:
                grads = z.averaged_gradients[i]
                if last_partition:  # :3111, flatten_dense_tensors_aligned pads to the partition size
                    grads = align_dense_tensors(grads, int(z.partition_size[i]))
                numel = sum(g.numel() for g in grads)
                assert numel == z.partition_size[i], \
                    f"averaged gradients have {numel} elements, partition size {z.partition_size[i]} (group {i})"
                tensors.extend(grads)
                kept.append(i)
            # :3125-3130. A dropped group's gradients are DeepSpeed's zero fill: released unread.
            z.free_grad_in_param_list(z.params_in_partition[i])
            z.averaged_gradients[i] = None
            z.all_grad_tensors[i] = None
        if not kept:  # every group dropped (cannot happen with keep_first/keep_last >= 1)
            z.timers(OPTIMIZER_GRADIENTS_TIMER).stop()
            z.timers.log(OPTIMIZER_TIMERS)
            return
        fp32 = [z.single_partition_of_fp32_groups[i] for i in kept]
        # :3113-3117: one flatten and one conversion for all kept groups instead of one per group.
        single_grad_partition = z.flatten(tensors).to(fp32[0].dtype)
        del tensors
        offset = 0
        for i, master in zip(kept, fp32):
            master.grad = single_grad_partition.narrow(0, offset, int(z.partition_size[i]))
            offset += int(z.partition_size[i])
        # :3131: the combined scale depends on the global norm and the loss scale only, so one
        # multiplication of the whole buffer is each group's multiplication.
        z.unscale_and_clip_grads([single_grad_partition], scaled_global_grad_norm)
        z.timers(OPTIMIZER_GRADIENTS_TIMER).stop()

        # :3136-3139 -> _optimizer_step (:2967) once, with every kept group (dropped ones are
        # not even shown); the step filter then steps equal-hyperparameter groups as one.
        z.timers(OPTIMIZER_STEP_TIMER).start()
        all_groups = z.optimizer.param_groups
        z.optimizer.param_groups = [all_groups[i] for i in kept]
        try:
            z.optimizer.step()
        finally:
            z.optimizer.param_groups = all_groups
        z._lazy_init_hp_params_optimizer_state()
        # :3141-3147: drop the fp32 gradients, copy fp32 -> bit16 partitions (one batched copy).
        for master in fp32:
            master.grad = None
        del single_grad_partition
        own = [z.parallel_partitioned_bit16_groups[i][partition_id] for i in kept]
        with torch.no_grad():
            torch._foreach_copy_(own, fp32)
        z.timers(OPTIMIZER_STEP_TIMER).stop()

        # :3155-3161: all-gather the kept groups only (a dropped group did not change on any
        # rank: every rank skipped the same groups), in one collective per bucket.
        z.timers(OPTIMIZER_ALLGATHER_TIMER).start()
        allgather_partitions([z.bit16_groups_flat[i] for i in kept],
                             [z.parallel_partitioned_bit16_groups[i] for i in kept], process_group,
                             z.allgather_bucket_size)
        z.timers(OPTIMIZER_ALLGATHER_TIMER).stop()
        # :3164-3165: re-point the model parameters into the flat buffers. A dropped group's
        # buffer was not written, its parameters already point into it.
        for i in kept:
            z._update_model_bit16_weights(i)
        z.timers.log(OPTIMIZER_TIMERS)

    return step


# --------------------------------------------------------------------------- ZeRO-3


def _zero3_norm_group(z: Any) -> Any:
    """The one process group all of ZeRO-3's norms reduce over, or None where that is not the plain path.

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
    if z.offload_optimizer or z.swap_optimizer or getattr(z, "use_muon", False) or getattr(z, "zenflow", False) \
            or z.torch_autocast_gradscaler is not None or z.model_parallel_group is not None:
        return None
    groups = {id(getattr(p, "ds_process_group", z.dp_process_group)): getattr(p, "ds_process_group", z.dp_process_group)
              for sub_group in z.fp16_groups for p in sub_group}
    if len(groups) != 1 or any(getattr(p, "ds_zero_placement_family", "replicated") == "autoep_expert"
                               for sub_group in z.fp16_groups for p in sub_group):
        return None
    return next(iter(groups.values()))


def _zero3_norm_groups(z: Any, skipped_groups: Callable[[], frozenset[int]]) -> Callable:
    """``_get_norm_groups`` (``stage3.py:2573``) with one all-reduce for all sub-groups.

    Per sub-group it is ``get_grad_norm_direct`` (``:2419``) on the plain path: the sum over
    the partition's gradients of ``norm(g.to(norm dtype))**2``, summed over ranks, square-rooted,
    inf/NaN masked to -1. The sums of all sub-groups go into one vector and one all-reduce, so
    each sub-group's norm is the number DeepSpeed computes. A dropped unit's sub-group holds
    the zeros DeepSpeed gives a ``requires_grad=False`` parameter (``:1426``): its sum is 0,
    not computed.
    """
    from deepspeed import comm as dist
    from deepspeed.accelerator import get_accelerator
    from deepspeed.runtime.zero.utils import get_norm_dtype

    device_name = get_accelerator().device_name()
    process_group = _zero3_norm_group(z)

    def _get_norm_groups() -> list[torch.Tensor]:
        skipped = skipped_groups()
        norm_dtype = get_norm_dtype()
        sums = []
        for i in range(len(z.fp16_groups)):
            grads = z.averaged_gradients[i]
            if z.sub_group_to_group_id[i] in skipped or not grads:
                sums.append(torch.zeros((), dtype=norm_dtype, device=device_name))
                continue
            norms = [g.to(device_name, non_blocking=True).to(norm_dtype).norm(2.0) for g in grads]
            sums.append(torch.sum(torch.pow(torch.stack(norms), 2.0)))
        stacked = torch.stack(sums)
        setattr(stacked, NOT_A_GRADIENT, True)  # a byte counter of gradient traffic leaves it out
        dist.all_reduce(stacked, op=dist.ReduceOp.SUM, group=process_group)
        norms = stacked**(1. / 2.0)
        err = torch.tensor(-1.0, device=z.device, dtype=torch.float)
        norms = torch.where(norms.isnan().logical_or(norms.isinf()), err, norms)
        return list(norms.unbind(0))

    return _get_norm_groups


def _zero3_optimizer_step(z: Any) -> Callable:
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


__all__ = ["MIRRORED_SOURCES", "install", "uninstall", "installed", "allgather_partitions", "mirrors_verified",
           "source_digest"]
