"""ldb_ds's own version of DeepSpeed's per-group ZeRO step loops (deepspeed==0.19.8).

DeepSpeed internals, like :mod:`ldb_ds.zero_hooks` (docs/design.md, section 4): a DeepSpeed
upgrade touches these modules only. ldb_ds gives every unit its own param group, and DeepSpeed's
ZeRO optimizers then do per-group work in every step. ZeRO-1/2 (``DeepSpeedZeroOptimizer.step``,
``stage_1_and_2.py:3013``) flattens, unscales, steps and copies back one group at a time
(``:3075``-``:3164``), the basic optimizer called once per group (``_optimizer_step``,
``:2967``), then all-gathers every group's partition with one collective per group
(``all_gather_dp_groups``, ``runtime/utils.py:1019`` -> ``all_gather_into_tensor_dp_groups``,
``:1008``). ZeRO-3 does the same per sub-group (:mod:`ldb_ds.zero3_step`).

What :func:`install` puts in place, where the plain path applies:

* **ZeRO-1/2 step** (:func:`_zero12_step`): DeepSpeed's step up to the gradient norm and the
  overflow decision, line by line; then for the *kept* groups one flatten (one ``cat``), one
  unscale/clip, **one** basic-optimizer call over all of them (the step filter then steps
  groups of equal hyperparameters as one, ``functional.merged_groups``), one batched copy of
  the fp32 partitions into the bit16 ones and one coalesced all-gather
  (:func:`allgather_partitions`). Dropped groups get no flatten, unscale, step, copy-back or
  all-gather: their gradients are DeepSpeed's zero fill, and they are released unread.
* **ZeRO-3** (:mod:`ldb_ds.zero3_step`): the sub-group norms in one all-reduce, and the
  sub-group loop batched the same way.

Each replacement is checked against the installed DeepSpeed: the version must be in
``zero_hooks.VERIFIED_DEEPSPEED`` *and* the source of every DeepSpeed function it mirrors must
hash to what was verified (:data:`MIRRORED_SOURCES`); otherwise DeepSpeed's own code stays.
Offload, MoE, Muon, ZenFlow, torch autocast's GradScaler, per-parameter process groups and
AutoEP keep DeepSpeed's loops too (the replacements decline, as ``install_batched_grad_norm``
does). Memory: the batched loops hold the kept groups' fp32 gradients at once, as DeepSpeed
does for a model with one param group (it frees each group's after stepping it).
"""

from __future__ import annotations

import hashlib
import inspect
from typing import Any, Callable, Sequence

import torch

from . import zero3_step
from .zero_hooks import deepspeed_version_verified

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
    "stage3.DeepSpeedZeroOptimizer_Stage3.step": "c751b3209f83d3b9",
    "stage3.DeepSpeedZeroOptimizer_Stage3._prepare_fp32_grad_for_sub_group": "6c19570c775487ef",
    "stage3.DeepSpeedZeroOptimizer_Stage3.unscale_and_clip_grads": "3f0d9e8e7861fd44",
    "stage3.DeepSpeedZeroOptimizer_Stage3._reassign_or_swap_out_partitioned_parameters": "af7b449bee8786ec",
    "stage3.DeepSpeedZeroOptimizer_Stage3._release_sub_group": "8830be5fe99207f7",
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
    if zero3_step.norm_group(z) is not None:
        if mirrors_verified(zero3_step.MIRRORED["norm"]):
            z._get_norm_groups = zero3_step.norm_groups(z, skipped_groups)
            names.append("zero3_grad_norm")
        if mirrors_verified(zero3_step.MIRRORED["optimizer_step"]):
            z._optimizer_step = zero3_step.optimizer_step(z)
            names.append("zero3_optimizer_step")
        if type(z).step is _mirrored_object("stage3.DeepSpeedZeroOptimizer_Stage3.step") \
                and mirrors_verified(zero3_step.MIRRORED["step"]):
            z.step = zero3_step.step(z, skipped_groups)
            names.append("zero3_step")
    setattr(z, INSTALLED_ATTR, tuple(names))
    return tuple(names)


def uninstall(ds_engine: Any) -> None:
    """Put DeepSpeed's own methods back (the instance attributes :func:`install` set are removed)."""
    z = ds_engine.optimizer
    for name, attr in (("zero12_step", "step"), ("zero3_grad_norm", "_get_norm_groups"),
                       ("zero3_optimizer_step", "_optimizer_step"), ("zero3_step", "step")):
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
    (``:3075``-``:3164``) is then done once for all kept groups: the same values reach the
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
                if last_partition:  # :3114, flatten_dense_tensors_aligned pads to the partition size
                    grads = align_dense_tensors(grads, int(z.partition_size[i]))
                numel = sum(g.numel() for g in grads)
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
        all_groups = z.optimizer.param_groups
        z.optimizer.param_groups = [all_groups[i] for i in kept]
        try:
            z.optimizer.step()
        finally:
            z.optimizer.param_groups = all_groups
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
        # :3163-3164: re-point the model parameters into the flat buffers. A dropped group's
        # buffer was not written, its parameters already point into it.
        for i in kept:
            z._update_model_bit16_weights(i)
        z.timers.log(OPTIMIZER_TIMERS)

    return step


__all__ = ["MIRRORED_SOURCES", "install", "uninstall", "installed", "allgather_partitions", "mirrors_verified",
           "source_digest"]
