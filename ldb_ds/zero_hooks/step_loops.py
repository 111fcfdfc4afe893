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

from typing import Any, Callable

from . import zero0_step, zero3_step, zero12_step
from .version import mirrored_object, mirrors_verified

INSTALLED_ATTR = "_ldb_step_hooks"

# name -> the optimizer attribute the replacement sets
_ATTRS = {"zero0_step": "step", "zero12_step": "step", "zero3_grad_norm": "_get_norm_groups",
          "zero3_optimizer_step": "_optimizer_step", "zero3_step": "step"}


def installed(ds_engine: Any) -> tuple[str, ...]:
    """Which replacements run in ``ds_engine`` (empty: DeepSpeed's own loops)."""
    return tuple(getattr(ds_engine.optimizer, INSTALLED_ATTR, ()))


def install(ds_engine: Any, skipped_groups: Callable[[], frozenset[int]]) -> tuple[str, ...]:
    """Install what applies to ``ds_engine``'s ZeRO optimizer; returns the names installed.

    ``skipped_groups()`` gives the indices of the param groups of the dropped units in the
    step about to run (read once per step).
    """
    z = ds_engine.optimizer
    names: list[str] = []
    if zero0_step.plain(z) and mirrors_verified(zero0_step.MIRRORED):
        z.step = zero0_step.step(z, skipped_groups)
        names.append("zero0_step")
    if zero12_step.plain(z) and mirrors_verified(zero12_step.MIRRORED):
        z.step = zero12_step.step(z, skipped_groups, z.step)
        names.append("zero12_step")
    if zero3_step.norm_group(z) is not None:
        if mirrors_verified(zero3_step.MIRRORED["norm"]):
            z._get_norm_groups = zero3_step.norm_groups(z, skipped_groups)
            names.append("zero3_grad_norm")
        if mirrors_verified(zero3_step.MIRRORED["optimizer_step"]):
            z._optimizer_step = zero3_step.optimizer_step(z)
            names.append("zero3_optimizer_step")
        # A subclass (ZenFlow's, SuperOffload's) overrides step(): only DeepSpeed's own is mirrored.
        if type(z).step is mirrored_object("stage3.DeepSpeedZeroOptimizer_Stage3.step") \
                and mirrors_verified(zero3_step.MIRRORED["step"]):
            z.step = zero3_step.step(z, skipped_groups)
            names.append("zero3_step")
    setattr(z, INSTALLED_ATTR, tuple(names))
    return tuple(names)


def uninstall(ds_engine: Any) -> None:
    """Put DeepSpeed's own methods back (the instance attributes :func:`install` set are removed)."""
    z = ds_engine.optimizer
    for name in installed(ds_engine):
        if _ATTRS[name] in vars(z):
            delattr(z, _ATTRS[name])
    setattr(z, INSTALLED_ATTR, ())
