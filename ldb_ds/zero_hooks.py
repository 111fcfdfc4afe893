"""The only place where ldb_ds reaches into DeepSpeed's internals (deepspeed==0.19.8).

A DeepSpeed upgrade should be a change to this file and to ldb_ds's own step loops
(:mod:`ldb_ds.zero_step`, :mod:`ldb_ds.zero3_step`) alone; tests/dist checks every
function here at ZeRO stages 0-3.

How a dropped unit is kept bitwise unchanged at each stage
----------------------------------------------------------
Every stage ends in the *basic* optimizer (the torch or DeepSpeed optimizer the
user configured) being stepped over param groups:

* stage 0, fp32: ``engine.optimizer`` *is* the basic optimizer, stepped once
  over all groups (``engine._take_model_step``);
* stage 0, bf16: ``FP16_UnfusedOptimizer`` keeps an fp32 copy of each parameter
  and steps the basic optimizer once over all groups;
* stage 1, bf16 (fp32 gradient accumulation, DeepSpeed's default): ``BF16_Optimizer``
  keeps one flat fp32 partition per param group and steps the basic optimizer
  once over all of them;
* stages 1/2: ``DeepSpeedZeroOptimizer._optimizer_step(i)`` swaps
  ``param_groups`` to ``[group i]`` (one flat fp32 partition) and steps;
* stage 3: ``_optimizer_step(sub_group)`` puts the sub-group's flat partition
  into its group's ``params`` (all other groups empty) and steps.

In every case the group *dicts* are the ones ldb_ds created, in the same order
(DeepSpeed swaps their ``params`` for flat partitions but keeps the dicts).
So :func:`install_group_step_filter` wraps the basic optimizer's ``step`` and,
for the duration of one call, hides the dicts of dropped units from
``param_groups``. Hidden groups are not looked at at all: no momentum, no
weight decay, no Adam moment, no per-group ``step`` counter moves. Without it,
ZeRO would move dropped units: it turns missing gradients into zeros and steps
the whole flat group, and momentum and weight decay move parameters even with
a zero gradient (docs/design.md, section 4).

The same wrapper applies the DROP-epoch learning-rate factor, only inside the
step, and puts the scheduler's value back afterwards, so any LR scheduler
(DeepSpeed's or torch's) keeps owning ``lr``.

ZeRO-1/2 and BF16_Optimizer then all-gather every group's partition after the step.
:func:`skip_allgather_of_dropped` removes dropped groups from that all-gather: their
values did not change on any rank (every rank skipped the same groups), so each
rank's full copy is already current. That is pure saving, not a correctness need.

ZeRO-Offload (``offload_optimizer: {device: cpu}``, stages 1-3; ``offload_param`` at
stage 3) steps the same basic optimizer over the same group dicts, on fp32 masters in
CPU memory, so the step filter covers it too (docs/design.md, section 4). The offload
paths that step groups some other way are refused before ``deepspeed.initialize`` by
:func:`refuse_unverified_step_paths`.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from .functional import hide_groups, merged_groups


# The DeepSpeed releases every function below was checked against (file:line citations are
# from the last one), inclusive. Older releases are refused at initialize: they lack internals
# used here (``runtime.utils.combine_grad_norm_groups`` is new in 0.19.8) and before 0.19.6 ZeRO-3
# corrupts a checkpoint saved with parameters toggled around the save. Newer releases get a
# warning; the group-order check still runs and raises if DeepSpeed no longer keeps our groups.
VERIFIED_DEEPSPEED = ("0.19.8", "0.19.8")

NOT_A_GRADIENT = "ldb_not_a_gradient"
"""Attribute set on tensors that ldb_ds reduces but that are not gradients (the batched
gradient-norm vector), so a byte counter of gradient traffic can leave them out."""

_version_warned = False


def deepspeed_version_verified(version: str) -> bool:
    """Whether ``version`` lies in :data:`VERIFIED_DEEPSPEED` (inclusive)."""
    # Compare releases only: 0.19.8+cu130 and 0.19.8.post1 are 0.19.8 (packaging comes with DeepSpeed).
    from packaging.version import Version

    low, high = (Version(v).release for v in VERIFIED_DEEPSPEED)
    return low <= Version(version).release[:3] <= high


def check_deepspeed_version(version: str | None = None) -> bool:
    """Refuse a DeepSpeed older than the verified range, warn once for a newer one.

    Returns whether ``version`` (default: the installed one) is inside the range.
    """
    global _version_warned
    if version is None:
        import deepspeed

        version = deepspeed.__version__
    from packaging.version import Version

    if Version(version).release[:3] < Version(VERIFIED_DEEPSPEED[0]).release:
        raise RuntimeError(f"ldb_ds needs deepspeed >= {VERIFIED_DEEPSPEED[0]}, found {version}: older releases "
                           "lack DeepSpeed internals ldb_ds uses, and before 0.19.6 ZeRO-3 checkpoints of toggled "
                           f"parameters are corrupted. pip install 'deepspeed>={VERIFIED_DEEPSPEED[0]},<0.20'")
    ok = deepspeed_version_verified(version)
    if not ok and not _version_warned:
        _version_warned = True
        warnings.warn(f"ldb_ds: deepspeed {version} is outside the range ldb_ds's DeepSpeed hooks were verified "
                      f"on ({VERIFIED_DEEPSPEED[0]} to {VERIFIED_DEEPSPEED[1]}); ldb_ds checks at initialize that "
                      "DeepSpeed keeps its param groups and raises if not, but run the tests "
                      "(tests/dist) before trusting results", RuntimeWarning, stacklevel=3)
    return ok


def zero_stage(ds_engine: Any) -> int:
    return int(ds_engine.zero_optimization_stage())


def basic_optimizer(ds_engine: Any) -> torch.optim.Optimizer:
    """The user-level optimizer that DeepSpeed wrapped (set in ``_configure_optimizer``)."""
    opt = getattr(ds_engine, "basic_optimizer", None)
    if opt is None:
        raise RuntimeError("ldb_ds needs an optimizer: give one in the DeepSpeed config "
                           "('optimizer' section) or to ldb_ds.initialize(optimizer=...)")
    return opt


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
                           f"{type(wrapper).__name__} (ZeRO stage {stage}, deepspeed {_installed_version()}), "
                           "so it does not run LayerDropBack on it; ldb_ds's hooks were verified on the basic "
                           "optimizer at stage 0, FP16_Optimizer, FP16_UnfusedOptimizer, BF16_Optimizer, "
                           "DeepSpeedZeroOptimizer (ZeRO 1/2) and DeepSpeedZeroOptimizer_Stage3")
    n = len(expected_param_groups)
    if len(opt.param_groups) != n:
        raise RuntimeError(f"DeepSpeed has {len(opt.param_groups)} param groups, ldb_ds made {n} "
                           f"(deepspeed {_installed_version()}; ldb_ds's hooks were verified on "
                           f"{VERIFIED_DEEPSPEED[0]} to {VERIFIED_DEEPSPEED[1]})")
    # The model parameters of group i, as each optimizer wrapper keeps them:
    if hasattr(wrapper, "sub_group_to_group_id"):  # ZeRO-3: sub-groups of param groups
        actual = [[] for _ in range(n)]
        for sub_group, params in enumerate(wrapper.fp16_groups):
            actual[wrapper.sub_group_to_group_id[sub_group]].extend(params)
    elif hasattr(wrapper, "bit16_groups"):  # ZeRO-1/2 (DeepSpeedZeroOptimizer)
        actual = wrapper.bit16_groups
    elif hasattr(wrapper, "bf16_groups"):  # BF16_Optimizer (bf16 at stage 0/1 with fp32 grad accumulation)
        actual = wrapper.bf16_groups
    elif hasattr(wrapper, "fp16_groups"):  # FP16_(Unfused)Optimizer (fp16, or bf16 at stage 0)
        actual = wrapper.fp16_groups
    else:  # fp32 at stage 0: the basic optimizer itself
        actual = [g["params"] for g in opt.param_groups]
    for i, (want, got) in enumerate(zip(expected_param_groups, actual)):
        if {id(p) for p in want} != {id(p) for p in got}:
            raise RuntimeError(f"DeepSpeed param group {i} does not hold the parameters ldb_ds put there "
                               f"(ZeRO stage {stage}, deepspeed {_installed_version()}); ldb_ds's hooks were "
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


def _installed_version() -> str:
    import deepspeed

    return deepspeed.__version__


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
    # their own module and call it once per step with the lists of all groups.
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


def install_batched_grad_norm(ds_engine: Any, dropped_groups: Callable[[], set[int]]) -> bool:
    """ZeRO-1/2: one all-reduce for all group norms instead of one per group.

    ``DeepSpeedZeroOptimizer.scaled_global_norm`` calls ``get_grad_norm_direct``
    per param group, and each call all-reduces one scalar. With one group per
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
    original = z.scaled_global_norm
    device = get_accelerator().current_device_name()

    def scaled_global_norm(norm_type: int = 2) -> torch.Tensor:
        if norm_type != 2:
            return original(norm_type)
        dropped = dropped_groups()
        sums = []
        for i in range(len(z.bit16_groups)):
            grads = [g for g in z.averaged_gradients[i] if not getattr(g, "_zero_padding", False)] \
                if i not in dropped else []
            if grads:
                norms = [torch.linalg.vector_norm(g.data.to(get_norm_dtype()).detach(), ord=2).to(device)
                         for g in grads]
                sums.append(torch.stack(norms).pow(2).sum().float())
            else:
                sums.append(torch.tensor(0.0, dtype=torch.float32, device=device))
        stacked = torch.stack(sums)
        setattr(stacked, NOT_A_GRADIENT, True)  # a byte counter of gradient traffic leaves it out
        # One collective for all groups; every rank contributes its partition's sums.
        dist.all_reduce(stacked, op=dist.ReduceOp.SUM, group=z.dp_process_group)
        norms = stacked.pow(0.5)
        norms = torch.where(torch.isfinite(norms), norms, torch.full_like(norms, -1.0))
        return combine_grad_norm_groups(list(norms.unbind(0)), norm_type=2)

    z.scaled_global_norm = scaled_global_norm
    return True


def _without_auto(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _without_auto(v) for k, v in value.items() if v != "auto"}
    return value


def refuse_unverified_step_paths(ds_config: Mapping[str, Any], optimizer: Any = None) -> None:
    """Raise ``ValueError`` for DeepSpeed settings whose optimizer step bypasses the step filter.

    Called before ``deepspeed.initialize`` with the DeepSpeed config dict and the
    ``optimizer`` given to ``ldb_ds.initialize``. ZeRO-Offload itself is supported:
    stages 1/2 step every group through ``_optimizer_step(i)`` (``stage_1_and_2.py:3084``,
    the offload branch of ``step``) and stage 3 steps CPU sub-groups through the basic
    optimizer (``stage3.py:1253``); DeepSpeedCPUAdam's ``step`` loops over
    ``self.param_groups`` (``ops/adam/cpu_adam.py:142``), so hidden groups are not
    looked at. Refused, each for its own reason (line numbers: deepspeed 0.19.8):

    * NVMe offload (``offload_optimizer`` or ``offload_param`` ``device: nvme``): the
      swapper moves optimizer state and parameters of every sub-group in and out
      (``stage3.py:2702``, ``:2731``); not verified, and DeepSpeed's async I/O op
      cannot be built on the machines that run the tests;
    * partial offload (``offload_optimizer.ratio`` < 1, ZeRO-3): sub-groups kept on the
      device (``stage3.py:1105``) are stepped by ``backup_optimizer``, a separate
      ``torch.optim.AdamW`` (``:317``, ``:1257``) that the filter does not wrap;
    * SuperOffload (``offload_optimizer.super_offload``, ZeRO-3; ``engine.py:2748``):
      steps and rolls back sub-groups with ``DeepSpeedCPUAdam.step_subgroup`` /
      ``rollback_subgroup`` (``superoffload/superoffload_utils.py:143-145``);
    * ZenFlow (``zero_optimization.zenflow``; ``engine.py:2667``): its selective and
      overlapped CPU steps (``zenflow/zenflow_stage_1_and_2.py:605-626``) update
      parameters outside the per-group step;
    * Muon (``optimizer.type: Muon`` or a Muon optimizer instance): DeepSpeed splits every
      param group into Muon and Adam halves (``engine.py:2425``), so its groups are no
      longer ldb_ds's per-unit groups, and applies Muon updates outside the step
      (``stage_1_and_2.py:3038``);
    * ``zero_optimization.ignore_unused_parameters: false``: a dropped unit is an unused
      parameter by design; ZeRO-Offload's gradient norm asserts on it
      (``stage_1_and_2.py:1934``).
    """
    from deepspeed.runtime.zero.config import get_zero_config

    problems: list[str] = []
    try:
        # DeepSpeed's own parser: it maps deprecated spellings (cpu_offload, cpu_offload_param).
        # "auto" values (Hugging Face's config templates) are left out: none is read here.
        zero = get_zero_config(_without_auto(dict(ds_config)))
    except Exception:  # an invalid section: deepspeed.initialize reports it itself
        zero = None
    if zero is not None:
        oo, op = zero.offload_optimizer, zero.offload_param
        for key, sub in (("offload_optimizer", oo), ("offload_param", op)):
            if sub is not None and str(getattr(sub.device, "value", sub.device)) == "nvme":
                problems.append(f"zero_optimization.{key}.device = 'nvme' (NVMe offload): DeepSpeed's swapper moves "
                                "every sub-group's optimizer state and parameters in and out, a path ldb_ds has not "
                                "verified; use device 'cpu'")
        if oo is not None and int(zero.stage) == 3 and str(getattr(oo.device, "value", oo.device)) != "none":
            if oo.ratio < 1.0:
                problems.append(f"zero_optimization.offload_optimizer.ratio = {oo.ratio} (partial offload): ZeRO-3 "
                                "steps the sub-groups kept on the accelerator with a separate backup optimizer that "
                                "bypasses ldb_ds's step filter, so dropped units there would move; use ratio 1.0")
            if getattr(oo, "super_offload", False):
                problems.append("zero_optimization.offload_optimizer.super_offload = true (SuperOffload): it steps "
                                "sub-groups with DeepSpeedCPUAdam.step_subgroup/rollback_subgroup, bypassing ldb_ds's "
                                "step filter; use plain offload (super_offload false)")
        if getattr(zero, "zenflow", None) is not None:
            problems.append("zero_optimization.zenflow (ZenFlow): its selective and overlapped CPU optimizer steps "
                            "update parameters outside the per-group step that ldb_ds filters; remove the section")
        if not zero.ignore_unused_parameters:
            problems.append("zero_optimization.ignore_unused_parameters = false: a dropped unit is an unused "
                            "parameter in its step by design, and ZeRO-Offload asserts on it; set it to true")
    opt_type = str((ds_config.get("optimizer") or {}).get("type", "")).lower()
    if opt_type == "muon" or "muon" in type(optimizer).__name__.lower():
        problems.append("the Muon optimizer: DeepSpeed splits every param group into Muon and Adam halves, so its "
                        "groups are no longer ldb_ds's one group per unit, and applies Muon updates outside the "
                        "optimizer step; use another optimizer")
    if problems:
        raise ValueError("ldb_ds (layer_drop_back enabled) does not support: " + "; ".join(problems)
                         + ". Each would move dropped units or bypass ldb_ds's hooks (docs/design.md, section 4); "
                           "disable layer_drop_back to use it with plain DeepSpeed")


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


__all__ = ["VERIFIED_DEEPSPEED", "NOT_A_GRADIENT", "check_deepspeed_version", "deepspeed_version_verified",
           "zero_stage", "basic_optimizer", "check_group_order", "install_group_step_filter",
           "skip_allgather_of_dropped", "install_batched_grad_norm", "refuse_unverified_step_paths",
           "clear_stale_gradient_partitions"]
