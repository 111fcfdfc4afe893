"""Which of ldb_ds's own step loops run on an engine: installed only where checked, removable.

:func:`install` puts :mod:`.zero0_step` (ZeRO-0 bf16/fp16, ``FP16_UnfusedOptimizer``),
:mod:`.zero12_step` (ZeRO-1/2) or :mod:`.zero3_step` (ZeRO-3) in place of DeepSpeed's
per-group loops as *instance* attributes of the engine's (ZeRO or mixed-precision) optimizer (the class
and other engines are untouched), each only where (a) its plain-path predicate holds for this
optimizer and (b) the installed DeepSpeed is verified and every function it mirrors hashes to
the verified source (:func:`.version.mirrors_verified`). Otherwise DeepSpeed's own code runs,
with the step filter, so results are exact either way; only the per-group cost stays.
"""

from __future__ import annotations

from typing import Any

from . import zero0_step, zero3_step, zero12_step
from .patches import Kind, PatchSet, fallback_warning
from .version import mirrored_object, mirrors_verified

INSTALLED_ATTR = "_ldb_step_hooks"



def installed(ds_engine: Any) -> tuple[str, ...]:
    """Which replacements run in ``ds_engine`` (empty: DeepSpeed's own loops)."""
    return tuple(getattr(ds_engine.optimizer, INSTALLED_ATTR, ()))


def install(ds_engine: Any, step_state: Any, patches: PatchSet) -> tuple[str, ...]:
    """Install what applies to ``ds_engine``'s optimizer wrapper; returns the names installed.

    ``step_state`` (:class:`ldb_ds.controller.StepState`) gives the indices of the param groups
    of the dropped units in the step running (``skipped_groups``). Where the plain path applies
    but a mirrored source is not the verified one, DeepSpeed's own loop stays, with a warning.
    """
    z = ds_engine.optimizer
    names: list[str] = []

    def put(name: str, attr: str, value: Any) -> None:
        patches.set(f"step loop {name}", Kind.OPTIMISATION, z, attr, value)
        names.append(name)

    def verified(name: str, mirrored: list[str]) -> bool:
        if mirrors_verified(mirrored):
            return True
        fallback_warning(f"ldb_ds's {name}", mirrored)
        return False

    if zero0_step.plain(z) and verified("zero0_step", zero0_step.MIRRORED):
        put("zero0_step", "step", zero0_step.step(z, step_state))
    if zero12_step.plain(z) and verified("zero12_step", zero12_step.MIRRORED):
        put("zero12_step", "step", zero12_step.step(z, step_state, z.step))
    if zero3_step.norm_group(z) is not None:
        if verified("zero3_grad_norm", zero3_step.MIRRORED["norm"]):
            put("zero3_grad_norm", "_get_norm_groups", zero3_step.norm_groups(z, step_state))
        if verified("zero3_optimizer_step", zero3_step.MIRRORED["optimizer_step"]):
            put("zero3_optimizer_step", "_optimizer_step", zero3_step.optimizer_step(z))
        # A subclass (ZenFlow's, SuperOffload's) overrides step(): only DeepSpeed's own is mirrored.
        if type(z).step is mirrored_object("stage3.DeepSpeedZeroOptimizer_Stage3.step") \
                and verified("zero3_step", zero3_step.MIRRORED["step"]):
            put("zero3_step", "step", zero3_step.step(z, step_state))
    patches.set("step loops (names)", Kind.OPTIMISATION, z, INSTALLED_ATTR, tuple(names))
    return tuple(names)
