"""The step filter: dropped units' groups hidden inside DeepSpeed's call of the basic optimizer;
and the stage-0 fp32 skip of a step with non-finite gradients, which the other stages do themselves.

See the package docstring (:mod:`ldb_ds.zero_hooks`) for why hiding group dicts inside the
basic optimizer's ``step`` keeps a dropped unit bitwise unchanged at every ZeRO stage.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
import warnings
from typing import Any, Callable, Iterator

import torch

from ..functional import hide_groups, merged_groups
from .groups import zero_stage
from .patches import Kind, PatchSet, require_verified
from .version import sources_match


FILTER_CALLERS = {
    "basic": ["engine.DeepSpeedEngine._take_model_step"],
    "FP16_UnfusedOptimizer": ["fp16.unfused_optimizer.FP16_UnfusedOptimizer.step"],
    "FP16_Optimizer": ["fp16.fused_optimizer.FP16_Optimizer.step"],
    "BF16_Optimizer": ["bf16_optimizer.BF16_Optimizer.step"],
    "DeepSpeedZeroOptimizer": ["stage_1_and_2.DeepSpeedZeroOptimizer._optimizer_step"],
    "DeepSpeedZeroOptimizer_Stage3": ["stage3.DeepSpeedZeroOptimizer_Stage3._optimizer_step"],
}
"""The DeepSpeed code that calls the basic optimizer's ``step`` directly, per wrapper (``basic``:
``engine._take_model_step``, which steps ``engine.optimizer``, the basic optimizer at ZeRO-0 fp32).
The step filter is exact only if that code shows the optimizer ldb_ds's group dicts and calls
``step()`` as verified (docs/design.md, section 4): a changed caller refuses LDB
(:func:`.patches.require_verified`). The ZeRO ``step()`` methods around them are mirrored by the
step loops (an optimisation: a changed one falls back to DeepSpeed's, which still calls these)."""


def filter_callers(ds_engine: Any) -> list[str]:
    """The :data:`FILTER_CALLERS` keys for ``ds_engine``'s optimizer wrapper."""
    wrapper = ds_engine.optimizer
    if wrapper is getattr(ds_engine, "basic_optimizer", None):
        return FILTER_CALLERS["basic"]
    # The name picks the caller list; a wrapper ldb_ds has none for is refused here, whether or
    # not groups.check_group_order (which checks the exact types) ran on this entry's path.
    callers = FILTER_CALLERS.get(type(wrapper).__name__)
    if callers is None:
        raise RuntimeError(f"ldb_ds does not run LayerDropBack on DeepSpeed's optimizer wrapper "
                           f"{type(wrapper).__name__}: its hooks were verified on "
                           f"{', '.join(k for k in FILTER_CALLERS if k != 'basic')} and the basic optimizer")
    return FILTER_CALLERS["basic"] + callers


def install_group_step_filter(optimizer: torch.optim.Optimizer, step_state: Any, patches: PatchSet) -> None:
    """Wrap ``optimizer.step`` to skip hidden groups and scale ``lr`` of the others.

    ``step_state`` (:class:`ldb_ds.controller.StepState`) is read at every call:
    ``hidden_groups`` are the group dicts to hide in the coming step, ``lr_factor`` the
    multiplier for the visible ones; the controller fills it at the step's boundary. The
    hiding itself is :func:`ldb_ds.functional.hide_groups`; what this adds is that it happens
    inside DeepSpeed's own call of the step, whatever ``param_groups`` DeepSpeed has put in
    place for that call (ZeRO-0: all groups; ZeRO-1/2: all kept groups with ldb_ds's step
    loop, else one; ZeRO-3: one sub-group). The visible groups are then stepped with
    :func:`ldb_ds.functional.merged_groups`, so a torch optimizer runs its kernels once over all
    groups of equal hyperparameters.
    """
    if getattr(optimizer, "_ldb_wrapped", False):
        raise RuntimeError("optimizer already wrapped by ldb_ds")
    original_step = optimizer.step
    key_cache: dict[int, tuple] = {}  # merged_groups' key names per group dict, kept across steps

    def step(*args: Any, **kwargs: Any) -> Any:
        hidden = step_state.hidden_groups
        factor = step_state.lr_factor
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

    patches.set_method("step filter", Kind.EXACTNESS, optimizer, "step", step)
    patches.set("step filter (marker)", Kind.EXACTNESS, optimizer, "_ldb_wrapped", True)


# The all-gather skip: one swap of a module-level DeepSpeed function per module, shared by every
# engine that needs it (reference-counted), and told per step which groups to leave out through
# a context variable that run_step sets around DeepSpeed's step (so two engines, or two threads,
# never see each other's groups).
_SKIPPED_IN_THIS_STEP: contextvars.ContextVar[frozenset[int]] = contextvars.ContextVar(
    "ldb_ds_skipped_groups", default=frozenset())
_ALLGATHER_SWAPS: dict[str, tuple[Callable, int]] = {}


def install_allgather_skip(ds_engine: Any, patches: PatchSet) -> bool:
    """Leave dropped groups out of DeepSpeed's post-step all-gather where DeepSpeed's own loop runs.

    ``DeepSpeedZeroOptimizer.step`` (ZeRO-1/2, wherever DeepSpeed's own step runs: no ldb_ds loop
    installed, or its per-step fallback, ``zero12_step._plain_gradients``) and
    ``BF16_Optimizer.step`` call the module-level function ``all_gather_dp_groups`` of their own
    module once with the lists of all groups; while a step runs under :func:`skipping`, the
    swapped-in version passes on only the kept groups. Exact because the skipped groups were
    not stepped on any rank (the mask is identical everywhere), so their partitions equal every
    rank's copy. The swap is process-wide (a module attribute), so it is reference-counted:
    made by the first engine that needs it, put back when the last one's patches are removed.
    Returns whether it applies to ``ds_engine``.
    """
    # DeepSpeedZeroOptimizer (stage_1_and_2) and BF16_Optimizer each import the function into
    # their own module (stage_1_and_2.py:26, bf16_optimizer.py:16) and call it once per step
    # with the lists of all groups (stage_1_and_2.py:3155, bf16_optimizer.py:599).
    module_name = type(ds_engine.optimizer).__module__
    module = sys.modules[module_name]
    if not callable(getattr(module, "all_gather_dp_groups", None)) or zero_stage(ds_engine) == 3:
        return False
    require_verified("the all-gather skip", ["utils.all_gather_dp_groups"])
    original, count = _ALLGATHER_SWAPS.get(module_name, (module.all_gather_dp_groups, 0))
    if count == 0:
        def all_gather_kept_groups(groups_flat, partitioned_param_groups, dp_process_group, **kwargs):
            skipped = _SKIPPED_IN_THIS_STEP.get()
            if not skipped:
                return original(groups_flat=groups_flat, partitioned_param_groups=partitioned_param_groups,
                                dp_process_group=dp_process_group, **kwargs)
            keep = [i for i in range(len(groups_flat)) if i not in skipped]
            return original(groups_flat=[groups_flat[i] for i in keep],
                            partitioned_param_groups=[partitioned_param_groups[i] for i in keep],
                            dp_process_group=[dp_process_group[i] for i in keep],
                            **kwargs)

        module.all_gather_dp_groups = all_gather_kept_groups
    _ALLGATHER_SWAPS[module_name] = (original, count + 1)

    def release() -> None:
        original_fn, n = _ALLGATHER_SWAPS[module_name]
        if n == 1:
            module.all_gather_dp_groups = original_fn  # the last engine that needed it
            del _ALLGATHER_SWAPS[module_name]
        else:
            _ALLGATHER_SWAPS[module_name] = (original_fn, n - 1)

    patches.add_undo("all-gather skip", Kind.EXACTNESS, f"{module_name}.all_gather_dp_groups", release)
    return True


@contextlib.contextmanager
def skipping(skipped_group_indices: frozenset[int]) -> Iterator[None]:
    """During one DeepSpeed step: the groups the all-gather skip leaves out (this context only)."""
    token = _SKIPPED_IN_THIS_STEP.set(frozenset(skipped_group_indices))
    try:
        yield
    finally:
        _SKIPPED_IN_THIS_STEP.reset(token)


def install_nonfinite_skip(ds_engine: Any, patches: PatchSet) -> bool:
    """Stage 0 in fp32: skip an optimizer step whose gradients are not finite, as ZeRO 1-3 do.

    ZeRO-1/2 (``stage_1_and_2.py:3043``), ZeRO-3 (``stage3.py:2887``), ``BF16_Optimizer``
    (``bf16_optimizer.py:401``) and the fp16 optimizers skip a step whose gradient norm is inf or
    NaN and set ``optimizer.overflow``; ``engine._take_model_step`` (``engine.py:3535-3541``)
    then counts it in ``engine.skipped_steps`` and leaves the LR scheduler alone. At stage 0 in
    fp32 ``engine.optimizer`` is the basic torch optimizer, which checks nothing: a NaN gradient
    would be applied. This wraps its ``step`` (outside ldb_ds's group filter): if any gradient
    element is inf or NaN, nothing is stepped and ``optimizer.overflow = True`` tells
    ``_take_model_step`` (``was_step_applied()`` False, so ``Installation.run_step`` counts it in
    ``counters.skipped_steps`` as an fp16 overflow and the window's mask draw is consumed), so
    every stage skips and counts alike. The gradients were all-reduced
    in backward (``engine.py:3165``), so every rank decides the same without a collective; the
    cost is one pass over the gradients (torch's GradScaler check, one multi-tensor op) and one
    host sync per step, as at ZeRO 1-3. The other stages decide on the gradient norm, which is
    also inf when finite gradients' sum of squares overflows fp32 (one element above about 1.8e19
    does); such a step is skipped there and taken here, and the weights it makes are inf or far
    off, which ``ldb-train``'s checks stop on. Element-wise is what the name promises, and the
    check is one pass instead of a norm per tensor, a stack and a reduction.
    Plain DeepSpeed has no such skip at stage 0, so ldb_ds installs it where LDB is enabled
    (``installation.install``); with LDB off an engine costs exactly what DeepSpeed's costs, and
    an application that wants the skip there too calls this itself (``ldb-train`` does).
    Returns whether it was installed (only stage 0 without fp16/bf16 needs it).
    """
    opt = ds_engine.optimizer
    if (zero_stage(ds_engine) != 0 or ds_engine.fp16_enabled() or ds_engine.bfloat16_enabled()
            or opt is not getattr(ds_engine, "basic_optimizer", None)):
        return False
    if getattr(opt, "_ldb_nonfinite_wrapped", False):
        return True
    # The skip relies on _take_model_step reading opt.overflow. With LDB on, installation.install
    # has already refused a changed one (the step filter's callers include it); an application
    # installing the skip with LDB off gets DeepSpeed's own behaviour instead, with a warning.
    if not sources_match(FILTER_CALLERS["basic"]):
        warnings.warn("ldb_ds: the stage-0 non-finite skip is not installed: DeepSpeed's "
                      "engine._take_model_step is not the verified source", RuntimeWarning, stacklevel=2)
        return False
    original_step = opt.step
    # torch's GradScaler check: one pass over every gradient that sets found_inf on an inf or NaN
    # element. With a scale of exactly 1 it writes each gradient back unchanged (x * 1 == x in
    # IEEE arithmetic; the kernels skip the multiply when the scale is 1), so the step that
    # follows sees the same bits. Made once, on the gradients' device.
    found_inf = torch.zeros(1, dtype=torch.float32, device=ds_engine.device)
    unit_scale = torch.ones(1, dtype=torch.float32, device=ds_engine.device)
    # The op takes dense tensors: a sparse gradient (nn.Embedding(sparse=True)) is checked through
    # its values, as GradScaler does. Known at set-up, so a dense model pays no per-tensor test.
    sparse_possible = any(getattr(m, "sparse", False) is True for m in ds_engine.module.modules())

    def step(*args: Any, **kwargs: Any) -> Any:
        grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
        opt.overflow = False
        if grads:
            if sparse_possible:
                grads = [t._values() if t.is_sparse else t for t in grads]
            # One multi-tensor op whatever the number of tensors; the bool() is the one host sync:
            # DeepSpeed decides on the host whether the step counts and the LR scheduler moves.
            found_inf.zero_()
            torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, unit_scale)
            if bool(found_inf):
                opt.overflow = True
                return None
        return original_step(*args, **kwargs)

    patches.set_method("non-finite skip", Kind.EXACTNESS, opt, "step", step)
    patches.set("non-finite skip (flag read by DeepSpeed)", Kind.EXACTNESS, opt, "overflow", False)
    patches.set("non-finite skip (marker)", Kind.EXACTNESS, opt, "_ldb_nonfinite_wrapped", True)
    return True
